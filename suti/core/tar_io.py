"""Tar shards: the one rule for member names, the one writer, and the readers.

Member names must stay inside the folder they would be extracted to; written tars are byte-for-byte
reproducible (fixed mtime, owner and mode), so a rerun of a stage rewrites identical files. `read_tar` reads a
tar this project wrote and refuses anything odd; `iter_tar_samples` reads any webdataset tar and counts damage.
"""
from __future__ import annotations

import collections
import io
import os
import re
import tarfile
import zlib
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


# ----------------------------------------------------------------------------------------------
# The one reader of webdataset tars (raw web shards, cluster and ICL shards alike), for any stream.

MAX_MEMBER_BYTES = 256 * 1024 * 1024


class _EndAwareTarInfo(tarfile.TarInfo):
  """Records on the TarFile why its last header read ended the archive.

  tarfile takes end-of-data at a header boundary, a short header or a garbled header for a normal end, so a tar
  cut between two members loses its last samples silently. A complete tar ends in a zero block; this header
  class lets the reader tell the two apart, for plain and compressed streams and for pipes alike.
  """

  @classmethod
  def fromtarfile(cls, tarfile_obj):
    try:
      info = super().fromtarfile(tarfile_obj)
    except tarfile.HeaderError as e:
      tarfile_obj.suti_end = type(e).__name__
      raise
    tarfile_obj.suti_end = None
    return info


def split_member(name: str) -> tuple[str, str]:
  """webdataset's rule: key = folder + basename up to its first dot; the rest (lower case) is the field."""
  folder, base = os.path.split(name)
  if "." not in base:
    return name, ""
  stem, ext = base.split(".", 1)
  return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_samples(stream: BinaryIO, drops: collections.Counter,
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {field: bytes}) per sample of a tar stream (plain, gzip, bz2 or xz), members grouped by key in order.

  Never raises for bad data; counts instead: a stream that is not a tar is one "unreadable_shard"; a member that
  is not a regular file or whose name escapes its folder, "unsafe_member" (folders are skipped uncounted); one
  over `max_member_bytes`, "oversized_member"; a tar that ends without its end-of-archive block (cut between
  members, inside one, or damaged) is one "truncated_tar", and the members read in full before the damage are
  kept: the sample in progress is yielded with the fields it has. A repeated field keeps its first value.
  """
  try:
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
  except (tarfile.TarError, OSError, EOFError, zlib.error):
    drops["unreadable_shard"] += 1
    return
  key: str | None = None
  fields: dict[str, bytes] = {}
  complete = False
  try:
    with tar:
      for member in tar:
        if member.isdir():
          continue  # folders are not samples
        name = member.name[2:] if member.name.startswith("./") else member.name
        if not member.isfile() or not safe_member_name(name):
          drops["unsafe_member"] += 1
          continue
        if member.size > max_member_bytes:
          drops["oversized_member"] += 1
          continue
        member_key, ext = split_member(name)
        if member_key != key:
          if key is not None and fields:
            yield key, fields
          key, fields = member_key, {}
        data = tar.extractfile(member).read()
        fields.setdefault(ext, data)
      # the zero block, not end-of-data or a garbled header
      complete = getattr(tar, "suti_end", None) == "EOFHeaderError"
  except (tarfile.TarError, OSError, EOFError, zlib.error):
    pass  # damaged from here on: what was read in full stays
  if key is not None and fields:
    yield key, fields
  if not complete:  # counted once the shard's last sample is out, so a count travels with the batch after it
    drops["truncated_tar"] += 1
