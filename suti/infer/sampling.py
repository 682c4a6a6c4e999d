"""Sampling a SuTIModel with classifier-free guidance, computing everything that does not depend on x_t once.

Text embeddings (prompt and empty prompt) and the neighbor tokens do not depend on x_t or t, so one generation
computes them once and every sampler step reuses them; `cache_neighbors=False` recomputes the neighbor tokens
inside every step instead (the slow reference the tests compare against).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from suti.diffusion.guidance import make_guided_denoiser
from suti.diffusion.samplers import sample as run_sampler
from suti.diffusion.schedules import Schedule
from suti.diffusion.thresholding import make_x0_fn
from suti.models.model import SuTIModel, null_text
from suti.models.neighbors import NeighborTokens


def _tile(x: jax.Array, copies: int) -> jax.Array:
  return jnp.concatenate([x] * copies) if copies > 1 else x


def _rows(on: jax.Array, yes: jax.Array, no: jax.Array) -> jax.Array:
  return jnp.where(on.reshape(on.shape + (1,) * (yes.ndim - 1)), yes, no)


def make_model_apply(model: SuTIModel, ids: jax.Array, mask: jax.Array, demos: dict | None,
                     cache_neighbors: bool = True):
  """Builds `apply(x[N], t[N], text_on[N], neighbors_on[N])` for guided sampling of a batch of B prompts.

  N is a multiple of B (guidance stacks copies of the batch); row j belongs to example j % B.
  demos: None, or dict(images [B,K,H,W,C], ids / text_mask [B,K,L], neighbor_mask [B,K]).
  """
  b = ids.shape[0]
  null_ids, null_mask = (jnp.asarray(a) for a in null_text(model, b))
  emb_c, mask_c, pooled_c = model.encode_text(ids, mask)
  emb_0, mask_0, pooled_0 = model.encode_text(null_ids, null_mask)

  def neighbor_tokens() -> NeighborTokens | None:
    if demos is None:
      return None
    return model.encode_neighbors(demos["images"], demos["ids"], demos["text_mask"], demos["neighbor_mask"])

  cached = neighbor_tokens() if cache_neighbors else None

  def apply(x, t, text_on, neighbors_on):
    copies = x.shape[0] // b
    context = _rows(text_on, _tile(emb_c, copies), _tile(emb_0, copies))
    context_mask = _rows(text_on, _tile(mask_c, copies), _tile(mask_0, copies))
    pooled = _rows(text_on, _tile(pooled_c, copies), _tile(pooled_0, copies))
    tokens = cached if cache_neighbors else neighbor_tokens()
    if tokens is not None:
      tokens = NeighborTokens(tokens=_tile(tokens.tokens, copies),
                              mask=_tile(tokens.mask, copies) & neighbors_on[:, None])
    return model.unet(x, t, context, context_mask, neighbors=tokens, pooled_text=pooled)

  return apply


def make_sample_fn(graphdef: nnx.GraphDef, schedule: Schedule, sample_cfg: Any, prediction: str,
                   image_shape: tuple[int, int, int], cache_neighbors: bool = True):
  """Compiles once: fn(state, ids, mask, demos | None, rng, x_T=None) -> images [B,H,W,3] in [-1, 1] (jitted).

  image_shape is what the UNet denoises (latents for a latent model); x_T, when given, is the start of the
  chain ([B, *image_shape]; else drawn from rng). The sampler loop, the guidance, the text encoding, (when
  cached) the neighbor encoding and the model's `decode` all live in one XLA program: one dispatch.
  """
  x0_fn = make_x0_fn(float(sample_cfg.dynamic_threshold))

  def run(state, ids, mask, demos, rng, x_T=None):
    model = nnx.merge(graphdef, state)
    apply = make_model_apply(model, ids, mask, demos, cache_neighbors)
    denoise = make_guided_denoiser(apply, sample_cfg, has_neighbors=demos is not None)
    noise_rng, sample_rng = jax.random.split(rng)
    if x_T is None:
      x_T = jax.random.normal(noise_rng, (ids.shape[0],) + tuple(image_shape), jnp.float32)
    x0 = run_sampler(denoise, x_T, sample_rng, schedule, int(sample_cfg.steps), sampler=sample_cfg.sampler,
                     prediction=prediction, x0_fn=x0_fn)
    return model.decode(x0)

  return jax.jit(run)


def generate(model: SuTIModel, schedule: Schedule, prompts: list[str], rng: jax.Array, *,
             demos: dict | None = None, sample_cfg: Any, prediction: str = "eps",
             cache_neighbors: bool = True) -> np.ndarray:
  """Samples one image per prompt; returns float32 [B,H,W,3] in [-1, 1] (decoded, for a latent model).

  sample_cfg: the config's `sample` section (sampler, steps, text_scale, neighbor_scale, guidance_mode,
  interleave_eta, dynamic_threshold). demos as in make_model_apply (images already resized to the model).
  For repeated generation, build the compiled function once with make_sample_fn.
  """
  ids, mask = (jnp.asarray(a) for a in model.tokenize(prompts))
  graphdef, state = nnx.split(model)
  fn = make_sample_fn(graphdef, schedule, sample_cfg, prediction, model.noise_shape, cache_neighbors)
  return np.asarray(fn(state, ids, mask, demos, rng))
