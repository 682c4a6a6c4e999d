"""Orbax checkpoints of the training state: async saves, keep-N, exact restore, fallback past corrupt steps.

Layout of one step directory `<workdir>/checkpoints/<step>/` (one Orbax item per part, so each part can be read
alone):
  params/, ema/, frozen/, opt_state/   the TrainState fields of those names, each a nested dict of arrays
  extra/                               every other leaf of the state (step, rng key data, input positions, ...)
  meta/                                the JSON-able `meta` dict (config, input position, ...)

The state is stored as plain nested dicts keyed by its jax.tree_util path (Variable wrappers, optax namedtuples
and dataclass fields become string keys), and rebuilt on restore with the abstract state's treedef. So Orbax
never has to understand nnx.State or optax types, and `load_params` reads the weights without knowing the
optimizer.

A checkpoint whose metadata or data cannot be read is "corrupt": `restore` warns, renames its directory to
`<step>.corrupt` (Orbax no longer lists it; the step number can be saved again) and tries the previous step. A
checkpoint that is readable but does not match the abstract state (another model config) is the caller's error:
ValueError, and nothing is moved.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from suti.core.tree_paths import flatten_paths, path_names
from suti.diffusion.schedules import SAMPLING_DEFAULTS

OWN_ITEMS = ("params", "ema", "frozen", "opt_state")  # TrainState fields stored as their own Orbax item
EXTRA_ITEM = "extra"  # every other leaf of the state
META_ITEM = "meta"
WEIGHT_ITEMS = ("params", "ema", "frozen")
CORRUPT_SUFFIX = ".corrupt"

log = logging.getLogger(__name__)

Path = tuple[str, ...]


def _item_and_path(names: Path) -> tuple[str, Path]:
  """Which Orbax item a leaf goes to, and its path inside that item."""
  if len(names) > 1 and names[0] in OWN_ITEMS:
    return names[0], names[1:]
  return EXTRA_ITEM, names or ("root",)


def _leaf_paths(tree: Any) -> tuple[list[tuple[str, Path]], list[Any], Any]:
  """(item, path) per leaf, the leaves, and the treedef: how a state is split into items and rebuilt."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  where = [_item_and_path(path_names(path)) for path, _ in with_paths]
  if len(set(where)) != len(where):
    raise ValueError("state has two leaves with the same path once keys are strings; rename one of them")
  return where, [leaf for _, leaf in with_paths], treedef


def _nest(where: list[tuple[str, Path]], leaves: list[Any]) -> dict[str, dict]:
  """{item: nested dict} from per-leaf (item, path)."""
  items: dict[str, dict] = {}
  for (item, path), leaf in zip(where, leaves):
    node = items.setdefault(item, {})
    for name in path[:-1]:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"state path {item}/{'/'.join(path)} is both a leaf and a subtree")
    if path[-1] in node:
      raise ValueError(f"state path {item}/{'/'.join(path)} is both a leaf and a subtree")
    node[path[-1]] = leaf
  return items


