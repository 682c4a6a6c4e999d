"""Group web pairs by page with a hash-bucketed shuffle, so that grouping scales past memory.

Map (one task per input shard): decode, normalise the page URL (or fall back to the image URL's host +
directory), and append each sample to the bucket file of hash(page key) % num_buckets.
Reduce (one task per bucket): read that bucket from every map output, group in memory by page key,
drop exact duplicates (same pixels, or the same image URL on the same page) and clusters outside
[min_size, max_size]; write one clusters shard per bucket. Only one bucket is ever in memory.

Order is fixed by (input shard, position), never by which task finished first, so reruns and runners
agree byte for byte.
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass

import numpy as np

from data_pipeline import sources, urls
from data_pipeline.stages import Stage, StageContext, Task
from data_pipeline.stats import TaskResult
from suti.core import tar_io
from suti.core.hashing import array_digest, stable_hex, stable_int
from suti.formats import cluster_shards


def stable_hash(text: str) -> int:
  """A hash that is the same in every process (Python's hash() is salted per process)."""
  return stable_int(text, algorithm="sha1")


def bucket_of(page_key: str, num_buckets: int) -> int:
  return stable_hash(page_key) % num_buckets


def cluster_id_of(page_key: str) -> str:
  return stable_hex(page_key, 16)


def content_hash(image: np.ndarray) -> str:
  """Exact-duplicate key: the decoded pixels (so a PNG and a JPEG re-save of the same pixels differ,
  but the same file served twice does not)."""
  return array_digest(image)


@dataclass
class BucketedSample:
  """A decoded sample on its way through the shuffle."""
  order: tuple[int, int]  # (input shard index, position in shard)
  key: str
  page_key: str
  key_source: str
  url: str
  normalized_url: str
  caption: str
  content_hash: str
  image: np.ndarray  # uint8 HxWx3; raw bytes in the bucket files (no codec on the way through)

  @property
  def member_key(self) -> str:
    return f"s{self.order[0]:05d}p{self.order[1]:08d}"

  def members(self) -> list[tuple[str, bytes]]:
    info = {k: v for k, v in self.__dict__.items() if k != "image"}
    info["shape"] = list(self.image.shape)
    return [(f"{self.member_key}.json", json.dumps(info, sort_keys=True).encode("utf-8")),
            (f"{self.member_key}.rgb", np.ascontiguousarray(self.image, dtype=np.uint8).tobytes())]


def _read_bucket_file(path: str) -> list[BucketedSample]:
  samples, pending = [], {}
  for name, data in tar_io.read_tar(path):
    key, ext = name.split(".", 1)
    pending[ext] = data
    if "rgb" in pending and "json" in pending:
      info = json.loads(pending["json"])
      info["order"] = tuple(info["order"])
      image = np.frombuffer(pending["rgb"], np.uint8).reshape(info.pop("shape"))
      samples.append(BucketedSample(image=image, **info))
      pending = {}
  return samples


def bucket_file_name(bucket: int) -> str:
  return f"bucket-{bucket:06d}.tar"


def run_map(ctx: StageContext, task: Task) -> TaskResult:
  num_buckets = ctx.config.cluster.num_buckets
  result = TaskResult()
  read, grouped = result.stage("read"), result.stage("cluster")
  drops: collections.Counter = collections.Counter()
  buckets: dict[int, list[tuple[str, bytes]]] = collections.defaultdict(list)
  yielded = 0
  for position, sample in enumerate(sources.iter_shard(task.input_path, drops)):
    yielded += 1
    grouped.in_ += 1
    try:
      key = urls.cluster_key(sample.page_url, sample.url)
    except ValueError:
      grouped.drop("bad_url")
      continue
    if key.source == "image_dir":
      result.counters["page_url_fallback"] += 1
    try:
      normalized_url = urls.normalize_url(sample.url)
    except ValueError:
      normalized_url = sample.url.strip()
    item = BucketedSample((task.index, position), sample.key, key.key, key.source, sample.url, normalized_url,
                          sample.caption, content_hash(sample.image), sample.image)
    buckets[bucket_of(key.key, num_buckets)].extend(item.members())
  read.in_, read.out, read.dropped = yielded + sum(drops.values()), yielded, drops
  out_dir = os.path.join(task.output_dir, task.task_id)
  for bucket in sorted(buckets):
    tar_io.write_tar(os.path.join(out_dir, bucket_file_name(bucket)), buckets[bucket])
  return result


def dedup_and_limit(samples: list[BucketedSample], min_size: int, max_size: int,
                    result: TaskResult) -> list[list[BucketedSample]]:
  """Groups samples by page key (sorted), drops exact duplicates and clusters of the wrong size."""
  counts = result.stage("cluster")
  groups: dict[str, list[BucketedSample]] = collections.defaultdict(list)
  for s in sorted(samples, key=lambda s: s.order):
    groups[s.page_key].append(s)
  kept = []
  for page_key in sorted(groups):
    seen_pixels, seen_urls, members = set(), set(), []
    for s in groups[page_key]:
      if s.content_hash in seen_pixels:
        counts.drop("duplicate_image")
      elif s.normalized_url in seen_urls:
        counts.drop("duplicate_url")
      else:
        seen_pixels.add(s.content_hash)
        seen_urls.add(s.normalized_url)
        members.append(s)
    if len(members) < min_size:
      counts.drop("cluster_too_small", len(members))
    elif len(members) > max_size:
      counts.drop("cluster_too_large", len(members))
    else:
      counts.out += len(members)
      kept.append(members)
  return kept


def run_reduce(ctx: StageContext, task: Task) -> TaskResult:
  cfg = ctx.config.cluster
  result = TaskResult()
  result.stage("cluster")  # present even when the bucket is empty
  samples: list[BucketedSample] = []
  if os.path.isdir(task.input_path):
    for shard_dir in sorted(os.listdir(task.input_path)):
      path = os.path.join(task.input_path, shard_dir, bucket_file_name(task.index))
      if os.path.isfile(path):
        samples.extend(_read_bucket_file(path))
  records = []
  for members in dedup_and_limit(samples, cfg.min_size, cfg.max_size, result):
    first = members[0]
    records.append(cluster_shards.ClusterRecord(
        cluster_id=cluster_id_of(first.page_key), page_url=first.page_key,
        images=[m.image for m in members], captions=[m.caption for m in members],
        source_keys=[m.key for m in members],
        meta={"page_key_source": first.key_source, "image_urls": [m.url for m in members]}))
  records.sort(key=lambda r: r.cluster_id)
  result.counters["clusters_grouped"] += len(records)
  if records:
    cluster_shards.write_cluster_shard(task.bucket_output, records,
                                       packed=True)
  return result


MAP_STAGE = Stage("cluster_map", "raw", "buckets", "work/cluster_map", ("read", "cluster"), run_map,
                  granularity="input_shard", description="read shards, normalise page URLs, bucket by page key")
REDUCE_STAGE = Stage("cluster_reduce", "buckets", "clusters", "work/cluster_reduce", ("cluster",), run_reduce,
                     description="group by page key, exact dedup, min/max cluster size")
