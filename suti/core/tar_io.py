"""Tar shards: the one rule for member names, the one writer, and the reader of shards this project wrote.

Member names must stay inside the folder they would be extracted to; written tars are byte-for-byte
reproducible (fixed mtime, owner and mode), so a rerun of a stage rewrites identical files.
"""
from __future__ import annotations

import io
import re
import tarfile
from typing import BinaryIO, Iterable, Iterator

from suti.core.atomic_io import write_atomically


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
  the project; refuses unsafe member names and non-bytes data before writing anything."""
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

  write_atomically(path, write)


def read_tar(path: str) -> Iterator[tuple[str, bytes]]:
  """Reads (name, bytes) of the regular members of a tar this pipeline wrote; refuses unsafe names."""
  with tarfile.open(path, mode="r:") as tar:
    for info in tar:
      if not info.isfile():
        raise ValueError(f"{path}: unexpected non-file member {info.name!r}")
      if not safe_member_name(info.name):
        raise ValueError(f"{path}: unsafe tar member name {info.name!r}")
      yield info.name, tar.extractfile(info).read()
