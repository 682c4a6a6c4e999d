"""The checkpoints the repository ships load strictly and match the configs that document them."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from suti.config import load_config
from suti.infer.load_model import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, config, kind, step", [("toy_base", "toy.py", "base", 6000),
                                                      ("toy_suti", "toy_suti.py", "apprentice", 3000)])
def test_shipped_checkpoint_loads_and_matches_its_config(name, config, kind, step):
  loaded = load_model(os.path.join(REPO, "checkpoints", name), kind=kind)
  assert loaded.kind == kind and loaded.step == step
  documented = load_config(os.path.join(REPO, "configs", config))
  # Model, text encoder and diffusion sections decide what the weights mean, sample how they are used by default;
  # a config edit that changes them would silently stop describing the shipped model.
  for section in ("model", "text", "diffusion", "sample"):
    assert loaded.cfg[section].to_dict() == documented[section].to_dict(), section
  assert documented.train.steps == step
  leaves = jax.tree_util.tree_leaves(nnx.state(loaded.model, nnx.Param))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_shipped_apprentice_guides_with_two_rows_per_step_like_plain_sampling():
  """The few-shot speed claim (as fast as text-to-image) rests on equal text and neighbor scales: joint guidance
  then skips the text-only prediction. Count the rows the guided denoiser asks the model for."""
  import jax.numpy as jnp
  from suti.diffusion.guidance import make_guided_denoiser
  loaded = load_model(os.path.join(REPO, "checkpoints", "toy_suti"), kind="apprentice")
  calls = []

  def fake_model(x, t, text_on, neighbors_on):
    calls.append((np.asarray(text_on), np.asarray(neighbors_on)))
    return jnp.zeros_like(x)

  x, t = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,), jnp.int32)
  make_guided_denoiser(fake_model, loaded.cfg.sample)(x, t, jax.random.key(0))
  make_guided_denoiser(fake_model, loaded.cfg.sample, has_neighbors=False)(x, t, jax.random.key(0))
  (fewshot_text, fewshot_neighbors), (plain_text, _) = calls
  assert len(fewshot_text) == len(plain_text) == 2 * x.shape[0]
  np.testing.assert_array_equal(fewshot_text, [False, False, True, True])
  np.testing.assert_array_equal(fewshot_neighbors, [False, False, True, True])