def _lookup(tree: dict, path: Path) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _host_value(leaf: Any) -> Any:
  """Arrays stay as they are (sharded arrays are saved shard by shard); Python / numpy scalars become arrays."""
  return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct | np.ndarray:
  """What Orbax restores a leaf as: a jax.Array with the given sharding, or a host numpy array for numpy leaves
  (int64 input positions stay int64 without jax_enable_x64)."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return np.asarray(leaf)


class CorruptCheckpoint(Exception):
  """A step directory whose metadata or data cannot be read."""


def _leaf_handlers(replica_parallel: bool) -> Any:
  """Orbax's standard leaf handlers, with replica-parallel array writes only when asked for.

  Replica-parallel saving splits every replicated array into one slice per device so that hosts write different
  parts. In one process that buys nothing and costs one small device op per array and device (a compile per new
  slice shape): the toy apprentice's state on 8 CPU devices saves in 19.0 s that way, 2.2 s whole
  (benchmarks/checkpoint_save.py). Orbax's own default turns it off only on GPU platforms.
  """
  th = ocp.type_handlers
  defaults = [(ty, th.get_type_handler(ty)) for ty in th.supported_types() if ty is not jax.Array]
  return th.create_type_handler_registry(*defaults,
                                         (jax.Array, th.ArrayHandler(use_replica_parallel=replica_parallel)))


def _handler_registry(replica_parallel: bool) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Every item this module writes, known up front: a restarted run restores before it ever saves."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  leaf_handlers = _leaf_handlers(replica_parallel)
  for name in OWN_ITEMS + (EXTRA_ITEM,):
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=leaf_handlers)
    registry.add(name, ocp.args.PyTreeSave, handler)
    registry.add(name, ocp.args.PyTreeRestore, handler)
  json_handler = ocp.JsonCheckpointHandler()
  registry.add(META_ITEM, ocp.args.JsonSave, json_handler)
  registry.add(META_ITEM, ocp.args.JsonRestore, json_handler)
  return registry


class Checkpointer:
  """Saves and restores the trainer's state under `directory` (= <workdir>/checkpoints)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, replica_parallel: bool | None = None):
    """replica_parallel: write replicated arrays in slices spread over their replicas (None: only when several
    processes run, where it spreads the writing over hosts)."""
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    # cleanup_tmp_directories: a run killed mid-save leaves a `<step>.orbax-checkpoint-tmp-*` folder; the next
    # run removes it (Orbax never lists it as a step).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry(
        jax.process_count() > 1 if replica_parallel is None else replica_parallel))
    self._barriers = 0  # Orbax barrier names must be unique

  # ---- saving
  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> None:
    """Starts saving `state` and `meta` as `step`; returns once the arrays are off device (async).

    A step that already exists is left as it is (a final save right after a periodic one), unless force=True,
    which replaces it. A save waits for the previous one to finish first.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"checkpoint step must be >= 0, got {step}")
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as err:
      raise ValueError(f"checkpoint meta must be JSON-able: {err}") from None
    if step in self._manager.all_steps():
      if not force:
        log.info("checkpoint step %d already exists; not saved again", step)
        return
      self._manager.wait_until_finished()
      self._manager.delete(step)
    where, leaves, _ = _leaf_paths(state)
    items = _nest(where, [_host_value(leaf) for leaf in leaves])
    args = {name: ocp.args.PyTreeSave(tree) for name, tree in items.items()}
    args[META_ITEM] = ocp.args.JsonSave(dict(meta))
    # force: the trainer decides when to save, not Orbax's save-interval policy.
    self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self) -> None:
    """Blocks until every started save is durable on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # ---- restoring
  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of `step` (None: the latest readable one), with the shardings of `abstract_state`.

    With step None, corrupt checkpoints met on the way are warned about, moved aside and skipped; None when
    nothing is readable (or there is no checkpoint). An explicit step that is missing or corrupt: ValueError.
    A readable checkpoint whose tree, shapes or dtypes differ from `abstract_state`: ValueError.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    where, leaves, treedef = _leaf_paths(abstract_state)
    abstract_items = _nest(where, [_abstract(leaf) for leaf in leaves])
    if step is not None and int(step) not in self._manager.all_steps():
      raise ValueError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    candidates = [int(step)] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    for candidate in candidates:
      try:
        restored, meta = self._restore_step(candidate, abstract_items)
      except CorruptCheckpoint as err:
        if step is not None:  # the caller asked for this one: no silent substitute, nothing moved
          raise ValueError(f"checkpoint step {step} in {self.directory} is corrupt ({err})") from None
        self._set_aside(candidate, str(err))
        continue
      state = jax.tree_util.tree_unflatten(treedef, [_lookup(restored[item], path) for item, path in where])
      return candidate, state, meta
    if candidates:
      warnings.warn(f"no readable checkpoint left in {self.directory}; starting from scratch", stacklevel=2)
    return None

  def _restore_step(self, step: int, abstract_items: dict[str, dict]) -> tuple[dict, dict]:
    """Reads one step; CorruptCheckpoint when unreadable, ValueError when it does not match the state."""
    ok, failure = True, ""
    try:
      saved = self._saved_items(step)
      missing = sorted(set(abstract_items) - set(saved))
      if missing:
        raise _Mismatch(f"checkpoint step {step} in {self.directory} has no {missing} "
                         f"(it holds {sorted(saved)}); was it written by another kind of run?")
      for name, abstract in abstract_items.items():
        _check_matches(step, name, saved[name], abstract)
      args = {name: ocp.args.PyTreeRestore(tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
              for name, tree in abstract_items.items()}
      args[META_ITEM] = ocp.args.JsonRestore()
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
      meta = restored[META_ITEM]
      if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"meta is {type(meta).__name__}, not a JSON object")
      result = {name: restored[name] for name in abstract_items}
    except ValueError as err:
      if isinstance(err, _Mismatch):
        raise ValueError(str(err)) from None
      ok, failure = False, _one_line(err)
    except Exception as err:  # noqa: BLE001 -- any read failure (tensorstore, OSError, JSON) means corrupt
      ok, failure = False, _one_line(err)
    if not _all_processes_agree(ok):
      raise CorruptCheckpoint(failure or "unreadable on another process")
    return result, meta

  def _saved_items(self, step: int) -> dict[str, Any]:
    """{item name: tree metadata} of the array items the step directory says it holds.

    Read with a handler of our own: a fresh CheckpointManager (a restarted run) knows no item handlers before
    its first save, and its item_metadata would be None for every item.
    """
    handlers = self._manager.metadata(step).item_handlers or {}
    if META_ITEM not in handlers:
      raise CorruptCheckpoint("step metadata is missing or lists no meta item")
    step_dir = self.directory / str(step)
    return {name: _item_tree_metadata(step_dir / name) for name in handlers if name != META_ITEM}

  def _set_aside(self, step: int, reason: str) -> None:
    """Warns and renames a corrupt step directory (primary host only) so Orbax stops listing it."""
    source = self.directory / str(step)
    target = _free_name(self.directory, f"{step}{CORRUPT_SUFFIX}")
    message = f"checkpoint step {step} is corrupt ({reason}); moved to {target.name}, falling back"
    warnings.warn(message, stacklevel=3)
    log.warning(message)
    if jax.process_index() == 0 and source.exists():
      source.rename(target)
    if jax.process_count() > 1:
      self._barriers += 1
      ocp.multihost.sync_global_processes(f"suti_checkpoint_set_aside_{step}_{self._barriers}")
    self._manager.reload()


