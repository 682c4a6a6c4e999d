"""CLIP filter: keep a page cluster only when its images show one subject.

Per cluster, on L2-normalised open_clip image embeddings (batched over the whole shard):
  1. near duplicates: an image whose cosine to an earlier kept image is >= near_dup_threshold goes;
  2. outliers: repeatedly remove the image whose mean cosine to the others is lowest while it is below
     outlier_threshold (at least 3 images left to compare);
  3. the cluster goes when outliers were more than max_outlier_fraction of it (a gallery, not a
     subject), when fewer than cluster.min_size images are left, or when the mean pairwise cosine of
     the rest is below cluster_threshold.
Thresholds belong to one CLIP model: `suti data calibrate` prints the distributions to set them from.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.stages import Stage, StageContext, Task
from data_pipeline.stats import TaskResult
from suti.embed.clip import embed_images, load_clip_from_config
from suti.formats import cluster_shards


@dataclass(frozen=True)
class FilterConfig:
  near_dup_threshold: float
  outlier_threshold: float
  cluster_threshold: float
  max_outlier_fraction: float
  min_size: int


@dataclass
class FilterDecision:
  """Which images of a cluster survive, why the others went, and the statistics meta.json records."""
  keep: list[int]
  dropped: collections.Counter = field(default_factory=collections.Counter)
  cluster_kept: bool = False
  stats: dict = field(default_factory=dict)


def _mean_pairwise(sim: np.ndarray) -> float:
  n = sim.shape[0]
  if n < 2:
    return 1.0
  return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def filter_cluster(embeddings: np.ndarray, cfg: FilterConfig) -> FilterDecision:
  """Applies near-dup removal, outlier removal and the coherence test to one cluster's embeddings."""
  sim = np.asarray(embeddings @ embeddings.T, np.float64)
  n = sim.shape[0]
  decision = FilterDecision(keep=[])
  for i in range(n):
    if decision.keep and sim[i, decision.keep].max() >= cfg.near_dup_threshold:
      decision.dropped["near_duplicate"] += 1
    else:
      decision.keep.append(i)
  after_dedup = len(decision.keep)
  keep = np.array(decision.keep)
  sub = sim[np.ix_(keep, keep)]
  row_sums = sub.sum(axis=1) - np.diag(sub)  # each image's summed cosine to the others
  outliers = 0
  while len(keep) >= 3:
    mean_to_others = row_sums / (len(keep) - 1)
    worst = int(np.argmin(mean_to_others))
    if mean_to_others[worst] >= cfg.outlier_threshold:
      break
    row_sums = np.delete(row_sums - sub[:, worst], worst)
    sub = np.delete(np.delete(sub, worst, 0), worst, 1)
    keep = np.delete(keep, worst)
    outliers += 1
  m = len(keep)
  coherence = float(row_sums.sum() / (m * (m - 1))) if m >= 2 else 1.0
  decision.stats = {
      "mean_pairwise_cosine": round(coherence, 4),
      "min_pairwise_cosine": round(float((sub + 2 * np.eye(m)).min()), 4) if m >= 2 else None,
      "mean_pairwise_cosine_before": round(_mean_pairwise(sim), 4),
      "near_duplicates_removed": n - after_dedup,
      "outliers_removed": outliers,
      "per_image_mean_cosine": [round(float(x), 4) for x in row_sums / max(m - 1, 1)],
  }
  if outliers:
    decision.dropped["outlier"] += outliers
  if outliers > cfg.max_outlier_fraction * after_dedup:
    reason = "incoherent_cluster"
  elif m < cfg.min_size:
    reason = "too_small_after_filter"
  elif coherence < cfg.cluster_threshold:
    reason = "incoherent_cluster"
  else:
    reason = None
  if reason is not None:
    decision.dropped[reason] += m
    decision.keep = []
  else:
    decision.keep = [int(i) for i in keep]
    decision.cluster_kept = True
  return decision


def load_clip_resource(ctx: StageContext):
  """The configured open_clip model, loaded once per worker."""
  return ctx.resource("clip_model", lambda: load_clip_from_config(ctx.config)[0])


def filter_config(config) -> FilterConfig:
  c = config.clip
  return FilterConfig(float(c.near_dup_threshold), float(c.outlier_threshold), float(c.cluster_threshold),
                      float(c.max_outlier_fraction), int(config.cluster.min_size))


def run(ctx: StageContext, task: Task) -> TaskResult:
  result = TaskResult()
  counts = result.stage("clip_filter")
  in_path = task.bucket_input
  if not os.path.isfile(in_path):
    return result
  records = list(cluster_shards.read_cluster_shard(in_path))
  images = [img for r in records for img in r.images]
  counts.in_ = len(images)
  if not images:
    return result
  embeddings = embed_images(load_clip_resource(ctx), images, ctx.config.clip.batch_size)
  cfg = filter_config(ctx.config)
  kept_records, start = [], 0
  for record in records:
    n = len(record.images)
    decision = filter_cluster(embeddings[start:start + n], cfg)
    start += n
    counts.dropped.update(decision.dropped)
    if not decision.cluster_kept:
      continue
    k = decision.keep
    counts.out += len(k)
    meta = dict(record.meta)
    if "image_urls" in meta:
      meta["image_urls"] = [meta["image_urls"][i] for i in k]
    meta["clip"] = {**decision.stats, "model": ctx.config.clip.model_name}
    kept_records.append(record.select(k, meta))
  result.counters["clusters_after_clip"] += len(kept_records)
  if kept_records:
    cluster_shards.write_cluster_shard(task.bucket_output,
                                       kept_records, packed=True)
  return result


STAGE = Stage("clip_filter", "clusters", "clusters", "work/clip_filter", ("clip_filter",), run,
              description="CLIP near-dup and outlier removal, keep coherent clusters")
