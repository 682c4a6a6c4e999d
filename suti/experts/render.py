"""Text-to-image rendering with any weights of one base model, compiled once per process.

Experts render the cluster's new prompts (target synthesis) and the base model renders the class-prior images:
both are the same UNet with other weights, so one compiled sampler (suti.infer.sampling.make_sample_fn) serves
every expert; weights go in as nnx pure dicts. Prompts are rendered in fixed-size chunks (the last one padded),
so the program never recompiles for a cluster with another number of prompts.
"""
from __future__ import annotations

import copy
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from suti.diffusion.schedules import make_schedule
from suti.infer.sampling import make_sample_fn
from suti.models.load_weights import unflatten_weights
from suti.models.model import SuTIModel


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (rounded)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Renderer:
  """Samples `cfg`'s model with given flat weights; `sample` overrides (steps, text_scale, ...) the config's."""

  def __init__(self, cfg: mlc.ConfigDict, *, batch_size: int, sample_overrides: Mapping | None = None):
    self.cfg = cfg
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"render batch size must be >= 1, got {batch_size}")
    sample_cfg = copy.deepcopy(cfg.sample)
    with sample_cfg.unlocked():
      for key, value in (sample_overrides or {}).items():
        if key not in sample_cfg:
          raise ValueError(f"unknown sample setting {key!r}; known: {', '.join(sample_cfg)}")
        sample_cfg[key] = value
    self.sample_cfg = sample_cfg
    model = SuTIModel(cfg, rngs=nnx.Rngs(0))
    self._tokenize = model.tokenize
    self.graphdef, _ = nnx.split(model)
    m = cfg.model
    self._fn = make_sample_fn(self.graphdef, make_schedule(cfg.diffusion), sample_cfg, cfg.diffusion.prediction,
                              (int(m.image_size), int(m.image_size), int(m.out_channels)))

  def render(self, weights: Mapping[str, np.ndarray], prompts: list[str], seed: int) -> np.ndarray:
    """uint8 [len(prompts), S, S, 3]: one image per prompt; chunk i draws from fold_in(key(seed), i)."""
    if not prompts:
      return np.zeros((0,) + (int(self.cfg.model.image_size),) * 2 + (3,), np.uint8)
    state = jax.tree.map(jnp.asarray, unflatten_weights(weights))
    key = jax.random.key(seed)
    out = []
    for i, start in enumerate(range(0, len(prompts), self.batch_size)):
      chunk = list(prompts[start:start + self.batch_size])
      real = len(chunk)
      chunk += [chunk[-1]] * (self.batch_size - real)
      ids, mask = self._tokenize(chunk)
      images = self._fn(state, jnp.asarray(ids), jnp.asarray(mask), None, jax.random.fold_in(key, i))
      out.append(to_uint8(jax.device_get(images))[:real])
    return np.concatenate(out)
