"""CLIP filter decisions on hand-made embeddings (exact), and on the shipped toy CLIP."""
import collections
import os

import numpy as np
import pytest

from data_pipeline import clip_filter
from suti.core.paths import resolve_path
from suti.embed import clip as clip_lib

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline", "toy.py")
CFG = clip_filter.FilterConfig(near_dup_threshold=0.98, outlier_threshold=0.5, cluster_threshold=0.6,
                               max_outlier_fraction=0.5, min_size=3)


def _unit(rows):
  rows = np.asarray(rows, np.float32)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _subject(n, seed=0, spread=0.3, dim=16, axis=0):
  rng = np.random.default_rng(seed)
  base = np.zeros(dim, np.float32)
  base[axis] = 1
  return _unit(base + spread * rng.normal(size=(n, dim)) / np.sqrt(dim))


def test_outlier_removed_and_cluster_kept():
  emb = np.concatenate([_subject(4), _unit([np.eye(16)[5]]), _subject(1, seed=9)])
  d = clip_filter.filter_cluster(emb, CFG)
  assert d.cluster_kept and d.keep == [0, 1, 2, 3, 5]
  assert d.dropped == collections.Counter({"outlier": 1})
  assert d.stats["outliers_removed"] == 1 and d.stats["mean_pairwise_cosine"] > 0.6


def test_near_duplicates_keep_the_first_copy():
  subject = _subject(3)
  emb = np.concatenate([subject, subject[1:2], _unit(subject[0:1] + 1e-3)])
  d = clip_filter.filter_cluster(emb, CFG)
  assert d.keep == [0, 1, 2] and d.dropped == collections.Counter({"near_duplicate": 2})


def test_gallery_of_unrelated_images_is_dropped_whole():
  emb = _unit(np.eye(16)[:6] + 0.05)
  d = clip_filter.filter_cluster(emb, CFG)
  assert not d.cluster_kept and d.keep == []
  assert sum(d.dropped.values()) == 6 and d.dropped["incoherent_cluster"] > 0


def test_too_few_left_after_the_outlier_goes():
  emb = np.concatenate([_subject(2), _unit([np.eye(16)[7]])])
  d = clip_filter.filter_cluster(emb, CFG)
  assert not d.cluster_kept
  assert d.dropped == collections.Counter({"outlier": 1, "too_small_after_filter": 2})


def test_coherence_threshold_decides():
  emb = _subject(4, spread=2.0, seed=3)
  mean = clip_filter._mean_pairwise(emb @ emb.T)
  loose = clip_filter.FilterConfig(0.999, -1.0, mean - 1e-3, 0.5, 3)
  strict = clip_filter.FilterConfig(0.999, -1.0, mean + 1e-3, 0.5, 3)
  assert clip_filter.filter_cluster(emb, loose).cluster_kept
  d = clip_filter.filter_cluster(emb, strict)
  assert not d.cluster_kept and d.dropped == collections.Counter({"incoherent_cluster": 4})


@pytest.mark.parametrize("seed", range(20))
def test_every_image_is_kept_or_counted(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 12))
  emb = _unit(rng.normal(size=(n, 8)) + rng.normal(size=8) * rng.uniform(0, 3))
  d = clip_filter.filter_cluster(emb, CFG)
  assert len(d.keep) + sum(d.dropped.values()) == n
  assert d.cluster_kept == bool(d.keep)


def _toy_clip_or_skip():
  checkpoint = resolve_path("checkpoints/toy_clip/open_clip_model.safetensors")
  if not os.path.exists(checkpoint):
    pytest.skip("toy CLIP checkpoint not shipped yet")
  return clip_lib.load_clip("toy-ViT-32", checkpoint)[0]


def test_toy_clip_separates_one_subject_from_a_gallery(capsys):
  from suti.toy import world as tw
  from suti.config import load_config
  model = _toy_clip_or_skip()
  cfg = clip_filter.filter_config(load_config(CONFIG))
  rng = np.random.default_rng(0)
  subjects = tw.subjects_of_split("train")
  shop_kept = gallery_kept = 0
  for trial in range(12):
    subject = subjects[int(rng.integers(len(subjects)))]
    shop = [tw.render(subject, tw.sample_context(rng), 32) for _ in range(5)]
    gallery = [tw.render(subjects[int(i)], tw.sample_context(rng), 32)
               for i in rng.choice(len(subjects), 5, replace=False)]
    emb = clip_lib.embed_images(model, shop + gallery, batch_size=16)
    shop_kept += clip_filter.filter_cluster(emb[:5], cfg).cluster_kept
    gallery_kept += clip_filter.filter_cluster(emb[5:], cfg).cluster_kept
  print(f"shops kept {shop_kept}/12, galleries kept {gallery_kept}/12")
  # Random 5-subject galleries sometimes hold 3 look-alikes (same colour or shape): rare, not never.
  assert shop_kept >= 11 and gallery_kept <= 2
