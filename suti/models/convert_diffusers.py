"""Load a diffusers UNet2DConditionModel checkpoint (PyTorch layout, safetensors) into our UNet.

Keys and layouts map one to one through `diffusers_layout` (our parameter paths follow diffusers' module names);
a 1x1 convolution proj_in / proj_out (use_linear_projection False) becomes our Linear. Neighbor layers are not
part of a diffusers checkpoint: they keep their fresh values (an apprentice then starts as the exact base model).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from suti.models.diffusers_layout import check_shapes, key_map, safetensors_file, to_diffusers, to_ours
from suti.models.neighbors import is_neighbor_param
from suti.models.unet import UNet
from suti.models.unet_config import RESNET_TIME_SCALE_SHIFTS, UNetConfig

# diffusers options we do not implement, with the value that means "off".
_UNSUPPORTED_DEFAULTS = {
    "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "only_cross_attention": False, "act_fn": "silu", "downsample_padding": 1,
    "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0, "attention_type": "default",
    "reverse_transformer_layers_per_block": None, "class_embeddings_concat": False,
    "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None, "resnet_skip_time_act": False,
    "cross_attention_norm": None, "mid_block_only_cross_attention": None,
}


@functools.lru_cache(maxsize=8)
def diffusers_key_map(config: UNetConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
  """diffusers state_dict key -> (our parameter path, our shape) for every non-neighbor parameter.

  Cached per config (tracing SD 1.5's UNet abstractly takes seconds; checking then converting asks twice).
  Callers must not modify the returned dict."""
  return key_map(lambda: UNet(config, rngs=nnx.Rngs(0)), keep=lambda path: not is_neighbor_param(path))


def check_diffusers_shapes(shapes: Mapping[str, tuple[int, ...]], config: UNetConfig) -> None:
  """Validates a diffusers checkpoint's {key: shape} against `config` without touching any weights.

  Raises ValueError naming the first unexpected key, missing key or shape mismatch.
  """
  check_shapes(shapes, diffusers_key_map(config), "UNet")


def convert_diffusers_unet(state_dict: Mapping[str, np.ndarray], config: UNetConfig) -> nnx.State:
  """diffusers UNet state_dict (numpy arrays) -> nnx.State of our non-neighbor parameters (float32).

  Raises ValueError naming the first missing key, unexpected key or shape mismatch.
  """
  wanted = diffusers_key_map(config)
  check_shapes({k: tuple(np.shape(v)) for k, v in state_dict.items()}, wanted, "UNet")
  flat = [(path, nnx.Param(to_ours(state_dict[key], len(shape)))) for key, (path, shape) in wanted.items()]
  return nnx.State.from_flat_path(flat)


def load_diffusers_unet(path: str, unet: UNet) -> None:
  """Loads a diffusers UNet (a .safetensors file, or a diffusers `unet/` folder) into `unet` in place."""

  state_dict = load_file(safetensors_file(path))
  nnx.update(unet, convert_diffusers_unet(state_dict, unet.config))


def diffusers_unet_state_dict(unet: UNet) -> dict[str, np.ndarray]:
  """A base UNet's weights under diffusers' keys and layouts (float32); ValueError for an apprentice."""
  if unet.config.num_neighbors:
    raise ValueError("a SuTI apprentice's neighbor layers have no diffusers counterpart: export its base model")
  conv_projections = not unet.config.use_linear_projection  # SD 1.5: the transformers' proj_in / out are 1x1 convs
  ours = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
  out = {}
  for key, (path, _) in diffusers_key_map(unet.config).items():
    value = np.asarray(ours[path].get_value(), np.float32)
    is_projection = key.endswith((".proj_in.weight", ".proj_out.weight")) and ".ff." not in key
    out[key] = to_diffusers(value, conv_1x1=conv_projections and is_projection and value.ndim == 2)
  return out


def diffusers_unet_config(config: UNetConfig) -> dict[str, Any]:
  """Our UNetConfig as a diffusers UNet2DConditionModel config.json; ValueError for what diffusers lacks."""
  if config.text_in_time_embedding:
    raise ValueError("model.text_in_time_embedding=True (pooled text in the time embedding) has no diffusers "
                     "UNet2DConditionModel counterpart")
  if config.num_neighbors:
    raise ValueError("a SuTI apprentice's neighbor layers have no diffusers counterpart: export its base model")
  heads = config.num_attention_heads
  tlayers = config.transformer_layers_per_block
  return {
      "_class_name": "UNet2DConditionModel", "sample_size": config.image_size, "in_channels": config.in_channels,
      "out_channels": config.out_channels, "block_out_channels": list(config.block_out_channels),
      "layers_per_block": config.layers_per_block, "down_block_types": list(config.down_block_types),
      "up_block_types": list(config.up_block_types), "mid_block_type": config.mid_block_type,
      # diffusers' attention_head_dim holds the number of heads (its num_attention_heads cannot be set)
      "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads,
      "cross_attention_dim": config.cross_attention_dim,
      "transformer_layers_per_block": list(tlayers) if isinstance(tlayers, tuple) else tlayers,
      "norm_num_groups": config.norm_num_groups, "norm_eps": config.norm_eps,
      "resnet_time_scale_shift": config.resnet_time_scale_shift, "use_linear_projection": config.use_linear_projection,
      "flip_sin_to_cos": config.flip_sin_to_cos, "freq_shift": config.freq_shift, "act_fn": "silu",
      **_UNSUPPORTED_DEFAULTS,
  }


def unet_config_from_diffusers(config_json: Mapping[str, Any] | str, **overrides: Any) -> UNetConfig:
  """A diffusers UNet2DConditionModel config (dict, config.json path, or folder) -> UNetConfig.

  SuTI-only fields default to a plain text-to-image model (no neighbors, no pooled text in the time embedding,
  float32); pass them as keyword overrides, e.g. `num_neighbors=3, neighbor_token_resolutions=(8,), ...`.
  """
  if isinstance(config_json, str):
    file = os.path.join(config_json, "config.json") if os.path.isdir(config_json) else config_json
    with open(file) as f:
      config_json = json.load(f)
  cfg = dict(config_json)
  for key, off in _UNSUPPORTED_DEFAULTS.items():
    value = cfg.get(key, off)
    is_off = value == off or (isinstance(value, (list, tuple)) and all(v == off for v in value))
    if not is_off:
      raise ValueError(f"unsupported diffusers UNet option {key}={value!r} (only {off!r} is implemented)")
  scale_shift = cfg.get("resnet_time_scale_shift", "default")
  if scale_shift not in RESNET_TIME_SCALE_SHIFTS:
    raise ValueError(f"unsupported diffusers UNet option resnet_time_scale_shift={scale_shift!r} "
                     f"(implemented: {', '.join(RESNET_TIME_SCALE_SHIFTS)})")
  for key in ("norm_num_groups", "mid_block_type"):
    if key in cfg and cfg[key] is None:
      raise ValueError(f"unsupported diffusers UNet option {key}=None")
  if isinstance(cfg.get("cross_attention_dim"), (list, tuple)):
    raise ValueError("unsupported diffusers UNet option: per-block cross_attention_dim")
  layers = cfg.get("layers_per_block", 2)
  if isinstance(layers, (list, tuple)):
    if len(set(layers)) != 1:
      raise ValueError(f"unsupported diffusers UNet option: per-block layers_per_block {layers}")
    layers = layers[0]
  # diffusers' `attention_head_dim` historically holds the number of heads (see its UNet2DConditionModel).
  heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
  tlayers = cfg.get("transformer_layers_per_block", 1)
  if isinstance(tlayers, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tlayers):
    raise ValueError("unsupported diffusers UNet option: nested transformer_layers_per_block")
  sample_size = cfg.get("sample_size", 64)
  if isinstance(sample_size, (list, tuple)):
    if sample_size[0] != sample_size[1]:
      raise ValueError(f"unsupported diffusers UNet option: non-square sample_size {sample_size}")
    sample_size = sample_size[0]
  values = dict(
      image_size=sample_size,
      in_channels=cfg.get("in_channels", 4),
      out_channels=cfg.get("out_channels", 4),
      block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
      layers_per_block=layers,
      down_block_types=tuple(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))),
      up_block_types=tuple(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)),
      mid_block_type=cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
      num_attention_heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
      cross_attention_dim=cfg.get("cross_attention_dim", 1280),
      transformer_layers_per_block=tuple(tlayers) if isinstance(tlayers, (list, tuple)) else tlayers,
      norm_num_groups=cfg.get("norm_num_groups", 32),
      norm_eps=cfg.get("norm_eps", 1e-5),
      resnet_time_scale_shift=scale_shift,
      use_linear_projection=cfg.get("use_linear_projection", False),
      flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
      freq_shift=cfg.get("freq_shift", 0),
      text_in_time_embedding=False,
      dtype="float32",
      num_neighbors=0,
      neighbor_timestep=0,
      neighbor_token_resolutions=(),
      neighbor_attn_resolutions=(),
  )
  for key in overrides:
    if key not in values:
      raise ValueError(f"unknown UNetConfig field: {key}")
  values.update(overrides)
  return UNetConfig(**values)
