"""Atomic files: what makes every stage resumable and idempotent.

A task writes each output under a temporary name and renames it into place, so a reader never sees half a
file; a rerun never duplicates output because output names are fixed by the task, not by the order tasks ran in.
"""
from __future__ import annotations

import json
import os
from typing import BinaryIO, Callable, Mapping


def _tmp_name(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
  """Runs write(file) on a temporary file beside `path`, syncs it, then renames it into place."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_name(path)
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and an atomic rename."""
  write_atomically(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str) -> Mapping:
  with open(path) as f:
    return json.load(f)


def read_json_object(path: str) -> dict:
  """A JSON file that must hold an object; ValueError in one line when it is unreadable or holds something else."""
  try:
    value = read_json(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"unreadable {path}: {e}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} is not a JSON object")
  return value


def remove_stale_temporaries(folder: str) -> int:
  """Deletes `*.tmp-<pid>` files a killed run left behind; returns how many."""
  removed = 0
  for dirpath, _, files in os.walk(folder):
    for name in files:
      if ".tmp-" in name:
        os.remove(os.path.join(dirpath, name))
        removed += 1
  return removed
