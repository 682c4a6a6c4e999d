"""The T5 encoder (v1.1 and the original) in Flax NNX, shaped from a Hugging Face `config.json`.

T5 specifics kept here: RMS LayerNorm without bias or mean subtraction, no biases anywhere, no 1/sqrt(d)
attention scaling (folded into T5's initialisation), relative position bias from log-spaced distance
buckets computed by the first layer and shared by all layers, and a gated-GELU feed-forward for v1.1
(`feed_forward_proj="gated-gelu"`) or a plain ReLU one for the original T5.
Weights come from `suti.models.convert_hf_text`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from suti.models.layers import linear, normal_init, ones_init

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
  return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  gated: bool = True
  act: str = "gelu_new"
  dtype: str = "float32"  # compute dtype; parameters stay float32

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "T5EncoderConfig":
    """From a Hugging Face T5 `config.json` dict (v1.1: feed_forward_proj="gated-gelu")."""
    try:
      projection = hf.get("feed_forward_proj", "relu")
      gated = projection.startswith("gated-")
      act = hf.get("dense_act_fn") or projection.split("-")[-1]
      if act == "gelu" and gated:
        act = "gelu_new"  # Hugging Face maps "gated-gelu" to the tanh approximation
      config = cls(
          vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
          num_layers=hf["num_layers"], num_heads=hf["num_heads"],
          relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
          relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
          layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), gated=gated, act=act, dtype=dtype)
    except KeyError as error:
      raise ValueError(f"T5 config.json lacks the key {error.args[0]!r}") from error
    activation(config.act)
    return config


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets [query_length, key_length] (int32) of `key_position - query_position`.

  Half the buckets are for keys after the query. Within a half, distances below num_buckets/4 get one
  bucket each, larger ones log-spaced buckets up to max_distance, beyond that the last bucket. Computed
  on the host in float32, the same arithmetic as the reference, so the integer buckets agree exactly.
  """
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) for the exact buckets, replaced below
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


class T5RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * weight, statistics in float32."""

  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(ones_init(None, (dim,)))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.weight[...]).astype(x.dtype)


def _linear(d_in: int, d_out: int, config: T5EncoderConfig, rngs: nnx.Rngs) -> nnx.Linear:
  # N(0, 1/d_in) kernels (fan-in normal), no bias, as T5 initialises them.
  return linear(d_in, d_out, use_bias=False, dtype=jnp.dtype(config.dtype), rngs=rngs)


class T5Layer(nnx.Module):
  """Pre-norm self-attention (biased by the shared relative position bias) and feed-forward."""

  def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
    inner = config.num_heads * config.d_kv
    self.num_heads, self.d_kv = config.num_heads, config.d_kv
    self.attention_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)
    self.q = _linear(config.d_model, inner, config, rngs)
    self.k = _linear(config.d_model, inner, config, rngs)
    self.v = _linear(config.d_model, inner, config, rngs)
    self.o = _linear(inner, config.d_model, config, rngs)
    self.ffn_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)
    self.wi_0 = _linear(config.d_model, config.d_ff, config, rngs)
    self.wi_1 = _linear(config.d_model, config.d_ff, config, rngs) if config.gated else None
    self.wo = _linear(config.d_ff, config.d_model, config, rngs)
    self.act = config.act

  def __call__(self, x: jax.Array, position_bias: jax.Array, key_mask: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    h = self.attention_norm(x)
    heads = lambda t: t.reshape(batch, length, self.num_heads, self.d_kv)
    attended = jax.nn.dot_product_attention(
        heads(self.q(h)), heads(self.k(h)), heads(self.v(h)),
        bias=position_bias.astype(h.dtype), mask=key_mask[:, None, None, :], scale=1.0)
    x = x + self.o(attended.reshape(batch, length, -1))
    h = self.ffn_norm(x)
    hidden = activation(self.act)(self.wi_0(h))
    if self.wi_1 is not None:
      hidden = hidden * self.wi_1(h)
    return x + self.wo(hidden)


class T5Encoder(nnx.Module):
  """ids [B, L], mask [B, L] -> (hidden [B, L, d_model] after the final norm, pooled [B, d_model]).

  T5 has no pooled output of its own; `pooled` is the mean of the hidden states over valid tokens.
  """

  def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=jnp.dtype(config.dtype),
                           embedding_init=normal_init(1.0), rngs=rngs)
    self.relative_attention_bias = nnx.Param(
        normal_init(1.0)(rngs.params(), (config.relative_attention_num_buckets, config.num_heads)))
    self.layers = nnx.List([T5Layer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)

  @property
  def width(self) -> int:
    return self.config.d_model

  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    length = ids.shape[1]
    buckets = relative_position_buckets(length, length, self.config.relative_attention_num_buckets,
                                        self.config.relative_attention_max_distance)
    position_bias = jnp.transpose(self.relative_attention_bias[...][buckets], (2, 0, 1))[None]  # [1, H, L, L]
    mask = mask.astype(bool)
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x, position_bias, mask)
    hidden = self.final_norm(x)
    weights = mask[..., None].astype(jnp.float32)
    pooled = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return hidden, pooled.astype(hidden.dtype)
