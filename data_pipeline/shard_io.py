"""Atomic files and done-markers: what makes every stage resumable and idempotent.

A task writes each output under a temporary name and renames it into place (a reader never sees half a
file), and only then writes its done-marker, which also holds the task's counts. A run killed at any
point leaves either a finished task (marker present) or one that is redone from scratch; a rerun never
duplicates output because output names are fixed by the task, not by the order tasks ran in.
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Iterable, Iterator, Mapping

from data_pipeline.stats import TaskResult


def _tmp_name(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and an atomic rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def check_member_name(name: str) -> None:
  """Raises ValueError for a tar member name that could escape the folder it is extracted to."""
  from data_pipeline.sources import safe_member_name  # the toy-web engineer's single rule for names
  if not safe_member_name(name):
    raise ValueError(f"unsafe tar member name {name!r}")


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> None:
  """A deterministic tar (same members -> same bytes), written atomically; refuses unsafe names."""
  from data_pipeline.sources import write_tar_atomic  # one writer for the whole data pipeline
  write_tar_atomic(path, list(members))


def read_tar(path: str) -> Iterator[tuple[str, bytes]]:
  """Reads (name, bytes) of the regular members of a tar this pipeline wrote; refuses unsafe names."""
  with tarfile.open(path, mode="r:") as tar:
    for info in tar:
      if not info.isfile():
        raise ValueError(f"{path}: unexpected non-file member {info.name!r}")
      check_member_name(info.name)
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
