"""The CLIP text transformer (OpenAI CLIP / OpenCLIP as Hugging Face `CLIPTextModel`) in Flax NNX.

Pre-LN layers with biased projections, causal self-attention, quick_gelu or gelu MLP (per config),
a final LayerNorm, and the pooled output taken at the end-of-text token. Shaped from `config.json`;
weights come from `suti.models.convert_hf_text`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from suti.models.layers import layer_norm, linear, normal_init
from suti.models.t5 import activation


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: str = "float32"  # compute dtype; parameters stay float32

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "CLIPTextConfig":
    """From a `CLIPTextModel` config.json dict, or a full `CLIPModel` one (its `text_config`)."""
    hf = hf.get("text_config", hf)
    try:
      config = cls(
          vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
          num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
          max_position_embeddings=hf["max_position_embeddings"], hidden_act=hf.get("hidden_act", "quick_gelu"),
          layer_norm_eps=hf.get("layer_norm_eps", 1e-5), eos_token_id=hf.get("eos_token_id", 49407), dtype=dtype)
    except KeyError as error:
      raise ValueError(f"CLIP text config.json lacks the key {error.args[0]!r}") from error
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(f"hidden_size {config.hidden_size} is not divisible by {config.num_attention_heads} heads")
    activation(config.hidden_act)
    return config


class CLIPTextLayer(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    width, dtype = config.hidden_size, jnp.dtype(config.dtype)
    dense = lambda d_in, d_out: linear(d_in, d_out, dtype=dtype, rngs=rngs)
    self.num_heads = config.num_attention_heads
    self.layer_norm1 = layer_norm(width, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = dense(width, width), dense(width, width), dense(width, width)
    self.out_proj = dense(width, width)
    self.layer_norm2 = layer_norm(width, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.fc1 = dense(width, config.intermediate_size)
    self.fc2 = dense(config.intermediate_size, width)
    self.act = config.hidden_act

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    h = self.layer_norm1(x)
    heads = lambda t: t.reshape(batch, length, self.num_heads, width // self.num_heads)
    attended = jax.nn.dot_product_attention(
        heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h)), mask=mask)
    x = x + self.out_proj(attended.reshape(batch, length, width))
    return x + self.fc2(activation(self.act)(self.fc1(self.layer_norm2(x))))


class CLIPTextTransformer(nnx.Module):
  """ids [B, L], mask [B, L] -> (hidden [B, L, W] after the final LayerNorm, pooled [B, W] at end-of-text).

  Attention is causal; `mask` additionally hides padded keys. Padding follows the text, so valid
  positions are the same with or without it (Stable Diffusion runs CLIP without a mask).
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                     embedding_init=normal_init(0.02), rngs=rngs)
    self.position_embedding = nnx.Param(
        normal_init(0.01)(rngs.params(), (config.max_position_embeddings, config.hidden_size)))
    self.layers = nnx.List([CLIPTextLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.final_layer_norm = layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)

  @property
  def width(self) -> int:
    return self.config.hidden_size

  def eos_positions(self, ids: jax.Array) -> jax.Array:
    """Index of the end-of-text token per row: the first `eos_token_id`, or, for old configs whose
    eos_token_id is the placeholder 2, the largest id (end-of-text is the last entry of CLIP's vocab)."""
    if self.config.eos_token_id == 2:
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == self.config.eos_token_id, axis=-1)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    batch, length = ids.shape
    if length > self.config.max_position_embeddings:
      raise ValueError(f"{length} tokens exceed CLIP's {self.config.max_position_embeddings} positions")
    x = self.token_embedding(ids) + self.position_embedding[...][:length].astype(self.token_embedding.dtype)
    attend = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L]
    if mask is not None:
      attend = attend & mask.astype(bool)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, attend)
    hidden = self.final_layer_norm(x)
    pooled = hidden[jnp.arange(batch), self.eos_positions(ids)]
    return hidden, pooled
