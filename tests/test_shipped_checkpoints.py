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
