"""One sampler for every caller: few-shot and text-to-image generation, evaluation, and the experts' renders.

`Sampler` wraps suti.infer.sampling.make_sample_fn, compiled once per sampler: the text embeddings and the
neighbor tokens are computed once per call inside the same XLA program as the sampler loop. Rows (a prompt, and
its demos when there are any) go through in chunks of a fixed batch size, the last one padded, so the program
never recompiles for another number of prompts. Its weights are the loaded model's, or given per call: the
experts are the same UNet with other weights, so one compiled program serves every expert of a run. Without demos
an apprentice samples text-only (the neighbor rows of guidance are off), its own text-to-image mode: it was
trained with the neighbors dropped some of the time.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from suti.core.image_ops import to_uint8
from suti.core.tree_paths import unflatten_weights
from suti.diffusion.sample_settings import sample_settings
from suti.diffusion.schedules import make_schedule
from suti.infer.demos import demo_batch
from suti.infer.load_model import LoadedModel
from suti.infer.sampling import make_sample_fn
from suti.models.model import SuTIModel


class Sampler:
  """Samples one model graph with fixed sampler settings, `batch_size` rows per compiled call."""

  def __init__(self, cfg: mlc.ConfigDict, model: SuTIModel, *, batch_size: int = 8,
               sample_overrides: Mapping | None = None):
    if int(batch_size) < 1:
      raise ValueError(f"batch size must be >= 1, got {batch_size}")
    self.cfg = cfg
    self.batch_size = int(batch_size)
    self.sample_cfg = sample_settings(cfg.sample, sample_overrides)
    self.graphdef, self.state = nnx.split(model)
    self._tokenize: Callable = model.tokenize
    self.image_size = model.image_size  # pixels; the UNet denoises latents of noise_shape for a latent model
    self.noise_shape = model.noise_shape
    self._fn = make_sample_fn(self.graphdef, make_schedule(cfg.diffusion), self.sample_cfg,
                              cfg.diffusion.prediction, self.noise_shape)

  @classmethod
  def for_loaded(cls, loaded: LoadedModel, **kwargs) -> "Sampler":
    """A sampler of a loaded checkpoint's weights (few-shot, text-to-image, evaluation)."""
    return cls(loaded.cfg, loaded.model, **kwargs)

  @classmethod
  def for_config(cls, cfg: mlc.ConfigDict, **kwargs) -> "Sampler":
    """A sampler of `cfg`'s model whose weights come with each call (experts: `sample(..., weights=...)`)."""
    return cls(cfg, SuTIModel(cfg, rngs=nnx.Rngs(0)), **kwargs)

  @property
  def max_neighbors(self) -> int:
    return int(self.cfg.model.num_neighbors)

  def sample(self, prompts: Sequence[str], seed: int, *, demos: Sequence[Sequence[np.ndarray]] | None = None,
             demo_captions: Sequence[Sequence[str]] | None = None, weights: Mapping[str, Any] | None = None,
             init_noise: np.ndarray | None = None, progress=None) -> np.ndarray:
    """uint8 [len(prompts), S, S, 3]. demos: per prompt its demo images (uint8, any size), or None for text-only;
    demo_captions: per prompt one caption per demo; weights: flat {'a/b/kernel': array} replacing the model's for
    this call; init_noise: x_T per prompt ([len(prompts), *noise_shape] float32, NHWC), else chunk i draws it
    from fold_in(key(seed), i)."""
    prompts = list(prompts)
    if init_noise is not None:
      init_noise = np.asarray(init_noise, np.float32)
      if init_noise.shape != (len(prompts),) + self.noise_shape:
        raise ValueError(f"initial noise of shape {init_noise.shape}: this model starts from "
                         f"{(len(prompts),) + self.noise_shape} ({len(prompts)} images x {self.noise_shape}, NHWC)")
    if demos is not None:
      if self.max_neighbors == 0:
        raise ValueError("this is a base text-to-image model: it takes no demos")
      if len(demos) != len(prompts) or demo_captions is None or len(demo_captions) != len(prompts):
        raise ValueError(f"need demos and demo captions for each of the {len(prompts)} prompts")
    state = self.state if weights is None else jax.tree.map(jnp.asarray, unflatten_weights(weights))
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
      x_T = None if init_noise is None else jnp.asarray(init_noise[np.asarray(rows)])
      images = self._fn(state, jnp.asarray(ids), jnp.asarray(mask), batch_demos, jax.random.fold_in(key, i), x_T)
      out.append(to_uint8(jax.device_get(images))[:real])
      if progress is not None:
        progress.update(real)
    if not out:
      return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    return np.concatenate(out)

  def render(self, weights: Mapping[str, Any], prompts: Sequence[str], seed: int) -> np.ndarray:
    """An expert's renders: `sample(prompts, seed, weights=weights)`, text-to-image."""
    return self.sample(prompts, seed, weights=weights)
