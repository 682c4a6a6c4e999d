"""SuTIModel: the text encoder and the UNet together, as training and sampling see them.

The base text-to-image model is the same class with `model.num_neighbors = 0`. Text goes in as token ids
(tokenized on the host by `model.text.tokenize`); neighbors go in as clean images with their own captions and
become `NeighborTokens` once per batch (training) or once per generation (sampling).
"""
from __future__ import annotations

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from suti.models.neighbors import NeighborTokens
from suti.models.text_encoder import build_text_encoder
from suti.models.unet import UNet
from suti.models.unet_config import UNetConfig


class SuTIModel(nnx.Module):
  """Text encoder + UNet (+ neighbor layers when model.num_neighbors > 0)."""

  def __init__(self, cfg: mlc.ConfigDict, *, rngs: nnx.Rngs):
    self.unet_config = UNetConfig.from_config(cfg.model)
    self.text = build_text_encoder(cfg.text, rngs=rngs)
    if self.text.width != self.unet_config.cross_attention_dim:
      raise ValueError(f"text encoder width {self.text.width} != model.cross_attention_dim "
                       f"{self.unet_config.cross_attention_dim}")
    self.unet = UNet(self.unet_config, rngs=rngs)

  @property
  def num_neighbors(self) -> int:
    return self.unet_config.num_neighbors

  def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return self.text.tokenize(list(texts))

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    emb, pooled = self.text(ids, mask)
    return emb, mask, pooled

  def encode_neighbors(self, images: jax.Array, ids: jax.Array, text_mask: jax.Array,
                       neighbor_mask: jax.Array) -> NeighborTokens:
    """images [B,K,H,W,C], ids / text_mask [B,K,L], neighbor_mask [B,K] -> NeighborTokens."""
    b, k = ids.shape[:2]
    emb, pooled = self.text(ids.reshape(b * k, -1), text_mask.reshape(b * k, -1))
    return self.unet.encode_neighbors(
        images, emb.reshape(b, k, *emb.shape[1:]), text_mask, neighbor_mask,
        pooled_texts=pooled.reshape(b, k, -1))

  def __call__(self, x_t: jax.Array, t: jax.Array, ids: jax.Array, text_mask: jax.Array,
               neighbors: NeighborTokens | None = None) -> jax.Array:
    emb, mask, pooled = self.encode_text(ids, text_mask)
    return self.unet(x_t, t, emb, mask, neighbors=neighbors, pooled_text=pooled)


def null_text(model: SuTIModel, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of the empty prompt: the unconditional text used by dropout and guidance."""
  ids, mask = model.tokenize([""])
  return np.repeat(ids, batch_size, 0), np.repeat(mask, batch_size, 0)
