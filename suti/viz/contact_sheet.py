"""Contact sheets: rows of image groups (demos | outputs of one method | ...) with red bars between the groups.

Every tile is drawn at the same size (the largest image side, times `scale`, nearest-neighbour for upscaling so
16x16 toy images stay sharp; larger images are resized to the tile), and each row may carry a caption below it.

Layout in pixels (g = gutter, t = tile side, s = separator width, c = caption band, 0 without captions):
  a group of n tiles is n*t + (n-1)*g wide; groups of a row are separated by g + s + g (the bar in the middle);
  row r starts at y = g + r*(t + c + g); width = g + the widest row + g.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from suti.viz.sample_grid import BACKGROUND, CAPTION_COLOR, SEPARATOR_COLOR, _fit_text


def _tile(image: np.ndarray, side: int) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"sheet tiles must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  h, w = image.shape[:2]
  if (h, w) == (side, side):
    return image
  if side % h == 0 and side % w == 0 and side // h == side // w:
    f = side // h
    return np.repeat(np.repeat(image, f, axis=0), f, axis=1)
  return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC), np.uint8)


def contact_sheet(rows: Sequence[Sequence[Sequence[np.ndarray]]], *, captions: Sequence[str] | None = None,
                  scale: int = 4, gutter: int = 2, separator: int = 4) -> np.ndarray:
  """rows[r][g] is group g of row r, a list of uint8 images; returns the sheet as uint8 [H, W, 3]."""
  if not rows or not any(len(group) for row in rows for group in row):
    raise ValueError("a contact sheet needs at least one image")
  if captions is not None and len(captions) != len(rows):
    raise ValueError(f"{len(rows)} rows but {len(captions)} captions")
  if scale < 1:
    raise ValueError(f"scale must be >= 1, got {scale}")
  side = scale * max(max(np.asarray(img).shape[:2]) for row in rows for group in row for img in group)
  font = ImageFont.load_default()
  caption_h = font.getbbox("Ag|")[3] + 2 if captions is not None else 0

  def row_width(row) -> int:
    groups = [g for g in row if len(g)]
    tiles = sum(len(g) for g in groups)
    return tiles * side + (tiles - len(groups)) * gutter + max(len(groups) - 1, 0) * (2 * gutter + separator)

  width = 2 * gutter + max(row_width(row) for row in rows)
  height = gutter + len(rows) * (side + caption_h + gutter)
  canvas = np.empty((height, width, 3), np.uint8)
  canvas[:] = BACKGROUND
  for r, row in enumerate(rows):
    y, x = gutter + r * (side + caption_h + gutter), gutter
    groups = [g for g in row if len(g)]
    for gi, group in enumerate(groups):
      if gi:
        canvas[y:y + side, x + gutter:x + gutter + separator] = SEPARATOR_COLOR
        x += 2 * gutter + separator
      for ti, image in enumerate(group):
        if ti:
          x += gutter
        canvas[y:y + side, x:x + side] = _tile(image, side)
        x += side
  if captions is not None:
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for r, caption in enumerate(captions):
      y = gutter + r * (side + caption_h + gutter) + side + 1
      draw.text((gutter, y), _fit_text(draw, caption, font, width - 2 * gutter), fill=CAPTION_COLOR, font=font)
    canvas = np.array(picture)
  return canvas
