"""ResNet block, GroupNorm and the 2x down/up samplers of the UNet (NHWC, diffusers numerics)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from suti.models.layers import conv, linear, ones_init, zeros_init
from suti.models.unet_config import RESNET_TIME_SCALE_SHIFTS


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC (or [B, ..., C]) with statistics in float32, like torch.nn.GroupNorm."""

  def __init__(self, num_groups: int, num_channels: int, *, eps: float, dtype: jnp.dtype):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_groups} groups do not divide {num_channels} channels")
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(ones_init(None, (num_channels,)))
    self.bias = nnx.Param(zeros_init(None, (num_channels,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    grouped = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    return (normed * self.scale[...] + self.bias[...]).astype(self.dtype)


def conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return conv(in_ch, out_ch, 3, stride=stride, dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
  """GroupNorm-SiLU-Conv twice with the time embedding in between, 1x1 shortcut when widths differ.

  temb_dim None: no time embedding (the VAE's ResNets), as diffusers' temb_channels=None.

  time_scale_shift (diffusers' `resnet_time_scale_shift`): "default" adds the projected time embedding before
  norm2; "scale_shift" (Imagen / improved DDPM) projects it to 2*C and modulates the normalised map,
  norm2(h) * (1 + scale) + shift, scale being the first half.
  """

  def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, *, groups: int, eps: float,
               time_scale_shift: str = "default", dtype: jnp.dtype, rngs: nnx.Rngs):
    if time_scale_shift not in RESNET_TIME_SCALE_SHIFTS:
      raise ValueError(f"time_scale_shift must be one of {RESNET_TIME_SCALE_SHIFTS}, got {time_scale_shift!r}")
    self.scale_shift = time_scale_shift == "scale_shift"
    self.norm1 = GroupNorm(groups, in_ch, eps=eps, dtype=dtype)
    self.conv1 = conv3x3(in_ch, out_ch, dtype=dtype, rngs=rngs)
    self.time_emb_proj = (linear(temb_dim, 2 * out_ch if self.scale_shift else out_ch, dtype=dtype, rngs=rngs)
                          if temb_dim is not None else None)
    self.norm2 = GroupNorm(groups, out_ch, eps=eps, dtype=dtype)
    self.conv2 = conv3x3(out_ch, out_ch, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs)
                          if in_ch != out_ch else None)

  def __call__(self, x: jax.Array, temb_act: jax.Array | None = None) -> jax.Array:
    """x [B,H,W,Cin]; temb_act = SiLU(time embedding) [B,T], computed once per UNet call (None without one)."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is None:
      h = self.norm2(h)
    elif self.scale_shift:
      temb = self.time_emb_proj(temb_act)[:, None, None, :]
      scale, shift = jnp.split(temb, 2, axis=-1)
      h = self.norm2(h) * (1 + scale) + shift
    else:
      h = self.norm2(h + self.time_emb_proj(temb_act)[:, None, None, :])
    h = self.conv2(jax.nn.silu(h))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return shortcut + h


class Downsample2D(nnx.Module):
  """Stride-2 3x3 convolution (diffusers' Downsample2D with use_conv).

  padding 1 (the UNet's): one pixel on every side. padding 0 (the VAE's): one pixel of zeros at the bottom and
  right only, then an unpadded convolution, as diffusers pads (0, 1, 0, 1) before its padding-0 convolution.
  """

  def __init__(self, channels: int, *, padding: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs):
    if padding not in (0, 1):
      raise ValueError(f"Downsample2D: padding must be 0 or 1, got {padding}")
    self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)) if padding == 0 else None,
                     dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

  def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.conv = conv3x3(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(upsample_nearest_2x(x))
