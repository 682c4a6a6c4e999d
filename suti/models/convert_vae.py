"""A diffusers AutoencoderKL (`vae/` folder: config.json + diffusion_pytorch_model.safetensors) into our
AutoencoderKL, and back.

Keys map one to one through `diffusers_layout`; checkpoints saved before diffusers renamed the VAE's attention
(query / key / value / proj_attn, sometimes as 1x1 convolutions) are read too.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save

from suti.core.atomic_io import atomic_write_bytes, atomic_write_json
from suti.models.diffusers_layout import (check_shapes, diffusers_key, key_map, read_config, safetensors_file,
                                          to_diffusers, to_ours)
from suti.models.vae import AutoencoderKL, VAEConfig

_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# diffusers AutoencoderKL options we do not implement, with the value that means "off".
_UNSUPPORTED_DEFAULTS = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
# Config keys that do not change the weights or the numerics here (diffusers' own "_..." bookkeeping as well).
_IGNORED = {"force_upcast", "down_block_types", "up_block_types"}


def vae_config_from_diffusers(config: Mapping[str, Any] | str) -> VAEConfig:
  """A diffusers AutoencoderKL config (dict, config.json path or folder) -> VAEConfig; one-line errors for what
  the project cannot take."""
  cfg = dict(read_config(config, "VAE") if isinstance(config, str) else config)
  kind = cfg.get("_class_name", "AutoencoderKL")
  if kind != "AutoencoderKL":
    raise ValueError(f"unsupported diffusers VAE class {kind!r} (only AutoencoderKL is implemented)")
  for key, off in _UNSUPPORTED_DEFAULTS.items():
    if cfg.get(key, off) != off:
      raise ValueError(f"unsupported diffusers VAE option {key}={cfg[key]!r} (only {off!r} is implemented)")
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    for block in cfg.get(key, (want,)):
      if block != want:
        raise ValueError(f"unsupported diffusers VAE block {block!r} in {key} (only {want} is implemented)")
  blocks = cfg.get("block_out_channels", (64,))
  for key in ("down_block_types", "up_block_types"):
    if key in cfg and len(cfg[key]) != len(blocks):
      raise ValueError(f"diffusers VAE config: {key} has {len(cfg[key])} entries, block_out_channels {len(blocks)}")
  sample_size = cfg.get("sample_size", 32)
  values = dict(block_out_channels=tuple(blocks), layers_per_block=cfg.get("layers_per_block", 1),
                in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                latent_channels=cfg.get("latent_channels", 4), norm_num_groups=cfg.get("norm_num_groups", 32),
                sample_size=sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size,
                scaling_factor=cfg.get("scaling_factor", 0.18215), shift_factor=cfg.get("shift_factor") or 0.0,
                use_quant_conv=cfg.get("use_quant_conv", True), use_post_quant_conv=cfg.get("use_post_quant_conv", True),
                mid_block_add_attention=cfg.get("mid_block_add_attention", True))
  known = set(values) | set(_UNSUPPORTED_DEFAULTS) | _IGNORED
  for key in cfg:
    if key not in known and not key.startswith("_"):
      raise ValueError(f"unknown diffusers VAE config key {key!r}")
  return VAEConfig(**values)


def diffusers_vae_config(config: VAEConfig) -> dict[str, Any]:
  """Our VAEConfig as a diffusers AutoencoderKL config.json (what `from_pretrained` reads)."""
  n = len(config.block_out_channels)
  out = config.to_dict()
  out.update(_class_name="AutoencoderKL", down_block_types=["DownEncoderBlock2D"] * n,
             up_block_types=["UpDecoderBlock2D"] * n, act_fn="silu", force_upcast=True,
             shift_factor=config.shift_factor or None)
  return out


@functools.lru_cache(maxsize=8)
def diffusers_vae_key_map(config: VAEConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
  """diffusers state_dict key -> (our parameter path, our shape); cached per config, not to be modified."""
  return key_map(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))


def _modern_key(key: str) -> str:
  parts = key.split(".")
  if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_NAMES and "attentions" in parts:
    parts[-2:-1] = _LEGACY_ATTENTION_NAMES[parts[-2]].split(".")
  return ".".join(parts)


def convert_diffusers_vae(state_dict: Mapping[str, np.ndarray], config: VAEConfig) -> nnx.State:
  """diffusers AutoencoderKL state_dict (numpy) -> nnx.State of our parameters (float32)."""
  state_dict = {_modern_key(k): v for k, v in state_dict.items()}
  wanted = diffusers_vae_key_map(config)
  check_shapes({k: tuple(np.shape(v)) for k, v in state_dict.items()}, wanted, "VAE")
  flat = [(path, nnx.Param(to_ours(state_dict[key], len(shape)))) for key, (path, shape) in wanted.items()]
  return nnx.State.from_flat_path(flat)


def load_diffusers_vae(folder: str) -> AutoencoderKL:
  """A diffusers `vae/` folder -> our AutoencoderKL with its weights (float32)."""
  config = vae_config_from_diffusers(folder)
  vae = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(vae)
  return nnx.merge(graphdef, convert_diffusers_vae(load_file(safetensors_file(folder)), config))


def load_diffusers_vae_into(vae: AutoencoderKL, folder: str) -> None:
  """Fills `vae` in place from a diffusers `vae/` folder, whose config must describe the same VAE."""
  config = vae_config_from_diffusers(folder)
  if config != vae.config:
    differ = [k for k, v in config.to_dict().items() if v != vae.config.to_dict()[k]]
    raise ValueError(f"the VAE in {folder} is not the configured one: {', '.join(f'vae.{k}' for k in differ)} "
                     f"differ ({', '.join(f'{k}={getattr(config, k)!r}' for k in differ)} there)")
  nnx.update(vae, convert_diffusers_vae(load_file(safetensors_file(folder)), config))


def diffusers_vae_state_dict(vae: AutoencoderKL) -> dict[str, np.ndarray]:
  """Our VAE's weights under diffusers' keys and layouts (float32)."""
  return {diffusers_key(path): to_diffusers(np.asarray(v.get_value(), np.float32))
          for path, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def save_diffusers_vae(vae: AutoencoderKL, folder: str) -> None:
  """Writes `folder` as a diffusers `vae/` folder that AutoencoderKL.from_pretrained reads."""
  os.makedirs(folder, exist_ok=True)
  atomic_write_bytes(os.path.join(folder, "diffusion_pytorch_model.safetensors"), save(diffusers_vae_state_dict(vae)))
  atomic_write_json(os.path.join(folder, "config.json"), diffusers_vae_config(vae.config))
