"""A picture of a pipeline run: one row per output cluster (its images, left to right), so a user can see at a
glance whether the clusters hold one subject each."""
from __future__ import annotations

import glob
import io
import os

import numpy as np
from PIL import Image

from data_pipeline import cluster_shards
from data_pipeline.shard_io import atomic_write_bytes


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
  sheet = cluster_sheet(os.path.join(output_dir, "clusters"), **kwargs)
  if sheet is None:
    return None
  buf = io.BytesIO()
  Image.fromarray(sheet).save(buf, format="PNG")
  path = os.path.join(output_dir, "clusters_preview.png")
  atomic_write_bytes(path, buf.getvalue())
  return path
