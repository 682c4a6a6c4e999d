"""Config files (ml_collections, one Python file per setup) and `--config.a.b=value` overrides.

A config file defines `get_config() -> ConfigDict`; its docstring says what it is for and how to run it.
Overrides are type-checked against the file's values: an unknown key or a value of the wrong type is a
one-line `ConfigError`, never a silent new field.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections as mlc

from suti.core.paths import resolve_path
from suti.core.tree_paths import flatten_dict

OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
  """A user error in a config file or an override; the message is one line."""


def _import_config_module(path: str):
  # A relative path not found in the working folder (configs/toy.py) is one of the project's own: the checkout's
  # configs/, or the copy a non-editable install ships as suti/shipped/configs.
  path = resolve_path(path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  path = os.path.abspath(path)
  # Config files import their siblings as `configs.<name>` (or `configs.pipeline.<name>`): put the folder holding
  # the enclosing `configs/` first.
  root = os.path.dirname(os.path.dirname(path))
  folder = os.path.dirname(path)
  while os.path.dirname(folder) != folder:
    if os.path.basename(folder) == "configs":
      root = os.path.dirname(folder)
      break
    folder = os.path.dirname(folder)
  if root not in sys.path:
    sys.path.insert(0, root)
  name = "_suti_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken config file is a user error: say where
    raise ConfigError(f"cannot load config {path}: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config {path} defines no get_config()")
  return module


def flatten(cfg: mlc.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  """ConfigDict -> [("model.image_size", 16), ...]: every leaf with its dotted key."""
  return [(prefix + key, value) for key, value in flatten_dict(cfg, ".", (mlc.ConfigDict,)).items()]


def _parse_literal(text: str) -> Any:
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word is a string: --config.text.kind=t5


def _coerce(key: str, old: Any, value: Any) -> Any:
  """Casts an override to the type of the value it replaces; raises ConfigError when it cannot."""
  if old is None or value is None:
    return value
  if isinstance(old, bool):
    if isinstance(value, bool):
      return value
  elif isinstance(old, int):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif isinstance(old, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif isinstance(old, str):
    return str(value) if not isinstance(value, (list, tuple, dict)) else _type_error(key, old, value)
  elif isinstance(old, (tuple, list)):
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
      value = (value,)  # --config.model.neighbor_attn_resolutions=8 means (8,)
    if isinstance(value, (tuple, list)):
      return type(old)(value)
  elif isinstance(value, type(old)):
    return value
  return _type_error(key, old, value)


def _type_error(key: str, old: Any, value: Any):
  raise ConfigError(
      f"config key '{key}' expects {type(old).__name__} (like {old!r}), got {type(value).__name__} {value!r}")


def apply_override(cfg: mlc.ConfigDict, key: str, raw_value: str | Any) -> None:
  """Sets cfg.<key> from a string (or a Python value), checking that the key exists and the type fits."""
  parts = key.split(".")
  node = cfg
  for i, part in enumerate(parts):
    if not isinstance(node, mlc.ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, [k for k, _ in flatten(cfg)], n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ConfigError(f"unknown config key '{key}'{hint}")
    if i < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  old = node[leaf]
  value = _parse_literal(raw_value) if isinstance(raw_value, str) else raw_value
  if isinstance(old, mlc.ConfigDict):
    # An empty group is a free-form mapping (e.g. runner.accelerator_resources = {}): a dict replaces it whole.
    if len(old) == 0 and isinstance(value, dict):
      with node.unlocked():
        node[leaf] = mlc.ConfigDict(value)
      return
    raise ConfigError(f"config key '{key}' is a group; set one of its fields instead")
  value = _coerce(key, old, value)
  with node.unlocked():
    node[leaf] = value


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` arguments from the rest of the command line."""
  overrides, rest = [], []
  i = 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(OVERRIDE_PREFIX):
      body = arg[len(OVERRIDE_PREFIX):]
      if "=" in body:
        key, value = body.split("=", 1)
      elif i + 1 < len(argv):
        key, value = body, argv[i + 1]
        i += 1
      else:
        raise ConfigError(f"override {arg} has no value")
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def load_config(path: str, overrides: Sequence[tuple[str, str]] | Sequence[str] = ()) -> mlc.ConfigDict:
  """Loads `path`'s get_config(), applies overrides, and locks it against new keys."""
  cfg = _import_config_module(path).get_config()
  if not isinstance(cfg, mlc.ConfigDict):
    raise ConfigError(f"config {path}: get_config() must return an ml_collections.ConfigDict")
  for item in overrides:
    if isinstance(item, str):
      parsed, extra = split_overrides([item if item.startswith("--") else OVERRIDE_PREFIX + item])
      if extra or len(parsed) != 1:
        raise ConfigError(f"bad override {item!r}; expected --config.key=value")
      item = parsed[0]
    apply_override(cfg, *item)
  cfg.lock()
  return cfg
