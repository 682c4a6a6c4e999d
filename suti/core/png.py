"""PNG coding, the project's one encoder and decoder of its own images (shards, previews, reports, outputs).

The same pixels always give the same bytes (fixed zlib level, no metadata), so rerunning a stage rewrites
identical shards. Untrusted image bytes (web crawls, user demos) go through suti.core.safe_image instead.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from suti.core.atomic_io import atomic_write_bytes


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W, 3] RGB image."""
  image = np.ascontiguousarray(image, dtype=np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an [H, W, 3] RGB image, got shape {tuple(image.shape)}")
  buf = io.BytesIO()
  Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  """uint8 [H, W, 3] RGB of PNG bytes this project wrote."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def save_png(path: str, image: np.ndarray) -> str:
  """Writes a uint8 RGB image as PNG atomically (parent folders created); returns the path."""
  atomic_write_bytes(path, encode_png(image))
  return path