class _Mismatch(ValueError):
  """A readable checkpoint that does not fit the abstract state (never treated as corrupt)."""


def _check_matches(step: int, item: str, saved: Any, abstract: dict) -> None:
  saved_flat = flatten_paths(saved, (dict,))
  wanted = flatten_paths(abstract, (dict,))
  if set(saved_flat) != set(wanted):
    only_saved = sorted(set(saved_flat) - set(wanted))[:3]
    only_wanted = sorted(set(wanted) - set(saved_flat))[:3]
    raise _Mismatch(f"checkpoint step {step} item '{item}' does not match the state: only in checkpoint "
                    f"{['/'.join(p) for p in only_saved]}, only in state {['/'.join(p) for p in only_wanted]}")
  for path, want in wanted.items():
    got = saved_flat[path]
    shape = tuple(getattr(got, "shape", ()) or ())
    if shape != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
      raise _Mismatch(f"checkpoint step {step} {item}/{'/'.join(path)} is {shape} {np.dtype(got.dtype)}, "
                      f"the state wants {tuple(want.shape)} {np.dtype(want.dtype)}")


def _one_line(err: BaseException) -> str:
  text = " ".join(str(err).split()) or type(err).__name__
  if isinstance(err, CorruptCheckpoint):
    return text[:200]
  return f"{type(err).__name__}: {text[:200]}"


def _free_name(directory: epath.Path, name: str) -> epath.Path:
  target, n = directory / name, 1
  while target.exists():
    target, n = directory / f"{name}-{n}", n + 1
  return target


