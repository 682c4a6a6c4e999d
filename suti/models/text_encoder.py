"""Text encoders behind one interface, chosen by `cfg.text.kind`:

  embedded  a small transformer over the byte-level tokenizer, trained with the UNet (no download)
  t5        a T5 v1.1 encoder converted from a local Hugging Face folder (`cfg.text.checkpoint`)
  clip      a CLIP text transformer converted likewise (e.g. Stable Diffusion's `text_encoder/`), or, in a
            checkpoint `suti convert diffusers` wrote, built from `cfg.text.clip_config` (its shape) with the
            tokenizer in `cfg.text.tokenizer`, the weights coming with the checkpoint

`cfg.text.mask_padding` (t5 / clip, default True) hides padded tokens from the encoder and the UNet; False feeds
every position unmasked, as Stable Diffusion runs CLIP and its UNet attends to all 77 tokens.

Every encoder has `.tokenize(texts) -> (ids int32 [B, L], mask bool [B, L])` (numpy, host side,
L = cfg.text.max_length), `__call__(ids, mask) -> (embeddings [B, L, width], pooled [B, width])` and
`.width`. The empty string is the "null" text condition used for classifier-free guidance.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from suti.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from suti.models.layers import layer_norm, linear, normal_init
from suti.models.t5 import T5Encoder
from suti.models.tokenizer import ByteTokenizer, HFTokenizer, find_hf_tokenizer_folder

TEXT_ENCODER_KINDS = ("embedded", "t5", "clip")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """The embedded encoder's shape (from cfg.text: width, layers, heads, max_length)."""

  width: int = 64
  layers: int = 2
  heads: int = 4
  max_length: int = 32
  mlp_ratio: int = 4
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def __post_init__(self):
    for name in ("width", "layers", "heads", "max_length", "mlp_ratio"):
      if getattr(self, name) < 1:
        raise ValueError(f"text.{name} must be positive, got {getattr(self, name)}")
    if self.width % self.heads:
      raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")
    if self.max_length < 2:
      raise ValueError(f"text.max_length must be at least 2 (bos + eos), got {self.max_length}")

  @classmethod
  def from_config(cls, cfg_text: Any) -> "TextEncoderConfig":
    defaults = cls()
    values = {field.name: cfg_text.get(field.name, getattr(defaults, field.name))
              for field in dataclasses.fields(cls)}
    return cls(**values)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x [B, L, D] over positions where mask [B, L] is True (zeros for an all-False row)."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
  return (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(x.dtype)


class TransformerLayer(nnx.Module):
  """Pre-LN: x + Attn(LN(x)) over valid keys, then x + MLP(LN(x))."""

  def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
    width, dtype = config.width, jnp.dtype(config.dtype)
    self.heads = config.heads
    self.attention_norm = layer_norm(width, dtype=dtype, rngs=rngs)
    self.qkv = linear(width, 3 * width, dtype=dtype, rngs=rngs)
    self.out = linear(width, width, dtype=dtype, rngs=rngs)
    self.mlp_norm = layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp_in = linear(width, config.mlp_ratio * width, dtype=dtype, rngs=rngs)
    self.mlp_out = linear(config.mlp_ratio * width, width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    q, k, v = jnp.split(self.qkv(self.attention_norm(x)).reshape(batch, length, 3, self.heads, -1), 3, axis=2)
    attended = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=mask[:, None, None, :])
    x = x + self.out(attended.reshape(batch, length, width))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class TextEncoder(nnx.Module):
  """The embedded default: byte tokens + learned positions -> pre-LN transformer -> final LayerNorm.

  Attention only sees valid (unpadded) tokens, so padding never changes the valid positions' embeddings
  nor `pooled`, the mean over valid tokens.
  """

  def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.tokenizer = ByteTokenizer()
    dtype = jnp.dtype(config.dtype)
    self.token_embedding = nnx.Embed(self.tokenizer.vocab_size, config.width, dtype=dtype,
                                     embedding_init=normal_init(0.02), rngs=rngs)
    self.position_embedding = nnx.Param(normal_init(0.02)(rngs.params(), (config.max_length, config.width)))
    self.layers = nnx.List([TransformerLayer(config, rngs=rngs) for _ in range(config.layers)])
    self.final_norm = layer_norm(config.width, dtype=dtype, rngs=rngs)

  @property
  def width(self) -> int:
    return self.config.width

  @property
  def max_length(self) -> int:
    return self.config.max_length

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer.encode(texts, self.config.max_length)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    length = ids.shape[1]
    if length > self.config.max_length:
      raise ValueError(f"{length} tokens exceed text.max_length {self.config.max_length}")
    mask = mask.astype(bool)
    x = self.token_embedding(ids) + self.position_embedding[...][:length].astype(self.token_embedding.dtype)
    for layer in self.layers:
      x = layer(x, mask)
    embeddings = self.final_norm(x)
    return embeddings, masked_mean(embeddings, mask)


class PretrainedTextEncoder(nnx.Module):
  """A converted T5 or CLIP text model with its Hugging Face tokenizer (both from local folders)."""

  def __init__(self, model: T5Encoder | CLIPTextTransformer, tokenizer: HFTokenizer, max_length: int,
               mask_padding: bool = True):
    self.model = model
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.mask_padding = bool(mask_padding)

  @property
  def width(self) -> int:
    return self.model.width

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self.tokenizer.encode(texts, self.max_length)
    return ids, mask if self.mask_padding else np.ones_like(mask)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.model(ids, mask)


def build_text_encoder(cfg_text: Any, *, rngs: nnx.Rngs,
                       cross_attention_dim: int | None = None) -> TextEncoder | PretrainedTextEncoder:
  """The text encoder that `cfg.text` describes. `cfg.text.width` must equal the encoder's width, and
  `cross_attention_dim` (the UNet's `model.cross_attention_dim`), when given, too."""
  kind = cfg_text.get("kind", "embedded")
  dtype = cfg_text.get("dtype", "float32")
  if kind == "embedded":
    encoder: TextEncoder | PretrainedTextEncoder = TextEncoder(TextEncoderConfig.from_config(cfg_text), rngs=rngs)
  elif kind in ("t5", "clip"):
    from suti.models import convert_hf_text  # reads checkpoints; not needed by the embedded encoder

    folder = cfg_text.get("checkpoint", "")
    max_length = cfg_text.get("max_length", 77 if kind == "clip" else 128)
    if kind == "clip" and not folder and cfg_text.get("clip_config"):
      model: T5Encoder | CLIPTextTransformer = CLIPTextTransformer(
          CLIPTextConfig(**dict(cfg_text.clip_config), dtype=dtype), rngs=rngs)
      tokenizer_folder = cfg_text.get("tokenizer", "")
      if not tokenizer_folder:
        raise ValueError("text.clip_config without text.checkpoint needs text.tokenizer, a tokenizer folder")
      tokenizer = HFTokenizer(find_hf_tokenizer_folder(tokenizer_folder, tokenizer_folder))
    else:
      if not folder:
        raise ValueError(f"text.kind={kind!r} needs text.checkpoint, a local Hugging Face folder")
      if not os.path.isdir(folder):
        raise ValueError(f"text.checkpoint {folder!r} is not a folder")
      load = convert_hf_text.load_t5_encoder if kind == "t5" else convert_hf_text.load_clip_text
      tokenizer = HFTokenizer(find_hf_tokenizer_folder(folder, cfg_text.get("tokenizer", "")))
      model = load(folder, dtype=dtype)
    if kind == "clip" and max_length > model.config.max_position_embeddings:
      raise ValueError(f"text.max_length {max_length} exceeds CLIP's {model.config.max_position_embeddings} positions")
    encoder = PretrainedTextEncoder(model, tokenizer, max_length, cfg_text.get("mask_padding", True))
  else:
    raise ValueError(f"unknown text.kind {kind!r}; expected one of {', '.join(TEXT_ENCODER_KINDS)}")
  expected = cfg_text.get("width", encoder.width)
  if expected != encoder.width:
    raise ValueError(f"text.width is {expected} but the {kind} encoder is {encoder.width} wide")
  if cross_attention_dim is not None and cross_attention_dim != encoder.width:
    raise ValueError(f"model.cross_attention_dim {cross_attention_dim} != text encoder width {encoder.width}")
  return encoder
