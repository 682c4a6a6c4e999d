"""Sinusoidal timestep features and the MLP that turns them into the UNet's time embedding."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from suti.models.layers import linear


def timestep_features(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                      max_period: float = 10000.0) -> jax.Array:
  """[B] timesteps -> [B, dim] float32 sinusoids, laid out as diffusers' `get_timestep_embedding`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding with default options)."""

  def __init__(self, in_features: int, embed_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.linear_1 = linear(in_features, embed_dim, dtype=dtype, rngs=rngs)
    self.linear_2 = linear(embed_dim, embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(features)))
