"""Paths of tree leaves: how sharding rules match parameters, how checkpoints and weight files key their arrays.

A leaf's jax.tree_util path becomes string keys ('unet', 'down_blocks', '0', ..., 'kernel'); an nnx.Variable's
trailing `.value` is dropped, so the names are those of `nnx.state(model)` (and of nnx pure dicts).
"""
from __future__ import annotations

from typing import Any, Mapping

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


def flatten_paths(tree: Any, branch_types: tuple[type, ...] = (Mapping,)) -> dict[tuple[str, ...], Any]:
  """Nested mappings -> {('a', 'b', 'kernel'): leaf}, keys as strings; an empty mapping has no leaves."""
  flat: dict[tuple[str, ...], Any] = {}

  def walk(node: Any, prefix: tuple[str, ...]) -> None:
    if isinstance(node, branch_types):
      for key, value in node.items():
        walk(value, prefix + (str(key),))
    else:
      flat[prefix] = node

  walk(tree, ())
  return flat


def flatten_dict(tree: Any, sep: str = "/", branch_types: tuple[type, ...] = (Mapping,)) -> dict[str, Any]:
  """Nested mappings -> {'a/b/kernel': leaf} (or 'a.b.c' with sep='.'): weights files, config fingerprints."""
  return {sep.join(path): leaf for path, leaf in flatten_paths(tree, branch_types).items()}


def unflatten_weights(flat: Mapping[str, Any]) -> dict:
  """{'a/b/0/kernel': array} -> the nnx pure dict {'a': {'b': {0: {'kernel': array}}}} (digit keys as ints)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    parts = [int(p) if p.isdigit() else p for p in path.split("/")]
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return tree
