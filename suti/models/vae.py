"""AutoencoderKL in NNX, laid out as diffusers' AutoencoderKL (Stable Diffusion's VAE), NHWC.

Parameter paths follow diffusers' module names (encoder.down_blocks.0.resnets.1.conv2, mid_block.attentions.0,
quant_conv, post_quant_conv ...), so `convert_vae.py` maps a diffusers `vae/` folder one to one. Images go in
and come out in model range [-1, 1]; `encode_latents` / `decode_latents` apply the latent scaling
z = (mean - shift_factor) * scaling_factor that the diffusion model sees.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from suti.models.attention import multi_head_attention
from suti.models.layers import conv, linear
from suti.models.resnet import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

_EPS = 1e-6  # diffusers' VAE uses 1e-6 in every norm (its UNet uses norm_eps)


@dataclass(frozen=True)
class VAEConfig:
  """diffusers AutoencoderKL config fields (only the DownEncoderBlock2D / UpDecoderBlock2D family)."""
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self) -> None:
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("vae.block_out_channels must not be empty")
    for ch in self.block_out_channels:
      if ch % self.norm_num_groups:
        raise ValueError(f"vae.norm_num_groups: {self.norm_num_groups} groups do not divide {ch} channels")
    if self.layers_per_block < 1:
      raise ValueError(f"vae.layers_per_block must be >= 1, got {self.layers_per_block}")
    if self.scaling_factor <= 0:
      raise ValueError(f"vae.scaling_factor must be > 0, got {self.scaling_factor}")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "VAEConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in names:
        raise ValueError(f"unknown VAE config key: {key}")
    return cls(**dict(values))

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["block_out_channels"] = list(self.block_out_channels)
    return out

  @property
  def downsample_factor(self) -> int:
    return 2**(len(self.block_out_channels) - 1)


class VAEAttention(nnx.Module):
  """One-head self-attention over the H*W positions with GroupNorm in front and the input added back.

  diffusers' mid-block Attention (residual_connection=True, bias=True, heads = channels / channels = 1).
  """

  def __init__(self, channels: int, *, groups: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(groups, channels, eps=_EPS, dtype=dtype)
    self.to_q = linear(channels, channels, dtype=dtype, rngs=rngs)
    self.to_k = linear(channels, channels, dtype=dtype, rngs=rngs)
    self.to_v = linear(channels, channels, dtype=dtype, rngs=rngs)
    self.to_out = linear(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)
    out = multi_head_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), heads=1)
    return self.to_out(out).reshape(b, h, w, c) + x


class VAEMidBlock(nnx.Module):
  """ResNet, [attention], ResNet (diffusers' UNetMidBlock2D without a time embedding)."""

  def __init__(self, channels: int, *, groups: int, attention: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, groups=groups, eps=_EPS, dtype=dtype,
                                           rngs=rngs) for _ in range(2)])
    self.attentions = (nnx.List([VAEAttention(channels, groups=groups, dtype=dtype, rngs=rngs)])
                       if attention else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class EncoderBlock(nnx.Module):
  """DownEncoderBlock2D: ResNets, then a stride-2 convolution after a (0, 1) pad (downsample_padding=0)."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, add_downsample: bool, groups: int,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups=groups, eps=_EPS,
                                           dtype=dtype, rngs=rngs) for i in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_ch, padding=0, dtype=dtype, rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
  """UpDecoderBlock2D: ResNets, then nearest 2x upsampling and a convolution."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, add_upsample: bool, groups: int,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups=groups, eps=_EPS,
                                           dtype=dtype, rngs=rngs) for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
  """Image [B,H,W,in] -> [B,H/f,W/f,2*latent] (mean and log-variance, before quant_conv)."""

  def __init__(self, cfg: VAEConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    chans, groups = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv(cfg.in_channels, chans[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List([
        EncoderBlock(chans[max(i - 1, 0)], ch, num_layers=cfg.layers_per_block, add_downsample=i < len(chans) - 1,
                     groups=groups, dtype=dtype, rngs=rngs) for i, ch in enumerate(chans)
    ])
    self.mid_block = VAEMidBlock(chans[-1], groups=groups, attention=cfg.mid_block_add_attention, dtype=dtype,
                                 rngs=rngs)
    self.conv_norm_out = GroupNorm(groups, chans[-1], eps=_EPS, dtype=dtype)
    self.conv_out = conv(chans[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent [B,h,w,latent] -> image [B,h*f,w*f,out]; each up block has layers_per_block + 1 ResNets."""

  def __init__(self, cfg: VAEConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = conv(cfg.latent_channels, chans[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = VAEMidBlock(chans[0], groups=groups, attention=cfg.mid_block_add_attention, dtype=dtype,
                                 rngs=rngs)
    self.up_blocks = nnx.List([
        DecoderBlock(chans[max(i - 1, 0)], ch, num_layers=cfg.layers_per_block + 1, add_upsample=i < len(chans) - 1,
                     groups=groups, dtype=dtype, rngs=rngs) for i, ch in enumerate(chans)
    ])
    self.conv_norm_out = GroupNorm(groups, chans[-1], eps=_EPS, dtype=dtype)
    self.conv_out = conv(chans[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """Encoder + quant_conv -> diagonal Gaussian posterior; post_quant_conv + Decoder back to pixels."""

  def __init__(self, config: VAEConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
    width = config.latent_channels
    self.quant_conv = conv(2 * width, 2 * width, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
    self.post_quant_conv = conv(width, width, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv else None

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B,H,W,C] in [-1, 1] -> (mean, logvar) [B,H/f,W/f,latent]; logvar clamped to [-30, 20]."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents [B,h,w,latent] -> images [B,h*f,w*f,C] (model range, not clipped)."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def encode_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images -> the diffusion model's latents: a posterior sample (the mean when rng is None), shifted and
    scaled by the config's shift_factor / scaling_factor."""
    z = posterior_sample(*self.encode(images), rng)
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """The diffusion model's latents -> images in model range."""
    return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Reconstruction: encode (posterior sample when rng is given, else its mean) then decode."""
    return self.decode(posterior_sample(*self.encode(images), rng))


def posterior_sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array | None) -> jax.Array:
  """A draw from N(mean, exp(logvar)), or the mean itself when rng is None."""
  if rng is None:
    return mean
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent positions and channels, per image [B]."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
