"""Evaluation configs: one file per benchmark setup (`suti eval --config configs/eval/<name>.py`)."""
