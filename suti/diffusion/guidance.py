"""Classifier-free guidance with separate text and neighbor scales, in the model's output space
(eps or v: guidance is a linear combination, so both work the same way).

Notation: e(c, n) = prediction with text and neighbors, e(c, 0) text only, e(0, n) neighbors only,
e(0, 0) neither.

joint:        e(0,0) + s_t (e(c,0) - e(0,0)) + s_n (e(c,n) - e(c,0))
              = (1 - s_t) e(0,0) + (s_t - s_n) e(c,0) + s_n e(c,n)
interleaved:  (Re-Imagen) per step draw u ~ U(0, 1); if u < eta text guidance
              e(0,n) + s_t (e(c,n) - e(0,n)), else neighbor guidance e(c,0) + s_n (e(c,n) - e(c,0)).

All scales 1 give e(c,n) exactly and all scales 0 give the unconditional term exactly: predictions
with a weight that is a Python 0 are not computed at all. For a model without neighbors (base
text-to-image), e(c,n) = e(c,0), so pass neighbor_scale = text_scale: two predictions per step.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from suti.diffusion.samplers import Denoiser

GUIDANCE_MODES = ("joint", "interleaved")
# model_apply(x_t, t, use_text, use_neighbors) -> output; the flags are Python bools.
ModelApply = Callable[[jax.Array, jax.Array, bool, bool], jax.Array]
# model_apply_batched(x [N], t [N], text_on [N] bool, neighbors_on [N] bool) -> output [N]. The rows are
# k stacked copies of the batch (copy-major), so row j belongs to example j % B.
BatchedModelApply = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

Flags = tuple[bool, bool]  # (use_text, use_neighbors)
FULL, TEXT_ONLY, NEIGHBORS_ONLY, NEITHER = (True, True), (True, False), (False, True), (False, False)


def _is_zero(weight: Any) -> bool:
  """True only for a static (Python) zero, so traced scales still compute every term."""
  return isinstance(weight, (int, float)) and weight == 0


def joint_weights(text_scale: Any, neighbor_scale: Any) -> dict[Flags, Any]:
  """Weights of e(0,0), e(c,0), e(c,n) in joint guidance (they sum to 1)."""
  return {NEITHER: 1 - text_scale, TEXT_ONLY: text_scale - neighbor_scale, FULL: neighbor_scale}


def _check(mode: str, eta: Any) -> None:
  if mode not in GUIDANCE_MODES:
    raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
  if isinstance(eta, (int, float)) and not 0 <= eta <= 1:
    raise ValueError(f"interleave eta must be in [0, 1], got {eta}")


def _interleaved_terms(text_scale: Any, neighbor_scale: Any) -> tuple[dict[Flags, Any], dict[Flags, Any]]:
  """(text-guidance weights, neighbor-guidance weights)."""
  text_guidance = {NEIGHBORS_ONLY: 1 - text_scale, FULL: text_scale}
  neighbor_guidance = {TEXT_ONLY: 1 - neighbor_scale, FULL: neighbor_scale}
  return text_guidance, neighbor_guidance


def _static_choice(eta: Any) -> bool | None:
  """True / False when eta fixes the branch (u ~ U[0, 1) is always < 1, never < 0), else None."""
  if isinstance(eta, (int, float)):
    if eta >= 1:
      return True
    if eta <= 0:
      return False
  return None


def _combine(weights: dict[Flags, Any], predict: Callable[[Flags], jax.Array]) -> jax.Array:
  terms = [(w, predict(flags)) for flags, w in weights.items() if not _is_zero(w)]
  out = terms[0][0] * terms[0][1]
  for w, e in terms[1:]:
    out = out + w * e
  return out


def guided_denoiser(model_apply: ModelApply, mode: str = "joint", text_scale: Any = 1.0,
                    neighbor_scale: Any = 1.0, eta: Any = 0.5) -> Denoiser:
  """A sampler denoiser `(x_t, t, step_rng) -> output` from separate conditional model calls."""
  _check(mode, eta)

  def joint(x_t, t, step_rng):
    cache: dict[Flags, jax.Array] = {}
    return _combine(joint_weights(text_scale, neighbor_scale),
                    lambda f: cache.setdefault(f, model_apply(x_t, t, *f)))

  def interleaved(x_t, t, step_rng):
    text_w, neighbor_w = _interleaved_terms(text_scale, neighbor_scale)
    full = model_apply(x_t, t, *FULL)
    predict = lambda f: full if f == FULL else model_apply(x_t, t, *f)
    static = _static_choice(eta)
    if static is not None:
      return _combine(text_w if static else neighbor_w, predict)
    u = jax.random.uniform(step_rng, ())
    return jax.lax.cond(u < eta, lambda: _combine(text_w, predict), lambda: _combine(neighbor_w, predict))

  return joint if mode == "joint" else interleaved


def _batched_call(model_apply_batched: BatchedModelApply, x_t: jax.Array, t: jax.Array,
                  rows: Sequence[tuple[Any, Any]]) -> list[jax.Array]:
  """One forward over len(rows) stacked copies of the batch; rows are (text_on, neighbors_on)
  flags (Python bools or traced scalars). Returns the per-copy outputs."""
  b, k = x_t.shape[0], len(rows)
  text_on = jnp.concatenate([jnp.full((b,), r[0], jnp.bool_) for r in rows])
  neighbors_on = jnp.concatenate([jnp.full((b,), r[1], jnp.bool_) for r in rows])
  out = model_apply_batched(jnp.concatenate([x_t] * k), jnp.concatenate([t] * k), text_on, neighbors_on)
  return list(jnp.split(out, k))


def _combine_batched(model_apply_batched, x_t, t, weights: dict[Flags, Any]) -> jax.Array:
  live = [(flags, w) for flags, w in weights.items() if not _is_zero(w)]
  outs = _batched_call(model_apply_batched, x_t, t, [flags for flags, _ in live])
  return _combine({flags: w for flags, w in live}, lambda f: outs[[fl for fl, _ in live].index(f)])


def guided_denoiser_batched(model_apply_batched: BatchedModelApply, mode: str = "joint",
                            text_scale: Any = 1.0, neighbor_scale: Any = 1.0, eta: Any = 0.5) -> Denoiser:
  """Like `guided_denoiser`, but all predictions of a step come from one forward pass over the
  batch stacked 1-3 times (faster on accelerators)."""
  _check(mode, eta)

  def joint(x_t, t, step_rng):
    return _combine_batched(model_apply_batched, x_t, t, joint_weights(text_scale, neighbor_scale))

  def interleaved(x_t, t, step_rng):
    text_w, neighbor_w = _interleaved_terms(text_scale, neighbor_scale)
    static = _static_choice(eta)
    if static is not None:
      return _combine_batched(model_apply_batched, x_t, t, text_w if static else neighbor_w)
    if _is_zero(text_w[NEIGHBORS_ONLY]) and _is_zero(neighbor_w[TEXT_ONLY]):
      return model_apply_batched(x_t, t, jnp.ones(t.shape, jnp.bool_), jnp.ones(t.shape, jnp.bool_))
    text_mode = jax.random.uniform(step_rng, ()) < eta
    # Row 2 is e(0,n) under text guidance and e(c,0) under neighbor guidance.
    full, other = _batched_call(model_apply_batched, x_t, t, [FULL, (~text_mode, text_mode)])
    w_full = jnp.where(text_mode, text_scale, neighbor_scale)
    w_other = jnp.where(text_mode, 1 - text_scale, 1 - neighbor_scale)
    return w_other * other + w_full * full

  return joint if mode == "joint" else interleaved


def make_guided_denoiser(model_apply_batched: BatchedModelApply, sample_cfg: Any,
                         has_neighbors: bool = True) -> Denoiser:
  """Batched guided denoiser from a `sample` config (guidance_mode, text_scale, neighbor_scale,
  interleave_eta). Without neighbors only text guidance applies."""
  get = sample_cfg.get if hasattr(sample_cfg, "get") else lambda k, d=None: getattr(sample_cfg, k, d)
  text_scale = float(get("text_scale", 1.0))
  neighbor_scale = float(get("neighbor_scale", 1.0)) if has_neighbors else text_scale
  mode = str(get("guidance_mode", "joint")) if has_neighbors else "joint"
  return guided_denoiser_batched(model_apply_batched, mode, text_scale, neighbor_scale,
                                 float(get("interleave_eta", 0.5)))
