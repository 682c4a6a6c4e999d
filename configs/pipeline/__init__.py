"""Pipeline configs: one file per data setup (`suti data run --config configs/pipeline/<name>.py`)."""
