"""Guided sampling of the whole model: neighbor tokens computed once equal recomputing them every step."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from suti.config import load_config
from suti.diffusion.schedules import make_schedule
from suti.infer.sampling import generate
from suti.models.model import SuTIModel
from suti.models.neighbors import is_neighbor_param

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def apprentice():
  cfg = load_config(os.path.join(ROOT, "configs", "toy_suti.py"),
                    [("sample.steps", "4"), ("sample.sampler", "dpm++")])
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  # Fresh neighbor layers output exactly zero; give them weights so the demos change the sample.
  params = nnx.state(model, is_neighbor_param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree_util.tree_leaves(params))))
  nnx.update(model, jax.tree_util.tree_map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape), params))
  return cfg, model


def _demos(model, seed, b=2, k=3):
  rng = np.random.default_rng(seed)
  s = model.unet_config.image_size
  ids, mask = model.tokenize(["a photo"] * (b * k))
  return {"images": rng.uniform(-1, 1, (b, k, s, s, 3)).astype(np.float32), "ids": ids.reshape(b, k, -1),
          "text_mask": mask.reshape(b, k, -1), "neighbor_mask": np.ones((b, k), bool)}


def test_cached_neighbor_tokens_give_the_same_sample_as_recomputing(apprentice):
  cfg, model = apprentice
  schedule = make_schedule(cfg.diffusion)
  prompts = ["a cup on the beach", "a ball in the snow"]
  demos = _demos(model, 0)
  rng = jax.random.key(7)
  cached = generate(model, schedule, prompts, rng, demos=demos, sample_cfg=cfg.sample)
  recomputed = generate(model, schedule, prompts, rng, demos=demos, sample_cfg=cfg.sample, cache_neighbors=False)
  np.testing.assert_allclose(cached, recomputed, atol=1e-5)
  # And the demos matter, so the equality above is not vacuous.
  other = generate(model, schedule, prompts, rng, demos=_demos(model, 1), sample_cfg=cfg.sample)
  assert np.abs(other - cached).max() > 1e-3


def test_neighbor_scale_zero_ignores_the_demos(apprentice):
  cfg, model = apprentice
  schedule = make_schedule(cfg.diffusion)
  sample_cfg = cfg.sample.copy_and_resolve_references()
  with sample_cfg.unlocked():
    sample_cfg.neighbor_scale = 0.0
  prompts = ["a cup on the beach"]
  a = generate(model, schedule, prompts, jax.random.key(3), demos=_demos(model, 0, b=1), sample_cfg=sample_cfg)
  b = generate(model, schedule, prompts, jax.random.key(3), demos=_demos(model, 5, b=1), sample_cfg=sample_cfg)
  np.testing.assert_allclose(a, b, atol=1e-5)
