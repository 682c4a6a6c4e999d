"""UNetConfig: the plain, validated description of a UNet built from a config's `model` section."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
DTYPES = ("float32", "bfloat16", "float16")
RESNET_TIME_SCALE_SHIFTS = ("default", "scale_shift")


@dataclass(frozen=True)
class UNetConfig:
  """Shape of a diffusers-style UNet2DConditionModel plus SuTI's neighbor layers.

  Field names follow diffusers' UNet2DConditionModel config (num_attention_heads here is the real number of
  heads per level, as in diffusers' `attention_head_dim` after its naming fix).
  """
  image_size: int
  in_channels: int
  out_channels: int
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  mid_block_type: str
  num_attention_heads: int | tuple[int, ...]
  cross_attention_dim: int
  transformer_layers_per_block: int | tuple[int, ...]
  norm_num_groups: int
  norm_eps: float
  resnet_time_scale_shift: str  # "default": add the time embedding; "scale_shift": norm2(h) * (1 + s) + b
  use_linear_projection: bool
  flip_sin_to_cos: bool
  freq_shift: int
  text_in_time_embedding: bool
  dtype: str
  num_neighbors: int
  neighbor_timestep: int
  neighbor_token_resolutions: tuple[int, ...]
  neighbor_attn_resolutions: tuple[int, ...]

  def __post_init__(self) -> None:
    # Tuples everywhere (ConfigDicts and JSON hand us lists), so the config stays hashable.
    for name in ("block_out_channels", "down_block_types", "up_block_types", "neighbor_token_resolutions",
                 "neighbor_attn_resolutions", "num_attention_heads", "transformer_layers_per_block"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    self._validate()

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any]) -> "UNetConfig":
    """Builds from a ConfigDict / mapping holding exactly the UNetConfig fields (and `pretrained`, the local
    diffusers folder a run starts from, which is not the UNet's shape)."""
    given = dict(model_cfg.items()) if hasattr(model_cfg, "items") else dict(model_cfg)
    given.pop("pretrained", None)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in given:
      if key not in names:
        raise ValueError(f"unknown model config key: model.{key}")
    for name in names:
      if name not in given:
        raise ValueError(f"missing model config key: model.{name}")
    return cls(**{name: given[name] for name in names})

  def replace(self, **changes: Any) -> "UNetConfig":
    return dataclasses.replace(self, **changes)

  # Derived shapes -------------------------------------------------------------------------------------
  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  @property
  def heads_per_level(self) -> tuple[int, ...]:
    heads = self.num_attention_heads
    return (heads,) * self.num_levels if isinstance(heads, int) else tuple(heads)

  @property
  def transformer_layers_per_level(self) -> tuple[int, ...]:
    layers = self.transformer_layers_per_block
    return (layers,) * self.num_levels if isinstance(layers, int) else tuple(layers)

  def level_resolution(self, level: int) -> int:
    """Spatial size of the feature maps at down level `level` (0 = full resolution)."""
    return self.image_size // (2**level)

  @property
  def mid_resolution(self) -> int:
    return self.level_resolution(self.num_levels - 1)

  def up_block_resolution(self, index: int) -> int:
    """Spatial size inside up block `index` (before its upsampler)."""
    return self.level_resolution(self.num_levels - 1 - index)

  @property
  def neighbor_token_dim(self) -> int:
    """Width of the neighbor tokens: the channel count of the mid block."""
    return self.block_out_channels[-1]

  def _validate(self) -> None:
    n = self.num_levels
    if n < 1:
      raise ValueError("model.block_out_channels must not be empty")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"model.down_block_types and model.up_block_types need {n} entries (one per "
                       f"block_out_channels), got {len(self.down_block_types)} and {len(self.up_block_types)}")
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"model.down_block_types: unsupported block {t!r}; expected one of {DOWN_BLOCK_TYPES}")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"model.up_block_types: unsupported block {t!r}; expected one of {UP_BLOCK_TYPES}")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"model.mid_block_type: unsupported {self.mid_block_type!r}; expected {MID_BLOCK_TYPES}")
    if self.resnet_time_scale_shift not in RESNET_TIME_SCALE_SHIFTS:
      raise ValueError(f"model.resnet_time_scale_shift must be one of {RESNET_TIME_SCALE_SHIFTS}, "
                       f"got {self.resnet_time_scale_shift!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.layers_per_block < 1:
      raise ValueError(f"model.layers_per_block must be >= 1, got {self.layers_per_block}")
    if len(self.heads_per_level) != n or len(self.transformer_layers_per_level) != n:
      raise ValueError("model.num_attention_heads / model.transformer_layers_per_block: give an int or one "
                       f"entry per level ({n})")
    for ch, heads in zip(self.block_out_channels, self.heads_per_level):
      if ch % heads:
        raise ValueError(f"model.num_attention_heads: {heads} heads do not divide {ch} channels")
      if ch % self.norm_num_groups:
        raise ValueError(f"model.norm_num_groups: {self.norm_num_groups} groups do not divide {ch} channels")
    if self.image_size % (2**(n - 1)):
      raise ValueError(f"model.image_size {self.image_size} must be divisible by {2**(n - 1)} ({n} levels)")
    if self.num_neighbors < 0:
      raise ValueError(f"model.num_neighbors must be >= 0, got {self.num_neighbors}")
    if self.num_neighbors > 0:
      levels = {self.level_resolution(i) for i in range(n)}
      for name in ("neighbor_token_resolutions", "neighbor_attn_resolutions"):
        sizes = getattr(self, name)
        if not sizes:
          raise ValueError(f"model.{name} must not be empty when model.num_neighbors > 0")
        for r in sizes:
          if r not in levels:
            raise ValueError(f"model.{name}: {r} is not a feature-map size of this UNet ({sorted(levels)})")
