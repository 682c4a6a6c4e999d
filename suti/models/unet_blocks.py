"""Down, mid and up blocks of the UNet, laid out as diffusers' (CrossAttn)DownBlock2D, UNetMidBlock2DCrossAttn
and (CrossAttn)UpBlock2D, plus SuTI's neighbor-attention layers in the mid and up blocks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from suti.models.attention import Transformer2DModel
from suti.models.neighbors import NeighborAttention, NeighborTokens
from suti.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


class DownBlock(nnx.Module):
  """`num_layers` ResNets (each followed by a spatial transformer when `with_attention`), then a 2x downsampler.

  Returns the block output and the skip tensors (one per ResNet, plus the downsampled map).
  """

  def __init__(self, in_ch: int, out_ch: int, temb_dim: int, *, num_layers: int, with_attention: bool,
               add_downsample: bool, heads: int, context_dim: int, transformer_layers: int, groups: int,
               eps: float, time_scale_shift: str, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim, groups=groups, eps=eps,
                      time_scale_shift=time_scale_shift, dtype=dtype, rngs=rngs) for i in range(num_layers)
    ])
    self.attentions = nnx.List([
        Transformer2DModel(out_ch, heads, context_dim, num_layers=transformer_layers, groups=groups, dtype=dtype,
                           rngs=rngs) for _ in range(num_layers)
    ]) if with_attention else None
    self.downsamplers = nnx.List([Downsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_downsample else None

  def __call__(self, x: jax.Array, temb_act: jax.Array, context: jax.Array,
               context_mask: jax.Array | None) -> tuple[jax.Array, list[jax.Array]]:
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb_act)
      if self.attentions is not None:
        x = self.attentions[i](x, context, context_mask)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class MidBlock(nnx.Module):
  """ResNet, spatial transformer, [neighbor attention], ResNet."""

  def __init__(self, channels: int, temb_dim: int, *, heads: int, context_dim: int, transformer_layers: int,
               groups: int, eps: float, time_scale_shift: str, neighbor_token_dim: int | None, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(channels, channels, temb_dim, groups=groups, eps=eps, time_scale_shift=time_scale_shift,
                      dtype=dtype, rngs=rngs) for _ in range(2)
    ])
    self.attentions = nnx.List([
        Transformer2DModel(channels, heads, context_dim, num_layers=transformer_layers, groups=groups,
                           dtype=dtype, rngs=rngs)
    ])
    self.neighbor_attentions = nnx.List([
        NeighborAttention(channels, heads, neighbor_token_dim, dtype=dtype, rngs=rngs)
    ]) if neighbor_token_dim else None

  def __call__(self, x: jax.Array, temb_act: jax.Array, context: jax.Array, context_mask: jax.Array | None,
               neighbors: NeighborTokens | None = None) -> jax.Array:
    x = self.resnets[0](x, temb_act)
    x = self.attentions[0](x, context, context_mask)
    if neighbors is not None and self.neighbor_attentions is not None:
      x = self.neighbor_attentions[0](x, neighbors)
    return self.resnets[1](x, temb_act)


class UpBlock(nnx.Module):
  """`num_layers` ResNets over [x, skip] concatenations (each followed by a spatial transformer when
  `with_attention`, then by neighbor attention when enabled), then a 2x upsampler."""

  def __init__(self, in_ch: int, prev_out_ch: int, out_ch: int, temb_dim: int, *, num_layers: int,
               with_attention: bool, add_upsample: bool, heads: int, context_dim: int, transformer_layers: int,
               groups: int, eps: float, time_scale_shift: str, neighbor_token_dim: int | None, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    resnets = []
    for i in range(num_layers):
      skip_ch = in_ch if i == num_layers - 1 else out_ch
      resnet_in = prev_out_ch if i == 0 else out_ch
      resnets.append(ResnetBlock2D(resnet_in + skip_ch, out_ch, temb_dim, groups=groups, eps=eps,
                                   time_scale_shift=time_scale_shift, dtype=dtype, rngs=rngs))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List([
        Transformer2DModel(out_ch, heads, context_dim, num_layers=transformer_layers, groups=groups, dtype=dtype,
                           rngs=rngs) for _ in range(num_layers)
    ]) if with_attention else None
    self.neighbor_attentions = nnx.List([
        NeighborAttention(out_ch, heads, neighbor_token_dim, dtype=dtype, rngs=rngs) for _ in range(num_layers)
    ]) if neighbor_token_dim else None
    self.upsamplers = nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_upsample else None

  def __call__(self, x: jax.Array, skips: list[jax.Array], temb_act: jax.Array, context: jax.Array,
               context_mask: jax.Array | None, neighbors: NeighborTokens | None = None) -> jax.Array:
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb_act)
      if self.attentions is not None:
        x = self.attentions[i](x, context, context_mask)
      if neighbors is not None and self.neighbor_attentions is not None:
        x = self.neighbor_attentions[i](x, neighbors)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x
