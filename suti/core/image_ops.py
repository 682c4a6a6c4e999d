"""Image geometry and value ranges: square crops at the model's resolution, [-1, 1] and back to uint8.

Stored images keep their source resolution; the loader and generation make them square here.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def _check_rgb_uint8(image: np.ndarray) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {image.dtype} {tuple(image.shape)}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"expected a non-empty image, got shape {tuple(image.shape)}")


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: the shorter side resized to `size`, then center-cropped.

  Done as one PIL resize of the centered square (the `box` argument), which is the same geometry as
  "resize the shorter side, crop the middle" without a second rounding. Pillow's bicubic filter widens
  its support by the scale factor on downscale, so it antialiases (an area-like average), and stays
  bicubic on upscale.
  """
  _check_rgb_uint8(image)
  if size < 1:
    raise ValueError(f"image size must be >= 1, got {size}")
  height, width = image.shape[:2]
  if height == width == size:
    return image.copy()
  side = min(height, width)
  left = (width - side) / 2.0
  top = (height - side) / 2.0
  resized = Image.fromarray(image).resize(
      (size, size), resample=Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
  return np.asarray(resized, dtype=np.uint8)


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1] (0 -> -1, 255 -> 1), any shape."""
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {image.dtype}")
  return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def to_uint8(images) -> np.ndarray:
  """uint8 pixels of images given as uint8 or as floats in [-1, 1] (clipped, rounded; NaN shown as mid-gray)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if images.dtype.kind in "iubSUO":
    raise ValueError(f"images must be uint8 or floats in [-1, 1], got dtype {images.dtype}")
  images = np.nan_to_num(images.astype(np.float32), nan=0.0)  # float16 / bfloat16 too
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
