"""Names of pytree leaves: how sharding rules match parameters and how checkpoints key their arrays.

A leaf's jax.tree_util path becomes string keys ('unet', 'down_blocks', '0', ..., 'kernel'); an nnx.Variable's
trailing `.value` is dropped, so the names are those of `nnx.state(model)` (and of nnx pure dicts).
"""
from __future__ import annotations

from typing import Any

import jax


def key_name(entry: Any) -> str:
  """One jax.tree_util path entry as a string key."""
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_names(path: tuple) -> tuple[str, ...]:
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return tuple(key_name(k) for k in path)


def path_string(path: tuple) -> str:
  """'unet/down_blocks/0/resnets/0/conv1/kernel': what mesh.rules regexes are matched against."""
  return "/".join(path_names(path))
