"""Self / cross attention, the GEGLU transformer block and the spatial transformer (diffusers layout)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from suti.models.layers import layer_norm, linear
from suti.models.resnet import GroupNorm


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                         key_mask: jax.Array | None = None) -> jax.Array:
  """q [B,T,N*H], k/v [B,S,N*H], key_mask [B,S] bool (True = attend) -> [B,T,N*H].

  Softmax runs in float32. A row whose keys are all masked gets uniform weights here (no NaN); callers that
  need such rows to contribute nothing zero them afterwards.
  """
  b, t, inner = q.shape
  s = k.shape[1]
  head_dim = inner // heads
  mask = None if key_mask is None else key_mask[:, None, None, :]
  out = jax.nn.dot_product_attention(q.reshape(b, t, heads, head_dim), k.reshape(b, s, heads, head_dim),
                                     v.reshape(b, s, heads, head_dim), mask=mask)
  return out.reshape(b, t, inner)


class Attention(nnx.Module):
  """Multi-head attention with to_q/to_k/to_v (no bias) and to_out (bias), as diffusers' Attention."""

  def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
               zero_init_out: bool = False, dtype: jnp.dtype, rngs: nnx.Rngs):
    inner = heads * head_dim
    context_dim = query_dim if context_dim is None else context_dim
    self.heads = heads
    self.to_q = linear(query_dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_k = linear(context_dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_v = linear(context_dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_out = linear(inner, query_dim, zero_init=zero_init_out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, context_mask)
    return self.to_out(out)


class FeedForward(nnx.Module):
  """GEGLU feed-forward: proj_in to 2x inner (value, gate), value * GELU(gate), proj_out.

  diffusers names: ff.net.0.proj = proj_in, ff.net.2 = proj_out.
  """

  def __init__(self, dim: int, *, mult: int = 4, dtype: jnp.dtype, rngs: nnx.Rngs):
    inner = dim * mult
    self.proj_in = linear(dim, 2 * inner, dtype=dtype, rngs=rngs)
    self.proj_out = linear(inner, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(self.proj_in(x), 2, axis=-1)
    return self.proj_out(value * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm self-attention, text cross-attention and GEGLU feed-forward, each with a residual."""

  def __init__(self, dim: int, heads: int, context_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    head_dim = dim // heads
    self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn1 = Attention(dim, heads, head_dim, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dtype=dtype, rngs=rngs)
    self.norm3 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None) -> jax.Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context, context_mask)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the input residual.

  proj_in / proj_out are Linear layers in both diffusers variants: a 1x1 convolution (use_linear_projection
  False) is the same map, and the converter reshapes its [out, in, 1, 1] weight.
  """

  def __init__(self, channels: int, heads: int, context_dim: int, *, num_layers: int, groups: int,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
    self.proj_in = linear(channels, channels, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, context_dim, dtype=dtype, rngs=rngs) for _ in range(num_layers)
    ])
    self.proj_out = linear(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.proj_in(self.norm(x).reshape(b, h * w, c))
    for block in self.transformer_blocks:
      tokens = block(tokens, context, context_mask)
    return self.proj_out(tokens).reshape(b, h, w, c) + x
