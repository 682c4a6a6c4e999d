"""`suti data calibrate`: CLIP image similarity distributions of a sample, to set the filter thresholds.

CLIP cosines mean different things for different models (a ViT-B/32 0.3 is not a ViT-L/14 0.3), so the
thresholds of the CLIP filter are set from this printout for the model in the config: same-page pairs
(images sharing a normalised page URL: mostly one subject, sometimes a gallery) against random pairs
(almost always different subjects), with percentiles. It reads only URLs and pixels.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass

import ml_collections as mlc
import numpy as np

from data_pipeline import sources, urls
from suti.core.shards import list_shards
from suti.embed import clip as clip_lib

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


@dataclass
class Calibration:
  same_page: np.ndarray  # cosines of same-page pairs
  random: np.ndarray  # cosines of random pairs from different pages
  num_samples: int
  num_pages: int

  def percentiles(self) -> dict:
    def pct(values: np.ndarray) -> dict:
      if values.size == 0:
        return {}
      return {f"p{p}": round(float(np.percentile(values, p)), 4) for p in PERCENTILES}
    return {"same_page": pct(self.same_page), "random": pct(self.random)}

  def suggestions(self) -> dict:
    """Starting points. A page's image is an outlier, and a page's mean pairwise cosine incoherent,
    when no better than what 10% of random pairs reach (random p90; a mean over several pairs varies
    less than one pair, so the same cut is stricter for the mean). Near duplicates sit above almost
    every same-page pair: midway between its p95 and 1. On the toy web these match the thresholds
    that a grid search against the ground truth picks (0.82 / 0.82 / 0.99)."""
    if self.random.size == 0 or self.same_page.size == 0:
      return {}
    random_p90 = float(np.percentile(self.random, 90))
    same_p95 = float(np.percentile(self.same_page, 95))
    return {"clip.cluster_threshold": round(random_p90, 3), "clip.outlier_threshold": round(random_p90, 3),
            "clip.near_dup_threshold": round((1.0 + same_p95) / 2, 3)}


def read_sample(input_spec: str, max_samples: int) -> tuple[list[np.ndarray], list[str]]:
  """Up to max_samples decoded images with their page keys, in shard order (bad samples skipped)."""
  images, keys = [], []
  drops: collections.Counter = collections.Counter()
  for path in list_shards(input_spec):
    for sample in sources.iter_shard(path, drops):
      try:
        key = urls.cluster_key(sample.page_url, sample.url).key
      except ValueError:
        continue
      images.append(sample.image)
      keys.append(key)
      if len(images) >= max_samples:
        return images, keys
  return images, keys


def similarity_pairs(embeddings: np.ndarray, keys: list[str], random_pairs: int, seed: int) -> Calibration:
  """All same-page pairs, and `random_pairs` pairs of samples from different pages."""
  by_key: dict[str, list[int]] = collections.defaultdict(list)
  for i, k in enumerate(keys):
    by_key[k].append(i)
  same = []
  for idx in by_key.values():
    if len(idx) > 1:
      sim = embeddings[idx] @ embeddings[idx].T
      same.append(sim[np.triu_indices(len(idx), 1)])
  rng = np.random.default_rng(seed)
  n = len(keys)
  rand = np.zeros(0, np.float32)
  if n > 1 and len(by_key) > 1:
    a, b = rng.integers(0, n, random_pairs * 2), rng.integers(0, n, random_pairs * 2)
    key_arr = np.array(keys, dtype=object)
    ok = key_arr[a] != key_arr[b]
    a, b = a[ok][:random_pairs], b[ok][:random_pairs]
    rand = np.einsum("nd,nd->n", embeddings[a], embeddings[b])
  same_all = np.concatenate(same) if same else np.zeros(0, np.float32)
  return Calibration(same_all, rand, n, len(by_key))


def calibrate(config: mlc.ConfigDict, input_spec: str, max_samples: int | None = None) -> Calibration:
  images, keys = read_sample(input_spec, max_samples or config.calibrate.max_samples)
  if len(images) < 2:
    raise ValueError(f"calibrate needs at least 2 readable samples in {input_spec}, found {len(images)}")
  model = clip_lib.load_clip_from_config(config)[0]
  embeddings = clip_lib.embed_images(model, images, config.clip.batch_size)
  return similarity_pairs(embeddings, keys, config.calibrate.random_pairs, config.calibrate.seed)


def report(cal: Calibration, config: mlc.ConfigDict) -> str:
  """A table of percentiles, the current thresholds and suggestions, then one JSON line."""
  pct = cal.percentiles()
  lines = [f"CLIP image cosine, model {config.clip.model_name}: {cal.num_samples} samples on {cal.num_pages} pages, "
           f"{cal.same_page.size} same-page pairs, {cal.random.size} random pairs",
           "            " + " ".join(f"{f'p{p}':>7}" for p in PERCENTILES)]
  for name in ("same_page", "random"):
    row = pct.get(name, {})
    lines.append(f"{name:<11} " + " ".join(f"{row.get(f'p{p}', float('nan')):>7.3f}" for p in PERCENTILES))
  current = {k: config.clip[k.split(".")[1]] for k in ("clip.cluster_threshold", "clip.outlier_threshold",
                                                          "clip.near_dup_threshold")}
  lines.append("current:   " + ", ".join(f"{k}={v}" for k, v in current.items()))
  suggested = cal.suggestions()
  lines.append("suggested: " + ", ".join(f"--config.{k}={v}" for k, v in suggested.items()))
  lines.append(json.dumps({"model": config.clip.model_name, "samples": cal.num_samples, "pages": cal.num_pages,
                           "percentiles": pct, "current": current, "suggested": suggested}))
  return "\n".join(lines)
