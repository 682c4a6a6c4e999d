"""Page clustering: hash-bucketed shuffle, exact dedup, size limits, fallback keys (no CLIP needed)."""
import collections
import glob
import hashlib
import json
import os
import tarfile

import numpy as np
import pytest

from data_pipeline import cluster, stages
from suti.formats import cluster_shards
from data_pipeline.runner_local import run_local
from data_pipeline.stats import TaskResult
from suti.toy.web import write_toyweb
from suti.config import load_config
from shared_fixtures import read_truth
from suti.core.shards import list_shards

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline", "toy.py")


def _sample(order, page, url, pixels=None):
  return cluster.BucketedSample(order=(0, order), key=f"k{order}", page_key=page, key_source="page_url", url=url,
                                normalized_url=url, caption="c", content_hash=pixels or url,
                                image=np.zeros((2, 2, 3), np.uint8))


def test_dedup_and_size_limits_count_every_sample():
  samples = [
      _sample(0, "p1", "u1"), _sample(1, "p1", "u2"), _sample(2, "p1", "u3"),
      _sample(3, "p1", "u1-copy", pixels="u1"),  # same pixels under another URL
      _sample(4, "p1", "u2", pixels="other"),  # same URL on the same page, other bytes
      _sample(5, "p2", "v1"), _sample(6, "p2", "v2"),  # too small
      *[_sample(10 + i, "p3", f"w{i}") for i in range(5)],  # too large for max_size=4
  ]
  result = TaskResult()
  kept = cluster.dedup_and_limit(list(reversed(samples)), min_size=3, max_size=4, result=result)
  assert [[s.key for s in members] for members in kept] == [["k0", "k1", "k2"]]  # input order restored
  counts = result.stage("cluster")
  assert dict(counts.dropped) == {"duplicate_image": 1, "duplicate_url": 1, "cluster_too_small": 2,
                                  "cluster_too_large": 5}
  assert counts.out == 3 and counts.out + sum(counts.dropped.values()) == len(samples)


def test_stable_hash_is_process_independent():
  assert cluster.stable_hash("https://a.example/") == int.from_bytes(
      hashlib.sha1(b"https://a.example/").digest()[:8], "big")
  assert cluster.cluster_id_of("https://a.example/") == hashlib.sha1(b"https://a.example/").hexdigest()[:16]
  assert all(0 <= cluster.bucket_of(f"p{i}", 7) < 7 for i in range(100))


@pytest.fixture(scope="module")
def toyweb(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cluster_web") / "web")
  write_toyweb(out, 60, seed=3, image_size=16, shard_size=90)
  return out


def _run_clustering(web: str, out: str, num_buckets: int) -> list[cluster_shards.ClusterRecord]:
  config = load_config(CONFIG, [("stages", "('cluster_map', 'cluster_reduce')"),
                                ("cluster.num_buckets", str(num_buckets))])
  layout = stages.RunLayout(tuple(list_shards(web)), out)
  stats = run_local(config, layout, progress=False)
  records = [r for p in sorted(glob.glob(os.path.join(out, "work", "cluster_reduce", "*.tar")))
             for r in cluster_shards.read_cluster_shard(p)]
  return records, stats


def test_clusters_are_pages_and_every_page_with_three_images_is_found(toyweb, tmp_path):
  records, stats = _run_clustering(toyweb, str(tmp_path / "out"), num_buckets=4)
  truth = read_truth(toyweb)
  # Each cluster holds the images of exactly one page, whatever spelling or fallback led there.
  for r in records:
    assert len({truth[k]["page_id"] for k in r.source_keys}) == 1, r.page_url
  found = {truth[r.source_keys[0]]["page_id"] for r in records}
  # An image's identity on its page; exact copies and recrawls share it (near duplicates do not: the
  # CLIP stage handles those).
  ident = lambda t: (t["page_id"], t["subject"], json.dumps(t["context"], sort_keys=True), t["duplicate"] == "near")
  pages = collections.defaultdict(set)
  for t in truth.values():
    if t["corrupt"] is None:
      pages[t["page_id"]].add(ident(t))
  expected = {p for p, idents in pages.items() if len(idents) >= 3}
  assert found == expected
  # Exactly one copy of each image survives.
  kept = [ident(truth[k]) for r in records for k in r.source_keys]
  assert len(kept) == len(set(kept))
  assert set(kept) == set().union(*(pages[p] for p in expected))
  # Counting: the read step's drops are the corrupt files; samples without page URL used the fallback.
  read, grouped = stats["stages"]["read"], stats["stages"]["cluster"]
  assert read["in"] == len(truth) and sum(read["dropped"].values()) == sum(t["corrupt"] is not None
                                                                        for t in truth.values())
  assert grouped["in"] == read["out"] and grouped["out"] == len(kept)
  assert grouped["dropped"]["duplicate_image"] > 0
  assert stats["counters"]["page_url_fallback"] == sum(
      t["page_url"] is None and t["corrupt"] is None for t in truth.values())


def test_bucket_count_does_not_change_the_clusters(toyweb, tmp_path):
  one, _ = _run_clustering(toyweb, str(tmp_path / "b1"), num_buckets=1)
  many, _ = _run_clustering(toyweb, str(tmp_path / "b5"), num_buckets=5)
  as_set = lambda rs: {(r.cluster_id, tuple(r.source_keys), b"".join(i.tobytes() for i in r.images)) for r in rs}
  assert as_set(one) == as_set(many) and len(one) > 10


@pytest.mark.parametrize("packed", [False, True])
def test_cluster_shard_round_trip(tmp_path, packed):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), rng.integers(0, 256, (6, 2, 3), dtype=np.uint8)]
  record = cluster_shards.ClusterRecord("abc123", "https://a.example/", images, ["x", "é"], ["k1", "k2"],
                                        {"clip": {"mean_pairwise_cosine": 0.5}},
                                        [{"prompt": "a sks ball", "skill": "style"}])
  path = str(tmp_path / "clusters-000000.tar")
  other = cluster_shards.ClusterRecord("d", "u", images[:1], ["y"], ["k3"])
  cluster_shards.write_cluster_shard(path, [record, other], packed=packed)
  back = list(cluster_shards.read_cluster_shard(path))
  assert back == [record, other]
  with tarfile.open(path) as tar:
    names = tar.getnames()
  expected = (["shard.index.json", "shard.pixels.bin"] if packed else
              ["abc123.img_0.png", "abc123.img_0.txt", "abc123.img_1.png", "abc123.img_1.txt"])
  assert names[:len(expected)] == expected
  assert record.select([1]).images[0] is images[1]
  with pytest.raises(ValueError):
    cluster_shards.ClusterRecord("bad.id", "u", images[:1], ["x"], ["k"])
