"""Parameter sharding by rules: which arrays of the train state are split over the `fsdp` mesh axis.

Rules come from the config (`mesh.rules`: (regex over the parameter path, "fsdp" | "replicate"), first match
wins). Without a matching rule, an array with at least `mesh.fsdp_min_size` elements is sharded over `fsdp` along
its largest dimension divisible by the axis size; smaller arrays (biases, norms, scalars) are replicated. The same
function lays out parameters, EMA weights and optimizer moments, so each moment lives where its parameter lives.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections as mlc
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from suti.core.tree_paths import path_string

ACTIONS = ("fsdp", "replicate")


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest dimension that `fsdp` divides (the last such one on ties); replicated if none."""
  best = None
  for dim, size in enumerate(shape):
    if size % fsdp == 0 and (best is None or size >= shape[best]):
      best = dim
  if best is None:
    return P()
  return P(*[("fsdp" if dim == best else None) for dim in range(len(shape))])


def compile_rules(cfg_mesh: mlc.ConfigDict) -> list[tuple[re.Pattern, str]]:
  rules = []
  for rule in cfg_mesh.get("rules", ()):
    if len(rule) != 2 or rule[1] not in ACTIONS:
      raise ValueError(f"mesh.rules entries are (regex, one of {ACTIONS}), got {rule!r}")
    rules.append((re.compile(rule[0]), rule[1]))
  return rules


def spec_for(path: str, shape: tuple[int, ...], fsdp: int, rules, min_size: int) -> P:
  if fsdp == 1 or len(shape) == 0:
    return P()
  for pattern, action in rules:
    if pattern.search(path):
      return fsdp_spec(shape, fsdp) if action == "fsdp" else P()
  size = 1
  for s in shape:
    size *= s
  return fsdp_spec(shape, fsdp) if size >= min_size else P()


def tree_shardings(tree: Any, mesh: Mesh, cfg_mesh: mlc.ConfigDict) -> Any:
  """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs), by the rules above."""
  rules = compile_rules(cfg_mesh)
  fsdp = mesh.shape["fsdp"]
  min_size = int(cfg_mesh.get("fsdp_min_size", 2**14))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_for(path_string(path), tuple(leaf.shape), fsdp, rules, min_size)),
      tree)


def describe(shardings: Any, tree: Any) -> dict[str, int]:
  """How many elements are sharded vs replicated: a one-line summary for the log."""
  counts = {"sharded": 0, "replicated": 0}
  for sharding, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(tree)):
    n = 1
    for s in leaf.shape:
      n *= s
    counts["sharded" if any(a is not None for a in sharding.spec) else "replicated"] += n
  return counts
