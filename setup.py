"""SuTI-JAX: subject-driven in-context image generation (apprenticeship learning) in JAX/Flax NNX."""
from setuptools import find_packages, setup

# Pinned to the stack that resolves on CPU-only machines. torch / torchvision are pinned on purpose:
# any newer torch pulls several GB of CUDA wheels. See suti/core/torch_compat.py for why torchvision
# 0.28.0 needs a small shim on CPU-only torch.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers>=5.0,<6",
    "tokenizers",
    "datasets>=5.0,<6",
    "webdataset==1.0.2",
    "open_clip_torch==3.3.0",
    "timm",
    "tensorflow-datasets==4.9.10",
    "ml_collections",
    "safetensors",
    "pillow",
    "numpy",
    "tqdm",
    "tensorboardX>=2.6",
    "pyarrow",
    "torch==2.13.0",
    "torchvision==0.28.0",
]

EXTRAS = {
    "ray": ["ray[data]"],
    "dev": ["pytest", "pytest-xdist", "diffusers", "tensorboard"],
}

# configs/ and checkpoints/ live at the repository root (an editable install and a checkout use them there). A
# non-editable install ships them inside the package, as suti/shipped/configs (the package suti.shipped.configs)
# and suti/shipped/checkpoints (data, every file): suti.core.paths.resolve_path looks there after the working
# folder, so `--config configs/toy.py` and `--checkpoint checkpoints/toy_suti` work from any folder.
# (`**` in package_data needs setuptools>=62.3.)
SHIPPED_CONFIGS = ["suti.shipped.configs"] + [f"suti.shipped.configs.{p}" for p in find_packages("configs")]
PACKAGES = find_packages(include=["suti", "suti.*", "data_pipeline", "data_pipeline.*"]) + SHIPPED_CONFIGS + [
    "suti.shipped.checkpoints"]
PACKAGE_DIR = {"suti.shipped.configs": "configs", "suti.shipped.checkpoints": "checkpoints"}
PACKAGE_DATA = {
    "suti.embed": ["toy_clip_configs/*.json"],  # read by suti/embed/clip.py
    "suti.shipped.checkpoints": ["**/*"],
}

setup(
    name="suti-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["suti=suti.cli:main"]},
)
