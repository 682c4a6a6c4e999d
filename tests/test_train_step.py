"""The split-once train step: it learns (loss falls on a fixed batch) for the base model and the apprentice."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared_fixtures import tiny_config
from suti.config import load_config
from suti.diffusion.schedules import make_schedule
from suti.models.model import SuTIModel
from suti.train.step import build_trainer, check_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """Structured images (a coloured square on a coloured background), easier than noise to fit."""
  out = np.empty((n, size, size, 3), np.float32)
  for i in range(n):
    out[i] = rng.uniform(-1, 1, 3)
    y, x = rng.integers(0, size // 2, 2)
    out[i, y:y + size // 2, x:x + size // 2] = rng.uniform(-1, 1, 3)
  return out


def _batch(model, cfg, n=8, k=0, seed=0):
  rng = np.random.default_rng(seed)
  size = cfg.model.image_size
  ids, mask = model.tokenize([f"a red cup number {i}" for i in range(n)])
  batch = {"images": _images(rng, n, size), "ids": ids, "text_mask": mask}
  if k:
    nids, nmask = model.tokenize([f"photo {i}" for i in range(n * k)])
    batch.update(neighbor_images=_images(rng, n * k, size).reshape(n, k, size, size, 3),
                 neighbor_ids=nids.reshape(n, k, -1), neighbor_text_mask=nmask.reshape(n, k, -1),
                 neighbor_mask=np.ones((n, k), bool))
  return {key: jnp.asarray(v) for key, v in batch.items()}


@pytest.mark.parametrize("config,k", [("toy.py", 0), ("toy_suti.py", 3)])
def test_few_dozen_steps_lower_the_loss_on_a_fixed_batch(config, k):
  cfg = tiny_config(config, [("train.lr", "2e-3"), ("train.warmup_steps", "0"), ("train.steps", "40")])
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  schedule = make_schedule(cfg.diffusion)
  graphdef, state, step = build_trainer(cfg, model, schedule)
  batch = _batch(model, cfg, k=k)
  check_batch(batch, model.num_neighbors)

  # The same rng at both ends: same t, noise and dropout draws, so the two losses are comparable.
  eval_rng = jax.random.key(123)
  eval_losses = []
  for i in range(40):
    rng = eval_rng if i in (0, 39) else jax.random.key(i)
    state, metrics = step(state, batch, rng)
    if i in (0, 39):
      eval_losses.append(float(metrics["loss"]))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(state.step) == 40
  assert eval_losses[1] < 0.8 * eval_losses[0], eval_losses


def test_batch_errors_are_clear():
  cfg = load_config(os.path.join(ROOT, "configs", "toy.py"))
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  apprentice_batch = _batch(SuTIModel(load_config(os.path.join(ROOT, "configs", "toy_suti.py")),
                                      rngs=nnx.Rngs(0)), cfg, n=2, k=2)
  with pytest.raises(ValueError, match="model has none"):
    check_batch(apprentice_batch, model.num_neighbors)
  with pytest.raises(ValueError, match="more than model.num_neighbors = 1"):
    check_batch(apprentice_batch, 1)
  with pytest.raises(ValueError, match="missing 'ids'"):
    check_batch({"images": apprentice_batch["images"]}, 0)
