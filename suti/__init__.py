"""SuTI-JAX: in-context subject-driven text-to-image diffusion in JAX / Flax NNX."""
from suti.core import torch_compat as _torch_compat

# Before anything imports torchvision (open_clip, transformers, diffusers): see suti/core/torch_compat.py.
_torch_compat.install()
