"""Stable hashes and seeds: the same value in every process, host and run (Python's hash() is salted per process).

Every split, bucket, cluster id and per-task seed of the project comes from here, so changing one of these
functions changes which subjects are held out and which clusters land in which bucket: the values are frozen.
"""
from __future__ import annotations

import hashlib

import numpy as np


def _digest(text: str, algorithm: str) -> bytes:
  return hashlib.new(algorithm, text.encode("utf-8")).digest()


def stable_int(*parts: str, algorithm: str = "sha256") -> int:
  """A 64-bit integer of strings joined by NUL (one string hashes as itself)."""
  return int.from_bytes(_digest("\0".join(parts), algorithm)[:8], "big")


def stable_hex(text: str, length: int, algorithm: str = "sha1") -> str:
  """The first `length` hex digits of the text's digest: short, fixed-width ids."""
  return hashlib.new(algorithm, text.encode("utf-8")).hexdigest()[:length]


def stable_seed(*parts) -> int:
  """A 31-bit seed from strings and numbers (anything with a stable str())."""
  digest = _digest("\0".join(str(p) for p in parts), "sha256")
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def array_digest(array: np.ndarray) -> str:
  """sha1 hex of an array's shape and bytes: the exact-duplicate key of decoded pixels."""
  h = hashlib.sha1(repr(array.shape).encode())
  h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
