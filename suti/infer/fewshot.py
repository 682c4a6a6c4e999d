"""Few-shot sampling with a trained apprentice, compiled once and reused for any number of prompts and subjects.

`FewShotSampler` wraps suti.infer.sampling.make_sample_fn: the text embeddings and the neighbor tokens are
computed once per call inside the same XLA program as the sampler loop. Rows (prompt + its demos) go through in
chunks of a fixed batch size (the last one padded), so the program compiles once per sampler, whatever the
number of rows. Without demos the same model samples text-only (the neighbor rows of guidance are off), which is
the apprentice's own text-to-image mode: it was trained with the neighbors dropped some of the time.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from suti.diffusion.schedules import make_schedule
from suti.experts.render import to_uint8
from suti.infer.demos import demo_batch
from suti.infer.load_model import LoadedModel
from suti.infer.sampling import make_sample_fn

def sample_settings(cfg_sample, overrides: Mapping | None):
  """The config's sample section with the given settings replaced (None values keep the config's)."""
  sample_cfg = copy.deepcopy(cfg_sample)
  with sample_cfg.unlocked():
    for key, value in (overrides or {}).items():
      if value is None:
        continue
      if key not in sample_cfg:
        raise ValueError(f"unknown sample setting {key!r}; known: {', '.join(sample_cfg)}")
      sample_cfg[key] = type(sample_cfg[key])(value)
  if sample_cfg.sampler not in ("ddpm", "ddim", "dpm++"):
    raise ValueError(f"sampler must be ddpm, ddim or dpm++, got {sample_cfg.sampler!r}")
  if int(sample_cfg.steps) < 1:
    raise ValueError(f"steps must be >= 1, got {sample_cfg.steps}")
  return sample_cfg


class FewShotSampler:
  """Samples a loaded model (apprentice or base) with fixed sampler settings, `batch_size` rows per call."""

  def __init__(self, loaded: LoadedModel, *, batch_size: int = 8, sample_overrides: Mapping | None = None):
    if batch_size < 1:
      raise ValueError(f"batch size must be >= 1, got {batch_size}")
    self.loaded = loaded
    self.batch_size = int(batch_size)
    cfg = loaded.cfg
    self.sample_cfg = sample_settings(cfg.sample, sample_overrides)
    self.graphdef, self.state = nnx.split(loaded.model)
    m = cfg.model
    self._fn = make_sample_fn(self.graphdef, make_schedule(cfg.diffusion), self.sample_cfg,
                              cfg.diffusion.prediction, (int(m.image_size), int(m.image_size), int(m.out_channels)))
    self._tokenize: Callable = loaded.model.tokenize

  @property
  def image_size(self) -> int:
    return self.loaded.image_size

  @property
  def max_neighbors(self) -> int:
    return int(self.loaded.cfg.model.num_neighbors)

  def sample(self, prompts: Sequence[str], seed: int, *, demos: Sequence[Sequence[np.ndarray]] | None = None,
             demo_captions: Sequence[Sequence[str]] | None = None, progress=None) -> np.ndarray:
    """uint8 [len(prompts), S, S, 3]. demos: per prompt its demo images (uint8, any size), or None for text-only;
    demo_captions: per prompt one caption per demo. Chunk i draws from fold_in(key(seed), i)."""
    prompts = list(prompts)
    if demos is not None:
      if self.max_neighbors == 0:
        raise ValueError("this is a base text-to-image model: it takes no demos")
      if len(demos) != len(prompts) or demo_captions is None or len(demo_captions) != len(prompts):
        raise ValueError(f"need demos and demo captions for each of the {len(prompts)} prompts")
    key = jax.random.key(int(seed))
    out = []
    for i, start in enumerate(range(0, len(prompts), self.batch_size)):
      rows = list(range(start, min(start + self.batch_size, len(prompts))))
      real = len(rows)
      rows += [rows[-1]] * (self.batch_size - real)  # padding rows: same program, results dropped
      ids, mask = self._tokenize([prompts[r] for r in rows])
      batch_demos = None
      if demos is not None:
        batch_demos = demo_batch([demos[r] for r in rows], [demo_captions[r] for r in rows],
                                 image_size=self.image_size, max_neighbors=self.max_neighbors,
                                 tokenize=self._tokenize)
        batch_demos = {k: jnp.asarray(v) for k, v in batch_demos.items()}
      images = self._fn(self.state, jnp.asarray(ids), jnp.asarray(mask), batch_demos, jax.random.fold_in(key, i))
      out.append(to_uint8(jax.device_get(images))[:real])
      if progress is not None:
        progress.update(real)
    if not out:
      return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    return np.concatenate(out)
