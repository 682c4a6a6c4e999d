"""Atomic files and done-markers: what makes every stage resumable and idempotent.

A task writes each output under a temporary name and renames it into place (a reader never sees half a
file), and only then writes its done-marker, which also holds the task's counts. A run killed at any
point leaves either a finished task (marker present) or one that is redone from scratch; a rerun never
duplicates output because output names are fixed by the task, not by the order tasks ran in.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

from data_pipeline.stats import TaskResult


def _tmp_name(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


def _write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
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
  _write_atomically(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def safe_member_name(name: str) -> bool:
  """True for a relative tar member name that stays inside the folder it would be extracted to."""
  if not name or len(name) > 1024 or "\\" in name or any(ord(ch) < 32 for ch in name):
    return False
  if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
    return False
  return all(p not in ("", ".", "..") for p in name.split("/"))


def _deterministic_info(name: str, size: int) -> tarfile.TarInfo:
  info = tarfile.TarInfo(name)
  info.size = size
  info.mtime = 0
  info.mode = 0o644
  info.uid = info.gid = 0
  info.uname = info.gname = ""
  return info


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> None:
  """A tar of (name, bytes) members, written atomically: same members -> same bytes. The one tar writer of
  the data pipeline; refuses unsafe member names and non-bytes data before writing anything."""
  members = list(members)
  for name, data in members:
    if not safe_member_name(name):
      raise ValueError(f"unsafe tar member name {name!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
      raise ValueError(f"tar member {name!r} must be bytes, got {type(data).__name__}")

  def write(f: BinaryIO) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
      for name, data in members:
        tar.addfile(_deterministic_info(name, len(data)), io.BytesIO(bytes(data)))

  _write_atomically(path, write)


def read_tar(path: str) -> Iterator[tuple[str, bytes]]:
  """Reads (name, bytes) of the regular members of a tar this pipeline wrote; refuses unsafe names."""
  with tarfile.open(path, mode="r:") as tar:
    for info in tar:
      if not info.isfile():
        raise ValueError(f"{path}: unexpected non-file member {info.name!r}")
      if not safe_member_name(info.name):
        raise ValueError(f"{path}: unsafe tar member name {info.name!r}")
      yield info.name, tar.extractfile(info).read()


class DoneMarkers:
  """Done-markers of one pipeline output: `<output>/_done/<stage>/<task>.json` holding the task's counts."""

  def __init__(self, output_dir: str):
    self.root = os.path.join(output_dir, "_done")

  def path(self, stage: str, task_id: str) -> str:
    return os.path.join(self.root, stage, f"{task_id}.json")

  def is_done(self, stage: str, task_id: str) -> bool:
    return os.path.isfile(self.path(stage, task_id))

  def mark(self, stage: str, task_id: str, result: TaskResult) -> None:
    atomic_write_json(self.path(stage, task_id), result.to_dict())

  def load(self, stage: str, task_id: str) -> TaskResult:
    with open(self.path(stage, task_id)) as f:
      return TaskResult.from_dict(json.load(f))


def read_json(path: str) -> Mapping:
  with open(path) as f:
    return json.load(f)


def remove_stale_temporaries(folder: str) -> int:
  """Deletes `*.tmp-<pid>` files a killed run left behind; returns how many."""
  removed = 0
  for dirpath, _, files in os.walk(folder):
    for name in files:
      if ".tmp-" in name:
        os.remove(os.path.join(dirpath, name))
        removed += 1
  return removed
