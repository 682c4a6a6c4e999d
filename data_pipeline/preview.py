"""A picture of a pipeline run: one row per output cluster (its images, left to right), so a user can see at a
glance whether the clusters hold one subject each."""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image

from suti.formats import cluster_shards
from suti.core.png import save_png
from PIL import ImageDraw
from suti.formats.icl_shards import read_icl_shard


def _fit(image: np.ndarray, cell: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).convert("RGB").resize((cell, cell), Image.NEAREST))


def cluster_sheet(clusters_dir: str, max_clusters: int = 16, max_images: int = 8, cell: int = 48,
                  gap: int = 4) -> np.ndarray | None:
  """uint8 [rows*(cell+gap), max_images*(cell+gap), 3] on white, or None when there are no clusters."""
  rows = []
  for path in sorted(glob.glob(os.path.join(clusters_dir, "clusters-*.tar"))):
    for record in cluster_shards.read_cluster_shard(path):
      rows.append([_fit(img, cell) for img in record.images[:max_images]])
      if len(rows) == max_clusters:
        break
    if len(rows) == max_clusters:
      break
  if not rows:
    return None
  step = cell + gap
  sheet = np.full((len(rows) * step, max_images * step, 3), 255, np.uint8)
  for r, images in enumerate(rows):
    for c, img in enumerate(images):
      sheet[r * step:r * step + cell, c * step:c * step + cell] = img
  return sheet


def write_cluster_sheet(output_dir: str, **kwargs) -> str | None:
  """Writes <output_dir>/clusters_preview.png (atomically); returns its path, or None without clusters."""
  return _write_png(cluster_sheet(os.path.join(output_dir, "clusters"), **kwargs),
                    os.path.join(output_dir, "clusters_preview.png"))


def _write_png(sheet: np.ndarray | None, path: str) -> str | None:
  if sheet is None:
    return None
  return save_png(path, sheet)


def icl_sheet(icl_dir: str, max_examples: int = 16, neighbors: int = 3, cell: int = 48, gap: int = 4,
              text_width: int = 300) -> np.ndarray | None:
  """One row per ICL example: its first `neighbors` real images, a gap, the expert's target, then the prompt."""
  examples = []
  for path in sorted(glob.glob(os.path.join(icl_dir, "icl-*.tar"))):
    examples.extend(read_icl_shard(path)[:max_examples - len(examples)])
    if len(examples) >= max_examples:
      break
  if not examples:
    return None
  step = cell + gap
  width = (neighbors + 1) * step + 3 * gap + text_width
  canvas = Image.new("RGB", (width, len(examples) * step), "white")
  draw = ImageDraw.Draw(canvas)
  for r, ex in enumerate(examples):
    y = r * step
    for c, image in enumerate(ex.neighbors[:neighbors]):
      canvas.paste(Image.fromarray(_fit(image, cell)), (c * step, y))
    x = neighbors * step + 3 * gap
    canvas.paste(Image.fromarray(_fit(ex.target, cell)), (x, y))
    draw.text((x + step, y + cell // 2 - 6), ex.prompt, fill=(0, 0, 0))
  return np.asarray(canvas)


def write_icl_sheet(output_dir: str, **kwargs) -> str | None:
  """Writes <output_dir>/icl_preview.png (neighbors | target | prompt per row); None without ICL shards."""
  return _write_png(icl_sheet(os.path.join(output_dir, "icl"), **kwargs), os.path.join(output_dir, "icl_preview.png"))
