"""Pictures of a pipeline run, drawn by the one drawer (suti.viz.contact_sheet): one row per output cluster (its
images, left to right), so a user sees at a glance whether the clusters hold one subject each; and one row per ICL
example (its neighbors | the expert's target, the prompt below)."""
from __future__ import annotations

import glob
import os

import numpy as np

from suti.core.png import save_png
from suti.formats import cluster_shards
from suti.formats.icl_shards import read_icl_shard
from suti.viz.contact_sheet import contact_sheet


def cluster_sheet(clusters_dir: str, max_clusters: int = 16, max_images: int = 8, cell: int = 48,
                  gap: int = 4) -> np.ndarray | None:
  """A contact sheet of `cell`-pixel tiles, `gap` apart, one row per cluster; None when there are no clusters."""
  rows = []
  for path in sorted(glob.glob(os.path.join(clusters_dir, "clusters-*.tar"))):
    for record in cluster_shards.read_cluster_shard(path):
      rows.append([list(record.images[:max_images])])
      if len(rows) == max_clusters:
        break
    if len(rows) == max_clusters:
      break
  if not rows:
    return None
  return contact_sheet(rows, tile=(cell, cell), gutter=gap, resample="nearest")


def icl_sheet(icl_dir: str, max_examples: int = 16, neighbors: int = 3, cell: int = 48,
              gap: int = 4) -> np.ndarray | None:
  """One row per ICL example: its first `neighbors` real images | the expert's target, the prompt below."""
  examples = []
  for path in sorted(glob.glob(os.path.join(icl_dir, "icl-*.tar"))):
    examples.extend(read_icl_shard(path)[:max_examples - len(examples)])
    if len(examples) >= max_examples:
      break
  if not examples:
    return None
  rows = [[list(ex.neighbors[:neighbors]), [ex.target]] for ex in examples]
  return contact_sheet(rows, captions=[ex.prompt for ex in examples], tile=(cell, cell), gutter=gap,
                       resample="nearest")


def _write_png(sheet: np.ndarray | None, path: str) -> str | None:
  return None if sheet is None else save_png(path, sheet)


def write_cluster_sheet(output_dir: str, **kwargs) -> str | None:
  """Writes <output_dir>/clusters_preview.png (atomically); returns its path, or None without clusters."""
  return _write_png(cluster_sheet(os.path.join(output_dir, "clusters"), **kwargs),
                    os.path.join(output_dir, "clusters_preview.png"))


def write_icl_sheet(output_dir: str, **kwargs) -> str | None:
  """Writes <output_dir>/icl_preview.png (neighbors | target, prompt below); None without ICL shards."""
  return _write_png(icl_sheet(os.path.join(output_dir, "icl"), **kwargs), os.path.join(output_dir, "icl_preview.png"))
