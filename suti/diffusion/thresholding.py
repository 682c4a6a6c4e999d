"""Keeping predicted x0 inside the data range during sampling (pixel models).

Static clipping clips to [-1, 1]. Imagen's dynamic thresholding (Saharia et al. 2022) takes, per sample,
the p-th percentile s of |x0|; if s > 1 it clips to [-s, s] and divides by s, which pushes saturated
pixels inwards instead of flattening them, and is what makes large guidance scales usable.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

X0Fn = Callable[[jax.Array], jax.Array]


def static_clip(x0: jax.Array, low: float = -1.0, high: float = 1.0) -> jax.Array:
  return jnp.clip(x0, low, high)


def dynamic_threshold(x0: jax.Array, percentile: float = 0.995) -> jax.Array:
  """Per-sample dynamic thresholding of x0 [B, ...]; percentile is a fraction in (0, 1]."""
  if not 0.0 < percentile <= 1.0:
    raise ValueError(f"dynamic threshold percentile must be in (0, 1], got {percentile}")
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def make_x0_fn(dynamic_percentile: float = 0.0, clip: bool = False) -> X0Fn | None:
  """The x0 post-processing a sampler should use: dynamic thresholding when dynamic_percentile > 0
  (the `sample.dynamic_threshold` config key), else static clipping when clip, else none (latents)."""
  if dynamic_percentile and dynamic_percentile > 0:
    if dynamic_percentile > 1:
      raise ValueError(f"dynamic threshold percentile must be in (0, 1], got {dynamic_percentile}")
    return lambda x0: dynamic_threshold(x0, dynamic_percentile)
  if clip:
    return static_clip
  return None
