"""The project's one drawer: rows of tile groups with red bars between the groups, captions below, one palette.

Training previews (suti.viz.sample_grid), `suti generate` sheets, evaluation grids and the pipeline's cluster /
ICL previews are all drawn here. Every tile has one size: `tile` (h, w) when given, else the largest image
height and width times `scale`. A tile that divides evenly is upscaled by nearest neighbour (16x16 toy images stay
sharp), any other is resized (`resample`). A None tile is a padding slot, drawn plain gray.

Layout in pixels (g = gutter, th x tw = tile, s = separator width, c = caption band, 0 without captions):
  a group of n tiles is n*tw + (n-1)*g wide; groups of a row are separated by g + s + g (the bar in the middle);
  row r starts at y = g + r*(th + c + g), its first tile at x = g; width = g + the widest row + g.
A row caption is drawn at x = g below its row; a tile caption (tile_captions) below its tile, cut to tw - 4.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
SEPARATOR_COLOR = (220, 40, 40)
PADDED_TILE_GRAY = (128, 128, 128)
CAPTION_COLOR = (0, 0, 0)
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


def caption_band() -> int:
  """Height of the caption band under a captioned row: the tallest glyphs plus a pixel above and below."""
  return ImageFont.load_default().getbbox("Ag|")[3] + 2


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  """`text` on one line, cut with "..." to fit `width` pixels."""
  text = " ".join(str(text).split())
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..." if text else ""


def _tile(image: np.ndarray, th: int, tw: int, resample: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"sheet tiles must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  h, w = image.shape[:2]
  if (h, w) == (th, tw):
    return image
  if th % h == 0 and tw % w == 0 and th // h == tw // w:
    f = th // h
    return np.repeat(np.repeat(image, f, axis=0), f, axis=1)
  return np.asarray(Image.fromarray(image).resize((tw, th), RESAMPLING[resample]), np.uint8)


def contact_sheet(rows: Sequence[Sequence[Sequence[np.ndarray | None]]], *, captions: Sequence[str] | None = None,
                  tile_captions: Sequence[Sequence[str]] | None = None, scale: int = 4,
                  tile: tuple[int, int] | None = None, gutter: int = 2, separator: int = 4,
                  resample: str = "bicubic") -> np.ndarray:
  """rows[r][g] is group g of row r, a list of uint8 images (None: a gray padding tile); returns uint8 [H, W, 3].

  captions: one per row; tile_captions: per row, one per tile (its groups' tiles in order).
  """
  images = [img for row in rows for group in row for img in group if img is not None]
  if not images:
    raise ValueError("a contact sheet needs at least one image")
  if captions is not None and len(captions) != len(rows):
    raise ValueError(f"{len(rows)} rows but {len(captions)} captions")
  if tile_captions is not None and [len(t) for t in tile_captions] != [sum(len(g) for g in r) for r in rows]:
    raise ValueError("tile_captions must hold one caption per tile of each row")
  if not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale!r}")
  if gutter < 0 or separator < 1:
    raise ValueError(f"gutter must be >= 0 and separator >= 1, got {gutter} and {separator}")
  if resample not in RESAMPLING:
    raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got {resample!r}")
  if tile is None:
    tile = (scale * max(np.asarray(i).shape[0] for i in images), scale * max(np.asarray(i).shape[1] for i in images))
  th, tw = int(tile[0]), int(tile[1])
  font = ImageFont.load_default()
  caption_h = caption_band() if captions is not None or tile_captions is not None else 0

  def row_width(row) -> int:
    groups = [g for g in row if len(g)]
    tiles = sum(len(g) for g in groups)
    return tiles * tw + (tiles - len(groups)) * gutter + max(len(groups) - 1, 0) * (2 * gutter + separator)

  width = 2 * gutter + max(row_width(row) for row in rows)
  height = gutter + len(rows) * (th + caption_h + gutter)
  canvas = np.empty((height, width, 3), np.uint8)
  canvas[:] = BACKGROUND
  tile_x: list[list[int]] = []
  for r, row in enumerate(rows):
    y, x = gutter + r * (th + caption_h + gutter), gutter
    xs = []
    for gi, group in enumerate(g for g in row if len(g)):
      if gi:
        canvas[y:y + th, x + gutter:x + gutter + separator] = SEPARATOR_COLOR
        x += 2 * gutter + separator
      for ti, image in enumerate(group):
        if ti:
          x += gutter
        canvas[y:y + th, x:x + tw] = PADDED_TILE_GRAY if image is None else _tile(image, th, tw, resample)
        xs.append(x)
        x += tw
    tile_x.append(xs)
  if caption_h:
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for r in range(len(rows)):
      y = gutter + r * (th + caption_h + gutter) + th + 1
      if captions is not None:
        draw.text((gutter, y), fit_text(draw, captions[r], font, width - 2 * gutter), fill=CAPTION_COLOR, font=font)
      for x, text in zip(tile_x[r], tile_captions[r] if tile_captions is not None else ()):
        draw.text((x, y), fit_text(draw, text, font, max(tw - 4, 0)), fill=CAPTION_COLOR, font=font)
    canvas = np.array(picture)  # writable, like the caption-free picture
  return canvas
