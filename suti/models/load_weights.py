"""Copying weights into a model by path: the SuTI apprentice from its base text-to-image model (a base UNet in
memory, or a base run's checkpoint through `train.init_from`).

Every given weight goes into the same path of the model; paths only the model has must be neighbor layers
(zero-initialised output projections, so the apprentice starts as exactly the base model). Anything else
missing, extra, or of another shape is a clear error.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from suti.core.tree_paths import flatten_dict
from suti.models.neighbors import is_neighbor_param


def load_weights(model: nnx.Module, weights: Mapping[str, Any], source: str = "init_from", *,
                 strict: bool = False) -> int:
  """Copies `weights` (nested dict or flat {'a/b/kernel': array}) into `model` in place; returns how many arrays
  were copied. Paths the model has but `weights` lacks are allowed only for neighbor layers, and not at all with
  strict=True (loading a trained apprentice). `source` names where the weights come from in error messages."""
  flat = flatten_dict(weights)
  loaded = 0
  missing = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = "/".join(map(str, path))
    if name not in flat:
      if strict or not is_neighbor_param(path):
        missing.append(name)
      continue
    value = np.asarray(flat.pop(name))
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"{source}: shape mismatch for {name}: {tuple(value.shape)} given, "
                       f"model {tuple(variable.shape)}")
    variable.set_value(jnp.asarray(value, variable.get_value().dtype))
    loaded += 1
  if missing:
    raise ValueError(f"{source}: {len(missing)} weights of this model are not given, e.g. {missing[0]} "
                     "(is it a run of another config?)")
  if flat:
    raise ValueError(f"{source}: {len(flat)} given weights have no place in this model, e.g. {next(iter(flat))}")
  return loaded
