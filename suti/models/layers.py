"""Linear / Conv / LayerNorm constructors with initializers that are cheap outside jit.

Why: eagerly, every jax.random call with a new shape compiles its own XLA program (~0.3 s each on a small
CPU), so building a UNet with flax's default initializers took tens of seconds. With a concrete key these
initializers draw on the host with numpy (seeded from the key, so deterministic); under tracing (jit,
eval_shape) they fall back to jax.random, so sharded jit-initialisation keeps working.
Initialisation matches flax's defaults in spirit: fan-in-scaled normal kernels, zero biases, unit scales.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Initializer


def _is_traced(x: object) -> bool:
  return isinstance(x, jax.core.Tracer)


def normal_init(std: float) -> Initializer:
  """N(0, std^2) entries."""

  def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    if _is_traced(key):
      return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    words = np.asarray(jax.random.key_data(key)).ravel().tolist()
    sample = np.random.default_rng(words).standard_normal(tuple(shape), dtype=np.float32) * np.float32(std)
    return jnp.asarray(sample, dtype)

  return init


def fan_in_normal(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """LeCun normal: std = 1 / sqrt(fan_in), fan_in = product of all but the last (output) axis."""
  fan_in = max(1, math.prod(shape[:-1]))
  return normal_init(1.0 / math.sqrt(fan_in))(key, shape, dtype)


def constant_init(value: float) -> Initializer:

  def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    del key
    return jnp.asarray(np.full(tuple(shape), value, np.float32), dtype)

  return init


zeros_init = constant_init(0.0)
ones_init = constant_init(1.0)


def linear(in_features: int, out_features: int, *, use_bias: bool = True, zero_init: bool = False,
           dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    kernel_init=zeros_init if zero_init else fan_in_normal, bias_init=zeros_init)


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1,
         padding: tuple[tuple[int, int], tuple[int, int]] | None = None, dtype: jnp.dtype,
         rngs: nnx.Rngs) -> nnx.Conv:
  # Explicit symmetric padding by default: "SAME" pads (0, 1) at stride 2, which differs from PyTorch's padding=1.
  pad = (kernel - 1) // 2
  return nnx.Conv(in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride),
                  padding=padding or ((pad, pad), (pad, pad)), dtype=dtype, rngs=rngs, kernel_init=fan_in_normal,
                  bias_init=zeros_init)


def layer_norm(dim: int, *, eps: float = 1e-5, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs, scale_init=ones_init,
                       bias_init=zeros_init)
