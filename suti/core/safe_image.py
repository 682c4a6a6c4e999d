"""Decoding untrusted image bytes into RGB arrays, or a named reason why not.

Web crawls hold every kind of broken or odd file. `decode_image` never lets one stop a run: it
raises `ImageRejected` whose `reason` the caller counts ("zero_byte", "undecodable_image",
"truncated_image", "decompression_bomb"). What it does accept comes out as uint8 H x W x 3 RGB,
with EXIF orientation applied, alpha composited on white, and CMYK / 16-bit / grayscale /
palette images converted properly.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # far above any training image, far below a memory bomb


class ImageRejected(ValueError):
  """Raised for an image the pipeline must skip; `reason` is the counter key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def _jpeg_is_complete(data: bytes) -> bool:
  # Entropy-coded data byte-stuffs 0xFF, so FF DA / FF D9 appear only as markers: a complete JPEG
  # has an end-of-image marker after its last start-of-scan.
  last_scan = data.rfind(b"\xff\xda")
  return last_scan != -1 and data.find(b"\xff\xd9", last_scan) != -1


def _png_is_complete(data: bytes) -> bool:
  return data.rfind(b"IEND") != -1


def _sixteen_bit_to_rgb(img: Image.Image) -> np.ndarray:
  """Grayscale images with more than 8 bits ("I;16*", "I", "F") scaled to 0..255, not clipped."""
  arr = np.asarray(img)
  if img.mode == "F":
    arr = arr.astype(np.float64)
    scale = 255.0 if np.nanmax(arr, initial=0) <= 1.0 else 1.0
    gray = np.nan_to_num(arr * scale)
  else:
    gray = arr.astype(np.float64) / 257.0  # 16-bit range to 8-bit range
  gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)


def _composite_on_white(img: Image.Image) -> np.ndarray:
  rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
  alpha = rgba[..., 3:] / 255.0
  rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def to_rgb_array(img: Image.Image) -> np.ndarray:
  """A loaded PIL image (any mode) as uint8 H x W x 3 RGB."""
  has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      img.mode in ("P", "L", "RGB") and "transparency" in img.info)
  if has_alpha:
    return _composite_on_white(img)
  if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    return _sixteen_bit_to_rgb(img)
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Bytes of an image file -> uint8 H x W x 3 RGB, or ImageRejected(reason)."""
  if not data:
    raise ImageRejected("zero_byte")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the bomb limit is checked here, not by PIL's warning
      img = Image.open(io.BytesIO(data))
      width, height = img.size
      if width <= 0 or height <= 0:
        raise ImageRejected("undecodable_image", "empty image")
      if width * height > max_pixels:
        raise ImageRejected("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
      fmt = img.format
      if fmt == "JPEG" and not _jpeg_is_complete(data):
        raise ImageRejected("truncated_image", "JPEG without end-of-image marker")
      if fmt == "PNG" and not _png_is_complete(data):
        raise ImageRejected("truncated_image", "PNG without IEND chunk")
      img.load()
      img = ImageOps.exif_transpose(img)
      return to_rgb_array(img)
  except ImageRejected:
    raise
  except Image.DecompressionBombError as e:
    raise ImageRejected("decompression_bomb", str(e)) from None
  except (OSError, SyntaxError) as e:
    if "truncated" in str(e).lower():
      raise ImageRejected("truncated_image", str(e)) from None
    raise ImageRejected("undecodable_image", str(e)) from None
  except Exception as e:  # noqa: BLE001 -- broken files make PIL plugins raise anything
    raise ImageRejected("undecodable_image", f"{type(e).__name__}: {e}") from None
