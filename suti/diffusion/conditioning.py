"""Conditioning dropout at training time, so one model also learns the unconditional predictions that
classifier-free guidance needs: text only dropped, neighbors only dropped, or both (mutually exclusive)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def drop_conditioning(rng: jax.Array, batch_size: int, p_text: float, p_neighbors: float,
                      p_both: float) -> tuple[jax.Array, jax.Array]:
  """Returns (keep_text [B] bool, keep_neighbors [B] bool).

  One uniform draw per example picks exactly one event: drop text only (p_text), drop neighbors
  only (p_neighbors), drop both (p_both), or keep both (the rest).
  """
  probs = (p_text, p_neighbors, p_both)
  static = all(isinstance(p, (int, float)) for p in probs)  # traced probabilities are not checked
  if static and (any(p < 0 for p in probs) or sum(probs) > 1.0 + 1e-9):
    raise ValueError(f"dropout probabilities must be >= 0 and sum to <= 1, got {probs}")
  u = jax.random.uniform(rng, (batch_size,))
  drop_text_only = u < p_text
  drop_neighbors_only = (u >= p_text) & (u < p_text + p_neighbors)
  drop_both = (u >= p_text + p_neighbors) & (u < p_text + p_neighbors + p_both)
  keep_text = ~(drop_text_only | drop_both)
  keep_neighbors = ~(drop_neighbors_only | drop_both)
  return keep_text, keep_neighbors


def select_kept(keep: jax.Array, value: jax.Array, null_value: jax.Array) -> jax.Array:
  """Per example, value where keep [B] else null_value (e.g. the empty prompt's embedding);
  null_value broadcasts against value."""
  keep = keep.reshape(keep.shape + (1,) * (value.ndim - keep.ndim))
  return jnp.where(keep, value, null_value)


def mask_neighbors(neighbor_mask: jax.Array, keep_neighbors: jax.Array) -> jax.Array:
  """Neighbor mask [B, K] with every neighbor of a dropped example switched off (all-False = none)."""
  return neighbor_mask & keep_neighbors[:, None]
