"""ICL shards: examples of a cluster, write/read round trip, deterministic bytes, split by cluster, and the
trainer's loader reading them unchanged."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from suti.toy import world as tw
from suti.formats.cluster_shards import ClusterRecord
from suti.core.tar_io import read_tar, write_tar
from suti.formats.icl_shards import (ICLExample, examples_for_cluster, icl_shard_name, icl_shard_path, is_validation,
                                     read_icl_shard, write_icl_shard)
from suti.core.image_ops import resize_and_crop, to_model_range
from suti.train.input_pipeline import TrainInput, resolve_shards
from shared_fixtures import byte_tokenizer, detokenize

SIZE = 32
TEXT_LEN = 64


byte_tokenize = byte_tokenizer(TEXT_LEN)


def cluster(cluster_id: str, subject: tw.Subject, backgrounds: list[str], size: int = SIZE) -> ClusterRecord:
  images = [tw.render(subject, tw.Context(background=bg, variant=i), size) for i, bg in enumerate(backgrounds)]
  captions = [tw.describe(subject, tw.Context(background=bg)) for bg in backgrounds]
  return ClusterRecord(cluster_id, f"https://shop.example/{cluster_id}", images, captions,
                       [f"{cluster_id}k{i}" for i in range(len(images))], meta={"clip": {"mean": 0.9}})


def kept_targets(record: ClusterRecord, subject: tw.Subject, backgrounds: list[str], size: int = SIZE) -> list:
  out = []
  for i, bg in enumerate(backgrounds):
    context = tw.Context(background=bg, variant=100 + i)
    image = tw.render(subject, context, size)
    out.append((image, tw.prompt_for(subject.shape, context, "sks"), "recontextualization", 10 + i,
                {"clip_i": 0.9 - i / 100, "clip_t": 0.25}))
  return out


BALL = tw.Subject("ball", "red", "stripes", "white")
KITE = tw.Subject("kite", "blue")


@pytest.fixture(scope="module")
def examples() -> list[ICLExample]:
  ball = cluster("ballshop", BALL, ["grass", "room", "city", "sky"])
  kite = cluster("kiteshop", KITE, ["night", "ocean"])
  return (examples_for_cluster(ball, kept_targets(ball, BALL, ["beach", "snow"]), "expert-ballshop", 3)
          + examples_for_cluster(kite, kept_targets(kite, KITE, ["beach"]), "expert-kiteshop", 3))


def test_examples_of_a_cluster(examples):
  ball = cluster("ballshop", BALL, ["grass", "room", "city", "sky"])
  first, second, kite = examples
  assert [e.key for e in examples] == ["ballshop_0", "ballshop_1", "kiteshop_0"]
  assert len(first.neighbors) == 3 and all(np.array_equal(a, b) for a, b in zip(first.neighbors, ball.images[:3]))
  assert first.neighbor_captions == ball.captions[:3] and len(kite.neighbors) == 2
  assert first.prompt == "a sks ball on the beach" and second.prompt == "a sks ball in the snow"
  assert first.meta == {"cluster_id": "ballshop", "page_url": "https://shop.example/ballshop",
                        "source_keys": ["ballshopk0", "ballshopk1", "ballshopk2"], "expert_id": "expert-ballshop",
                        "skill": "recontextualization", "seed": 10, "scores": {"clip_i": 0.9, "clip_t": 0.25}}
  assert examples_for_cluster(ball, [], "e", 3) == []
  with pytest.raises(ValueError, match="max_neighbors must be >= 1"):
    examples_for_cluster(ball, [], "e", 0)


def test_write_read_round_trip_and_deterministic_bytes(tmp_path, examples):
  path = str(tmp_path / icl_shard_name(0))
  assert write_icl_shard(path, examples) == 3
  again = read_icl_shard(path)
  assert again == examples
  assert all(e.target.dtype == np.uint8 and e.target.shape == (SIZE, SIZE, 3) for e in again)
  names = [name for name, _ in read_tar(path)]
  assert names[:9] == ["ballshop_0.target.png", "ballshop_0.target.txt", "ballshop_0.neighbor_0.png",
                       "ballshop_0.neighbor_0.txt", "ballshop_0.neighbor_1.png", "ballshop_0.neighbor_1.txt",
                       "ballshop_0.neighbor_2.png", "ballshop_0.neighbor_2.txt", "ballshop_0.meta.json"]
  other = str(tmp_path / "again.tar")
  write_icl_shard(other, read_icl_shard(path))
  with open(path, "rb") as a, open(other, "rb") as b:
    assert a.read() == b.read()


def test_source_resolution_is_kept(tmp_path):
  wide = np.random.default_rng(0).integers(0, 256, (20, 48, 3), dtype=np.uint8)
  record = cluster("c1", BALL, ["grass"], size=16)
  [example] = examples_for_cluster(record, [(wide, "a sks ball", "style", 0, {})], "e", 3)
  write_icl_shard(str(tmp_path / "s.tar"), [example])
  [back] = read_icl_shard(str(tmp_path / "s.tar"))
  assert back.target.shape == (20, 48, 3) and back.neighbors[0].shape == (16, 16, 3) and back == example


def test_bad_shards_are_one_clear_error(tmp_path, examples):
  members = examples[2].members()
  cases = {
      "no_target": ([m for m in members if not m[0].endswith("target.png")], "has no target.png"),
      "no_meta": ([m for m in members if not m[0].endswith("meta.json")], "has no meta.json"),
      "stray": (members + [("kiteshop_0.depth.png", b"x")], "unexpected member 'kiteshop_0.depth.png'"),
      "gap": ([m for m in members if "neighbor_0" not in m[0]], "incomplete neighbors"),
      "bad_meta": ([m if not m[0].endswith("meta.json") else (m[0], b"{") for m in members], "unreadable meta"),
  }
  for name, (tar_members, message) in cases.items():
    write_tar(str(tmp_path / f"{name}.tar"), tar_members)
    with pytest.raises(ValueError, match=message):
      read_icl_shard(str(tmp_path / f"{name}.tar"))
  with pytest.raises(ValueError, match="duplicate example keys"):
    write_icl_shard(str(tmp_path / "dup.tar"), [examples[0], examples[0]])
  bad = ICLExample("a.b_0", examples[0].target, "p", examples[0].neighbors, examples[0].neighbor_captions, {})
  with pytest.raises(ValueError, match="bad ICL example key"):
    write_icl_shard(str(tmp_path / "key.tar"), [bad])
  assert not os.path.exists(tmp_path / "key.tar")
  floats = ICLExample("c_0", examples[0].target / 255.0, "p", examples[0].neighbors, examples[0].neighbor_captions, {})
  with pytest.raises(ValueError, match="c_0: target must be a uint8"):
    write_icl_shard(str(tmp_path / "floats.tar"), [floats])


def test_validation_split_is_stable_and_by_cluster():
  ids = [f"cluster{i:05d}" for i in range(4000)]
  val = [cid for cid in ids if is_validation(cid, 10)]
  assert 320 < len(val) < 480
  assert not any(is_validation(cid, 0) for cid in ids[:200]) and all(is_validation(cid, 100) for cid in ids[:200])
  assert set(val) > {cid for cid in ids if is_validation(cid, 5)}  # a smaller split is a subset of a larger one
  # The same answer in a fresh interpreter with another hash seed: sha256, not Python's hash().
  code = ("from suti.formats.icl_shards import is_validation; "
          "print(''.join('1' if is_validation(f'cluster{i:05d}', 10) else '0' for i in range(300)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
  assert out == "".join("1" if cid in set(val) else "0" for cid in ids[:300])
  with pytest.raises(ValueError, match="val_percent"):
    is_validation("c", 101)


def test_layout_train_glob_excludes_validation(tmp_path, examples):
  out = str(tmp_path)
  assert icl_shard_path(out, 3) == os.path.join(out, "icl", "icl-000003.tar")
  assert icl_shard_path(out, 0, validation=True) == os.path.join(out, "icl", "val", "icl-000000.tar")
  write_icl_shard(icl_shard_path(out, 0), examples[:2])
  write_icl_shard(icl_shard_path(out, 0, validation=True), examples[2:])
  assert resolve_shards(os.path.join(out, "icl", "*.tar")) == [icl_shard_path(out, 0)]


def test_the_trainers_loader_reads_the_shards(tmp_path, examples):
  odd = examples[0]  # a non-square target and a smaller neighbor: the loader resizes them, as image_ops does
  wide = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
  small = tw.render(BALL, tw.Context(background="ocean"), 16)
  extra = ICLExample("odd_0", wide, "a sks ball at night", [small, odd.neighbors[1]], ["tiny", "second"],
                     {"cluster_id": "odd"})
  write_icl_shard(str(tmp_path / icl_shard_name(0)), examples[:2])
  write_icl_shard(str(tmp_path / icl_shard_name(1)), [examples[2], extra])
  written = {e.key: e for e in examples + [extra]}
  with TrainInput(str(tmp_path / "*.tar"), kind="icl", image_size=SIZE, batch_size=4, tokenize=byte_tokenize,
                  num_neighbors=3, shuffle_buffer=0, prefetch=0) as stream:
    batch = next(stream)
    assert not stream.counters
  assert sorted(batch["keys"]) == sorted(written)
  for row, key in enumerate(batch["keys"]):
    e = written[str(key)]
    np.testing.assert_array_equal(batch["images"][row], to_model_range(resize_and_crop(e.target, SIZE)))
    assert batch["texts"][row] == e.prompt and detokenize(batch["ids"][row]) == e.prompt
    assert batch["neighbor_mask"][row].sum() == len(e.neighbors) == min(3, len(e.neighbors))
    for j, (image, caption) in enumerate(zip(e.neighbors, e.neighbor_captions)):
      np.testing.assert_array_equal(batch["neighbor_images"][row, j], to_model_range(resize_and_crop(image, SIZE)))
      assert detokenize(batch["neighbor_ids"][row, j]) == caption
    assert not batch["neighbor_images"][row, len(e.neighbors):].any()
  # Images already at the loader's size go through unchanged.
  row = list(batch["keys"]).index("ballshop_0")
  np.testing.assert_array_equal(batch["images"][row], to_model_range(written["ballshop_0"].target))
