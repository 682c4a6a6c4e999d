"""SuTI neighbors: the tokens a UNet encodes from demonstration images, and the layers that attend to them.

Each neighbor (clean image + its caption) runs through the UNet's own conv_in, down blocks and mid block;
feature maps at `neighbor_token_resolutions` become tokens (`NeighborTokenizer`), concatenated over the K
neighbors with a mask. `NeighborAttention` layers in the mid block and up blocks read them; their output
projection starts at zero so a fresh apprentice computes exactly its base model's output.

Every parameter here lives under an attribute whose name contains "neighbor" (see `is_neighbor_param`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from suti.models.attention import Attention
from suti.models.layers import layer_norm, linear, normal_init


@flax.struct.dataclass
class NeighborTokens:
  """tokens [B, N, D_tok] and mask [B, N] bool (True = a real neighbor's token). A pytree: jit-friendly."""
  tokens: jax.Array
  mask: jax.Array

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]


def is_neighbor_param(path: Sequence[Any], value: Any = None) -> bool:
  """nnx filter: True for parameters of the neighbor layers (usable with nnx.state / nnx.Not / optax masks)."""
  del value
  return any("neighbor" in str(part) for part in path)


class NeighborAttention(nnx.Module):
  """x + gate * to_out(attention(LayerNorm(x), neighbor tokens)), gate = 0 for rows without neighbors."""

  def __init__(self, channels: int, heads: int, token_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm = layer_norm(channels, dtype=dtype, rngs=rngs)
    self.attn = Attention(channels, heads, channels // heads, context_dim=token_dim, zero_init_out=True,
                          dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, neighbors: NeighborTokens) -> jax.Array:
    b, h, w, c = x.shape
    out = self.attn(self.norm(x.reshape(b, h * w, c)), neighbors.tokens.astype(x.dtype), neighbors.mask)
    # A row with every token masked attends uniformly to padding; drop its contribution (bias included).
    has_neighbor = jnp.any(neighbors.mask, axis=1)[:, None, None]
    out = jnp.where(has_neighbor, out, jnp.zeros((), out.dtype))
    return x + out.reshape(b, h, w, c)


class NeighborTokenizer(nnx.Module):
  """Feature maps of B*K neighbors -> NeighborTokens [B, K*T, D_tok].

  Per resolution: a Linear to the token width and a learned spatial position embedding; then a LayerNorm and
  a learned per-neighbor position embedding (index k of K_max), so the model can tell demos apart.
  """

  def __init__(self, resolutions: Sequence[int], channels: Sequence[int], token_dim: int, max_neighbors: int,
               *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.resolutions = tuple(resolutions)
    self.dtype = dtype
    init = normal_init(0.02)
    self.projections = nnx.List([linear(ch, token_dim, dtype=dtype, rngs=rngs) for ch in channels])
    self.spatial_position = nnx.List([nnx.Param(init(rngs.params(), (r * r, token_dim), jnp.float32))
                                      for r in self.resolutions])
    self.norm = layer_norm(token_dim, dtype=dtype, rngs=rngs)
    self.neighbor_position = nnx.Param(init(rngs.params(), (max_neighbors, token_dim), jnp.float32))

  def __call__(self, feature_maps: Sequence[jax.Array], neighbor_mask: jax.Array) -> NeighborTokens:
    """feature_maps[i]: [B*K, r_i, r_i, C_i] in `resolutions` order; neighbor_mask [B, K] bool."""
    b, k = neighbor_mask.shape
    per_resolution = []
    for fmap, proj, pos in zip(feature_maps, self.projections, self.spatial_position):
      flat = fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])
      per_resolution.append(proj(flat) + pos[...].astype(self.dtype))
    tokens = self.norm(jnp.concatenate(per_resolution, axis=1))
    t = tokens.shape[1]
    tokens = tokens.reshape(b, k, t, -1) + self.neighbor_position[:k][None, :, None, :].astype(self.dtype)
    mask = jnp.broadcast_to(neighbor_mask.astype(bool)[:, :, None], (b, k, t))
    return NeighborTokens(tokens=tokens.reshape(b, k * t, -1), mask=mask.reshape(b, k * t))


def pad_neighbors(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[Sequence[str]], *, num_neighbors: int,
                  image_size: int, tokenize: Callable) -> dict[str, np.ndarray]:
  """The one padding rule for 1..K neighbors per row, used by the trainer's loader and by generation alike.

  rows: per row its neighbor images, float32 [S, S, 3] in the model's range; captions: one per image. Returns
  images float32 [B, K, S, S, 3], ids int32 / text_mask [B, K, L] and neighbor_mask bool [B, K]. Padding slots
  hold zero images, neighbor_mask False and the tokens of the empty caption (a valid null text, so the text
  encoder never sees a fully masked row).
  """
  if len(rows) != len(captions):
    raise ValueError(f"{len(rows)} rows of neighbors but {len(captions)} rows of captions")
  b, k, s = len(rows), int(num_neighbors), int(image_size)
  images = np.zeros((b, k, s, s, 3), np.float32)
  present = np.zeros((b, k), bool)
  texts = [""] * (b * k)
  for i, (row, row_captions) in enumerate(zip(rows, captions)):
    if len(row) > k:
      raise ValueError(f"{len(row)} neighbors in a row, at most {k}")
    if len(row_captions) != len(row):
      raise ValueError(f"{len(row)} neighbors but {len(row_captions)} captions")
    for j, (image, text) in enumerate(zip(row, row_captions)):
      images[i, j], present[i, j], texts[i * k + j] = image, True, text
  ids, mask = tokenize(texts)
  ids, mask = np.asarray(ids), np.asarray(mask)
  if ids.ndim != 2 or ids.shape[0] != b * k or mask.shape != ids.shape:
    raise ValueError(f"tokenize must return ids and mask of shape [{b * k}, L], got {ids.shape} and {mask.shape}")
  return {"images": images, "ids": ids.astype(np.int32).reshape(b, k, -1), "text_mask": mask.reshape(b, k, -1),
          "neighbor_mask": present}