def _all_processes_agree(ok: bool) -> bool:
  """True only when every process read its part; a corrupt verdict must be the same everywhere."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


# ---- weights only
def load_params(checkpoint_dir: str, *, prefer_ema: bool = True) -> tuple[dict, dict]:
  """The model weights of a checkpoint as host numpy arrays, without the optimizer: (weights, meta).

  weights: one nnx pure dict (string keys, digit keys as ints, no Variable wrappers) of the whole model, i.e. the
  EMA tree when the checkpoint has one and prefer_ema (else the trained params) merged with the frozen part. Its
  paths are those of `nnx.state(model)`, so `nnx.replace_by_pure_dict(nnx.state(model), weights)` loads it.
  `checkpoint_dir` is a training workdir, its checkpoints/ folder, or one step directory; in a folder of steps
  the newest readable one is used (corrupt ones are skipped with a warning, never moved).
  """
  return _read_newest(checkpoint_dir, lambda step_dir: _load_step_weights(step_dir, prefer_ema))


def load_meta(checkpoint_dir: str) -> dict:
  """The `meta` dict (config, step, ...) of the checkpoint `load_params` would read, without reading its weights."""
  return _read_newest(checkpoint_dir, lambda step_dir: _load_step_weights(step_dir, False, with_weights=False)[1])


def _read_newest(checkpoint_dir: str, read):
  """`read(step_dir)` of a workdir, its checkpoints/ folder or one step directory; in a folder of steps the newest
  readable one (corrupt ones are skipped with a warning, never moved)."""
  root = epath.Path(os.path.abspath(os.fspath(checkpoint_dir)))
  if not root.is_dir():
    raise ValueError(f"no checkpoint at {root}: not a directory")
  if (root / "checkpoints").is_dir():
    root = root / "checkpoints"
  if _is_step_dir(root):
    try:
      return read(root)
    except CorruptCheckpoint as err:
      raise ValueError(f"checkpoint {root} is unreadable ({err})") from None
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)
  for step in steps:
    try:
      return read(root / str(step))
    except CorruptCheckpoint as err:
      warnings.warn(f"checkpoint step {step} in {root} is unreadable ({err}); trying the previous step",
                    stacklevel=2)
  raise ValueError(f"no readable checkpoint in {root}" + (f" (tried steps {steps})" if steps else ""))


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def checkpoint_config(meta: dict, where: str = "checkpoint"):
  """The training config a checkpoint was written with (JSON lists back to tuples), as an ml_collections
  ConfigDict; ValueError when the checkpoint carries none."""
  if not isinstance(meta.get("config"), dict):
    raise ValueError(f"{where} carries no training config in its metadata (not written by `suti train`?)")
  config = _tuples(meta["config"])
  if isinstance(config.get("diffusion"), dict):  # written before the sampling keys existed: their old meaning
    config["diffusion"] = {**SAMPLING_DEFAULTS, **config["diffusion"]}
  config.setdefault("vae", {"enabled": False})  # written before latent models existed: a pixel model
  if isinstance(config.get("model"), dict):
    config["model"].setdefault("pretrained", "")  # written before model.pretrained existed: started from nothing
  return mlc.ConfigDict(config)


def _is_step_dir(path: epath.Path) -> bool:
  return any((path / name).is_dir() for name in WEIGHT_ITEMS + (META_ITEM,))


def _load_step_weights(step_dir: epath.Path, prefer_ema: bool, *, with_weights: bool = True) -> tuple[dict, dict]:
  """(weights, meta) of one step; with_weights=False reads the meta only (the weights come back empty)."""
  source = "ema" if prefer_ema and (step_dir / "ema").is_dir() else "params"
  if not (step_dir / source).is_dir():
    raise ValueError(f"{step_dir} holds no model weights (no params/ or ema/ item)")
  json_handler = ocp.JsonCheckpointHandler()
  try:
    weights = _read_item_numpy(step_dir / source) if with_weights else {}
    if with_weights and (step_dir / "frozen").is_dir():
      _merge_disjoint(weights, _read_item_numpy(step_dir / "frozen"))
    meta = json_handler.restore(step_dir / META_ITEM) if (step_dir / META_ITEM).is_dir() else {}
  except Exception as err:  # noqa: BLE001 -- any read failure means this step is unusable
    raise CorruptCheckpoint(_one_line(err)) from None
  finally:
    json_handler.close()
  return weights, _with_own_files(dict(meta or {}), step_dir.parent)


def _with_own_files(meta: dict, root: epath.Path) -> dict:
  """A checkpoint's own files (the tokenizer `suti convert diffusers` and `suti export` put beside its steps) are
  named in its config relative to the folder holding the steps; here they become absolute, so every reader of
  the config finds them wherever the checkpoint was moved to."""
  text = meta.get("config", {}).get("text") if isinstance(meta.get("config"), dict) else None
  name = text.get("tokenizer") if isinstance(text, dict) else None
  if isinstance(name, str) and name and not os.path.isabs(name) and (root / name).is_dir():
    text["tokenizer"] = os.fspath(root / name)
  return meta


def _merge_disjoint(into: dict, other: dict, prefix: str = "") -> None:
  """Adds `other`'s leaves to `into`; trainable and frozen parts of one model never share a leaf path."""
  for key, value in other.items():
    if isinstance(value, dict) and isinstance(into.get(key), dict):
      _merge_disjoint(into[key], value, f"{prefix}{key}/")
    elif key in into:
      raise CorruptCheckpoint(f"'{prefix}{key}' is both in the trained and the frozen weights")
    else:
      into[key] = value


def _item_tree_metadata(item_dir: epath.Path) -> dict:
  """The saved tree of one array item (ArrayMetadata leaves); CorruptCheckpoint when unreadable."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(item_dir).tree
  except Exception as err:  # noqa: BLE001 -- missing or damaged metadata files
    raise CorruptCheckpoint(f"item '{item_dir.name}' has no readable metadata: {_one_line(err)}") from None
  finally:
    handler.close()
  if not isinstance(tree, dict):
    raise CorruptCheckpoint(f"item '{item_dir.name}' has no readable metadata")
  return tree


def _read_item_numpy(item_dir: epath.Path) -> dict:
  """One array item as host numpy arrays, on any device count (the saved shardings are ignored); digit keys
  (nnx.List indices) become ints again, as in nnx.to_pure_dict."""
  tree = _item_tree_metadata(item_dir)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    restored = handler.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    handler.close()
  return nnx.restore_int_paths(restored)
