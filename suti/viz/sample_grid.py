"""Sample-grid pictures for training previews: what the model draws, next to what it was shown.

Drawn by the one drawer, suti.viz.contact_sheet. Apprentice (demos given): one row per example, its K demos,
a red separator bar, then the output.
Base model (no demos): the outputs in a near-square grid. Tiles are upscaled by an integer factor with
nearest-neighbour, so 16x16 toy images stay sharp and visible.

Layout in pixels (g = gutter, th x tw = H*scale x W*scale, c = caption band height, 0 without captions):
  apprentice: demo k of row r at  y = g + r*(th + c + g),  x = g + k*(tw + g)
              separator bar at    x = g + K*(tw + g) .. + separator  (rows' tile height)
              output at           x = g + K*(tw + g) + separator + g
              width = that x + tw + g,  height = g + N*(th + c + g)
  base:       output i at row i // cols, column i % cols, cols = ceil(sqrt(N)):
              y = g + row*(th + c + g),  x = g + col*(tw + g)
The caption of a row (of a tile, for the base grid) is drawn in the c-pixel band just below it.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from suti.core.image_ops import to_uint8
from suti.core.png import save_png
from suti.viz.contact_sheet import contact_sheet


def _as_pixels(name: str, images: np.ndarray, ndim: int) -> np.ndarray:
  if images.ndim != ndim or images.shape[-1] != 3:
    expected = "[N,H,W,3]" if ndim == 4 else "[N,K,H,W,3]"
    raise ValueError(f"{name} must be {expected} RGB images, got shape {images.shape}")
  try:
    return to_uint8(images)
  except ValueError as error:
    raise ValueError(f"{name}: {error}") from None


def _resolve_demo_mask(demos_as_given: np.ndarray, demo_mask) -> np.ndarray:
  n, k = demos_as_given.shape[:2]
  if demo_mask is None:
    # Without a mask, padding is recognised the way the loader writes it: an image of zeros as given.
    values = demos_as_given if demos_as_given.dtype == np.uint8 else demos_as_given.astype(np.float32)
    return (values.reshape(n, k, -1) != 0).any(axis=-1)
  mask = np.asarray(demo_mask)
  if mask.shape != (n, k):
    raise ValueError(f"demo_mask must be [N,K] = {[n, k]}, got shape {mask.shape}")
  return mask.astype(bool)


def sample_grid(outputs: np.ndarray, demos: np.ndarray | None = None, *, scale: int = 4,
                captions: Sequence[str] | None = None, demo_mask: np.ndarray | None = None,
                gutter: int = 2, separator: int = 4) -> np.ndarray:
  """One uint8 [height, width, 3] picture of the outputs (and their demos); layout in the module docstring.

  outputs [N,H,W,3] and demos [N,K,H,W,3] are uint8 or floats in [-1, 1]. Demos that are masked out
  (`demo_mask` [N,K] False; without a mask, all-zero demos) are drawn as plain gray tiles.
  """
  if not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale!r}")
  if gutter < 0 or separator < 1:
    raise ValueError(f"gutter must be >= 0 and separator >= 1, got {gutter} and {separator}")
  outputs = _as_pixels("outputs", np.asarray(outputs), 4)
  n, h, w, _ = outputs.shape
  if n == 0:
    raise ValueError("outputs holds no images")
  if captions is not None and len(captions) != n:
    raise ValueError(f"captions must hold one caption per output ({n}), got {len(captions)}")
  if demos is None and demo_mask is not None:
    raise ValueError("demo_mask was given without demos")
  if demos is None:
    cols = math.ceil(math.sqrt(n))
    rows = [[list(outputs[start:start + cols])] for start in range(0, n, cols)]
    tile_captions = None if captions is None else [list(captions[start:start + cols]) for start in range(0, n, cols)]
    return contact_sheet(rows, tile_captions=tile_captions, scale=scale, gutter=gutter, separator=separator)
  demos_raw = np.asarray(demos)
  demos = _as_pixels("demos", demos_raw, 5)
  if demos.shape[0] != n or demos.shape[2:] != outputs.shape[1:]:
    raise ValueError(f"demos must be [N,K,H,W,3] with N,H,W = {n},{h},{w}, got shape {demos.shape}")
  if demos.shape[1] == 0:
    raise ValueError("demos holds no demo per example; pass demos=None for a base-model grid")
  keep = _resolve_demo_mask(demos_raw, demo_mask)
  rows = [[[d if kept else None for d, kept in zip(demos[r], keep[r])], [outputs[r]]] for r in range(n)]
  return contact_sheet(rows, captions=captions, tile=(h * scale, w * scale), gutter=gutter, separator=separator)


def save_sample_grid(path: str, outputs, demos=None, **kw) -> str:
  """Writes sample_grid(outputs, demos, **kw) as a PNG at `path` (atomically, parents created); returns path."""
  return save_png(path, sample_grid(outputs, demos, **kw))


def sample_grid_path(workdir: str, step: int) -> str:
  """Where the trainer keeps the preview of `step`: <workdir>/samples/step_00001000.png (sorts by step)."""
  return os.path.join(workdir, "samples", f"step_{int(step):08d}.png")
