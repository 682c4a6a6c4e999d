"""The training input stream: determinism, exact resume, per-host split, skipped samples, ICL neighbors."""
from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from suti.core.safe_image import ImageRejected, decode_image
from suti.core.tar_io import write_tar
from suti.toy.web import write_toyweb
from suti.core.image_ops import resize_and_crop, to_model_range
from suti.train.input_pipeline import InputPosition, TrainInput, resolve_shards
from shared_fixtures import byte_tokenizer, detokenize

TEXT_LEN = 12
SIZE = 8


byte_tokenize = byte_tokenizer(TEXT_LEN)


def png(color: tuple[int, int, int], height: int = 12, width: int = 10) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((height, width, 3), color, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def pair_color(index: int) -> tuple[int, int, int]:
  return (index % 256, (index * 7) % 256, 255 - index % 256)


def write_pair_shards(folder: str, n_shards: int, per_shard: int, bad: dict[int, str] | None = None) -> list[str]:
  """Shards of solid-colour pairs; sample i has key k{i:04d}, colour pair_color(i) and caption "c{i}".
  bad[i] = "image" (undecodable bytes) or "caption" (no txt, json without caption)."""
  bad = bad or {}
  os.makedirs(folder, exist_ok=True)
  paths = []
  for s in range(n_shards):
    members = []
    for i in range(s * per_shard, (s + 1) * per_shard):
      key = f"k{i:04d}"
      image = b"not an image at all" if bad.get(i) == "image" else png(pair_color(i), 12 + i % 5, 10 + i % 3)
      members.append((f"{key}.png", image))
      if bad.get(i) != "caption":
        members.append((f"{key}.txt", f"c{i}".encode()))
      members.append((f"{key}.json", json.dumps({"key": key, "url": f"https://x/{i}.png"}).encode()))
    paths.append(os.path.join(folder, f"{s:05d}.tar"))
    write_tar(paths[-1], members)
  return paths


def take(stream: TrainInput, n: int) -> list[dict[str, np.ndarray]]:
  return [next(stream) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def epoch_keys(shards, epoch: int = 0, **kw) -> list[str]:
  """Keys of one whole epoch of a stream (batch size 1, so no batch spans two epochs)."""
  keys = []
  with TrainInput(shards, kind="pairs", image_size=SIZE, batch_size=1, tokenize=byte_tokenize,
                  position=InputPosition(epoch, 0), **kw) as stream:
    while True:
      batch = next(stream)
      if stream.position.epoch != epoch:
        return keys
      keys.append(str(batch["keys"][0]))


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> str:
  """5 shards x 6 samples; sample 4's image is undecodable, sample 17 has no caption: 28 usable of 30."""
  folder = str(tmp_path_factory.mktemp("pairs"))
  write_pair_shards(folder, 5, 6, bad={4: "image", 17: "caption"})
  return folder


def pairs_input(shards, **kw) -> TrainInput:
  kw = {"image_size": SIZE, "batch_size": 4, "tokenize": byte_tokenize, "shuffle_buffer": 8, **kw}
  return TrainInput(shards, kind="pairs", **kw)


# ----------------------------------------------------------------------------------------------
# image_ops

def test_resize_and_crop_takes_the_center_of_wide_and_tall_images():
  wide = np.zeros((40, 80, 3), np.uint8)
  wide[:, :20], wide[:, 20:60], wide[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  for image in (wide, wide.transpose(1, 0, 2).copy()):
    out = resize_and_crop(image, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to([0, 255, 0], (16, 16, 3)))
    assert out[..., 1].min() >= 200 and out[..., [0, 2]].max() <= 40  # only the green middle, softened edge
  # Shorter side already at size: a pure center crop, pixel for pixel.
  noise = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  np.testing.assert_array_equal(resize_and_crop(noise, 16), noise[:, 4:20])
  np.testing.assert_array_equal(resize_and_crop(noise.transpose(1, 0, 2), 16), noise.transpose(1, 0, 2)[4:20])


def test_resize_and_crop_downscale_averages():
  checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
  out = resize_and_crop(np.repeat(checker[..., None], 3, -1), 8)
  assert np.abs(out.astype(int) - 128).max() <= 2  # antialiased: the mean grey, not aliased black/white


def test_to_model_range_and_bad_input():
  np.testing.assert_array_equal(to_model_range(np.array([0, 255], np.uint8)), np.array([-1, 1], np.float32))
  assert to_model_range(np.zeros((2, 2, 3), np.uint8)).dtype == np.float32
  with pytest.raises(ValueError, match="uint8"):
    resize_and_crop(np.zeros((4, 4, 3), np.float32), 2)
  with pytest.raises(ValueError, match="uint8"):
    to_model_range(np.zeros(3, np.float32))


# ----------------------------------------------------------------------------------------------
# The stream

def test_batch_shapes_dtypes_and_content(pair_shards):
  with pairs_input(pair_shards) as stream:
    batches = take(stream, 3)
  for batch in batches:
    assert sorted(batch) == ["ids", "images", "keys", "text_mask", "texts"]
    assert batch["images"].shape == (4, SIZE, SIZE, 3) and batch["images"].dtype == np.float32
    assert batch["ids"].shape == (4, TEXT_LEN) and batch["ids"].dtype == np.int32
    assert batch["text_mask"].shape == (4, TEXT_LEN) and batch["keys"].shape == (4,)
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    for key, image, ids in zip(batch["keys"], batch["images"], batch["ids"]):
      index = int(key[1:])
      expected = np.asarray(pair_color(index), np.float32) * (2 / 255) - 1
      np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), atol=1e-6)
      assert detokenize(ids) == f"c{index}"
    assert [str(t) for t in batch["texts"]] == [f"c{int(k[1:])}" for k in batch["keys"]]


def test_same_seed_same_batches_other_seed_other_order(pair_shards):
  with pairs_input(pair_shards, seed=3) as a, pairs_input(pair_shards, seed=3, prefetch=0) as b, \
      pairs_input(pair_shards, seed=4) as c:
    first, again, other = take(a, 9), take(b, 9), take(c, 9)
  assert_same_batches(first, again)  # with and without the prefetch thread
  keys = lambda bs: [k for b in bs for k in b["keys"]]
  assert keys(first) != keys(other)
  assert sorted(keys(first)[:28]) == sorted(keys(other)[:28])  # the same epoch, another order


@pytest.mark.parametrize("resume_after", [0, 2, 6, 7, 8])
def test_resume_yields_exactly_the_uninterrupted_batches(pair_shards, resume_after):
  # 28 usable samples per epoch in batches of 4: batch 7 ends epoch 0, so 6/7/8 sit around the boundary.
  with pairs_input(pair_shards, seed=1) as stream:
    reference, positions = [], []
    for _ in range(12):
      reference.append(next(stream))
      positions.append(stream.position)
  assert positions[6].epoch == 0 and positions[6].consumed >= 28 and positions[7].epoch == 1
  start = positions[resume_after - 1] if resume_after else InputPosition()
  restored = InputPosition.from_array(start.to_array())
  assert restored == start
  with pairs_input(pair_shards, seed=1, position=restored) as resumed:
    assert resumed.position == start
    assert_same_batches(take(resumed, 4), reference[resume_after:resume_after + 4])
    assert resumed.position == positions[resume_after + 3]


def test_position_counts_skipped_samples_and_only_handed_out_batches(tmp_path):
  write_pair_shards(str(tmp_path), 1, 12, bad={4: "image"})
  with pairs_input(str(tmp_path), shuffle_buffer=0, batch_size=5, prefetch=2) as stream:
    next(stream)
    assert stream.position == InputPosition(0, 6)  # samples 0..5, sample 4 skipped
    next(stream)
    assert stream.position == InputPosition(0, 11)
    assert stream.counters == collections.Counter({"undecodable_image": 1})


def test_two_hosts_read_disjoint_keys_covering_the_epoch(tmp_path):
  write_toyweb(str(tmp_path), pages=8, seed=5, image_size=16, shard_size=7, benchmark_per_class=1)
  shards = resolve_shards(str(tmp_path))
  readable = set()
  for path in shards:  # independent of the loader: decodable image and a non-empty caption
    with tarfile.open(path) as tar:
      fields = collections.defaultdict(dict)
      for info in tar:
        key, ext = info.name.split(".", 1)
        fields[key][ext] = tar.extractfile(info).read()
    for key, f in fields.items():
      try:
        decode_image(f.get("png") or f["jpg"])
      except ImageRejected:
        continue
      if f["txt"].decode().strip():
        readable.add(key)
  assert len(shards) >= 4 and len(readable) > 30
  for epoch in (0, 1):
    host0 = epoch_keys(shards, epoch, process_index=0, process_count=2, seed=9)
    host1 = epoch_keys(shards, epoch, process_index=1, process_count=2, seed=9)
    assert len(host0) == len(set(host0)) and len(host1) == len(set(host1))
    assert not set(host0) & set(host1)
    assert set(host0) | set(host1) == readable
    assert host0 and host1


def test_corrupt_inputs_are_counted_by_reason_and_skipped(tmp_path):
  write_pair_shards(str(tmp_path), 2, 5, bad={1: "image", 7: "caption"})
  # A third shard cut in the middle of sample 12's image: samples 10 and 11 survive, the rest is lost.
  write_pair_shards(str(tmp_path / "src"), 3, 5)
  whole = (tmp_path / "src" / "00002.tar").read_bytes()
  with tarfile.open(tmp_path / "src" / "00002.tar") as tar:
    cut = next(i.offset_data for i in tar if i.name == "k0012.png") + 20
  (tmp_path / "00002.tar").write_bytes(whole[:cut])
  (tmp_path / "00003.tar").write_bytes(b"\x00garbage" * 100)
  write_pair_shards(str(tmp_path / "clean"), 5, 2)  # a clean shard (k0008, k0009 again) to end the epoch with
  os.replace(tmp_path / "clean" / "00004.tar", tmp_path / "00004.tar")
  shards = resolve_shards(str(tmp_path))
  assert len(shards) == 5
  # Skips are counted with the batch that follows them; with the clean shard read last, every skip of
  # epoch 0 lands in an epoch-0 batch.
  kw = {"kind": "pairs", "image_size": SIZE, "batch_size": 1, "tokenize": byte_tokenize, "shuffle_buffer": 0}
  seed = next(s for s in range(100) if TrainInput(shards, seed=s, **kw).host_shards(0)[-1] == shards[-1])
  keys = []
  with TrainInput(shards, seed=seed, **kw) as stream:
    while True:
      counts = collections.Counter(stream.counters)
      batch = next(stream)
      if stream.position.epoch > 0:
        break
      keys.append(str(batch["keys"][0]))
  assert sorted(keys) == sorted(f"k{i:04d}" for i in (0, 2, 3, 4, 5, 6, 8, 8, 9, 9, 10, 11))
  assert counts == collections.Counter(
      {"undecodable_image": 1, "missing_caption": 1, "truncated_tar": 1, "unreadable_shard": 1})


def test_truncation_between_members_is_counted(tmp_path):
  (path,) = write_pair_shards(str(tmp_path / "src"), 1, 4)
  with tarfile.open(path) as tar:
    cut = next(i.offset for i in tar if i.name == "k0002.png")  # the header of sample 2: a clean cut
  (tmp_path / "cut.tar").write_bytes(open(path, "rb").read()[:cut])
  with TrainInput(str(tmp_path / "cut.tar"), kind="pairs", image_size=SIZE, batch_size=2,
                  tokenize=byte_tokenize, shuffle_buffer=0) as stream:
    assert list(next(stream)["keys"]) == ["k0000", "k0001"]
    assert list(next(stream)["keys"]) == ["k0000", "k0001"]  # epoch 1; the cut was seen at the end of epoch 0
    assert stream.counters == collections.Counter({"truncated_tar": 1})


# ----------------------------------------------------------------------------------------------
# ICL examples

def neighbor_color(sample: int, n: int) -> tuple[int, int, int]:
  return (sample * 20, n * 40, 100)


def write_icl_shard(path: str, neighbor_counts: list[int]) -> None:
  members = []
  for i, count in enumerate(neighbor_counts):
    key = f"cl{i:03d}_0"
    members += [(f"{key}.target.png", png((200, 200, i))), (f"{key}.target.txt", f"t{i}".encode())]
    for n in range(count):
      members += [(f"{key}.neighbor_{n}.png", png(neighbor_color(i, n), 9, 14)),
                  (f"{key}.neighbor_{n}.txt", f"n{i}.{n}".encode())]
    members.append((f"{key}.meta.json", json.dumps({"cluster_id": f"cl{i:03d}"}).encode()))
  write_tar(path, members)


def icl_input(path: str, **kw) -> TrainInput:
  return TrainInput(path, kind="icl", image_size=SIZE, batch_size=9, tokenize=byte_tokenize, num_neighbors=3,
                    shuffle_buffer=0, **kw)


def test_icl_neighbors_padding_mask_and_choice_of_k(tmp_path):
  counts = [1, 3, 5, 0, 2, 5, 5, 5, 5, 5]
  write_icl_shard(str(tmp_path / "icl-000000.tar"), counts)
  with icl_input(str(tmp_path)) as stream:
    batch = next(stream)
    assert stream.counters == collections.Counter({"no_neighbors": 1})
  with icl_input(str(tmp_path)) as again:
    assert_same_batches([batch], [next(again)])
  assert batch["neighbor_images"].shape == (9, 3, SIZE, SIZE, 3) and batch["neighbor_images"].dtype == np.float32
  assert batch["neighbor_ids"].shape == (9, 3, TEXT_LEN) and batch["neighbor_ids"].dtype == np.int32
  assert batch["neighbor_text_mask"].shape == (9, 3, TEXT_LEN) and batch["neighbor_mask"].dtype == bool
  chosen_sets = set()
  for row, key in enumerate(batch["keys"]):
    sample = int(key[2:5])
    assert detokenize(batch["ids"][row]) == f"t{sample}"
    present = min(counts[sample], 3)
    np.testing.assert_array_equal(batch["neighbor_mask"][row], np.arange(3) < present)
    assert not batch["neighbor_images"][row, present:].any()  # zero padding
    chosen = []
    for j in range(present):
      text = detokenize(batch["neighbor_ids"][row, j])
      n = int(text.split(".")[1])
      assert text == f"n{sample}.{n}"
      expected = np.asarray(neighbor_color(sample, n), np.float32) * (2 / 255) - 1
      np.testing.assert_allclose(batch["neighbor_images"][row, j], np.broadcast_to(expected, (SIZE, SIZE, 3)),
                                 atol=1e-6)  # the image and its own caption stay together
      chosen.append(n)
    assert chosen == sorted(set(chosen)) and all(n < counts[sample] for n in chosen)
    if counts[sample] <= 3:
      assert chosen == list(range(counts[sample]))
    else:
      chosen_sets.add(tuple(chosen))
  assert len(chosen_sets) > 1  # K of 5 picked by the rng, not always the first K


def test_icl_resume_picks_the_same_neighbors(tmp_path):
  write_icl_shard(str(tmp_path / "icl-000000.tar"), [5] * 6)
  write_icl_shard(str(tmp_path / "icl-000001.tar"), [4] * 6)
  kw = {"image_size": SIZE, "tokenize": byte_tokenize, "num_neighbors": 3, "batch_size": 2, "shuffle_buffer": 4,
        "seed": 2}
  with TrainInput(str(tmp_path), kind="icl", **kw) as stream:
    reference = take(stream, 5)
    position = stream.position
    reference += take(stream, 3)
  with TrainInput(str(tmp_path), kind="icl", position=position, **kw) as resumed:
    assert_same_batches(take(resumed, 3), reference[5:])


# ----------------------------------------------------------------------------------------------
# Shard specs and errors

def test_resolve_shards_specs(tmp_path):
  paths = write_pair_shards(str(tmp_path), 3, 1)
  assert resolve_shards(str(tmp_path)) == paths
  assert resolve_shards(str(tmp_path / "*.tar")) == paths
  assert resolve_shards(f"{paths[2]},{paths[0]}") == [paths[0], paths[2]]
  assert resolve_shards(str(tmp_path / "0000{0..1}.tar")) == paths[:2]
  assert resolve_shards([paths[1], paths[1]]) == [paths[1]]
  assert resolve_shards("gs://bucket/train-{000..002}.tar") == [f"gs://bucket/train-{i:03d}.tar" for i in range(3)]
  with pytest.raises(ValueError, match="data.shards '.*nothing-\\*.tar' matches no shards"):
    resolve_shards(str(tmp_path / "nothing-*.tar"))


def test_errors_no_shards_and_fewer_shards_than_processes(tmp_path):
  with pytest.raises(ValueError, match="matches no shards"):
    pairs_input(str(tmp_path))
  write_pair_shards(str(tmp_path), 2, 1)
  with pytest.raises(ValueError, match="2 shards.*3 processes"):
    pairs_input(str(tmp_path), process_count=3, process_index=0)
  with pytest.raises(ValueError, match="kind"):
    TrainInput(str(tmp_path), kind="video", image_size=SIZE, batch_size=1, tokenize=byte_tokenize)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_unusable_data_raises_instead_of_hanging(tmp_path, prefetch):
  write_pair_shards(str(tmp_path), 1, 3, bad={0: "image", 1: "image", 2: "caption"})
  (tmp_path / "00001.tar").write_bytes(b"")
  with pairs_input(str(tmp_path), prefetch=prefetch) as stream:
    with pytest.raises(ValueError, match="no usable samples in data.shards.*undecodable_image"):
      next(stream)
    with pytest.raises(ValueError, match="no usable samples"):
      next(stream)  # stays failed
  assert not any(t.name == "TrainInput-prefetch" for t in threading.enumerate())


def test_close_stops_the_prefetch_thread(pair_shards):
  stream = pairs_input(pair_shards, prefetch=2)
  next(stream)
  assert any(t.name == "TrainInput-prefetch" for t in threading.enumerate())
  stream.close()
  assert not any(t.name == "TrainInput-prefetch" for t in threading.enumerate())
  with pytest.raises(ValueError, match="closed"):
    next(stream)


def test_streams_through_webdataset_urls(pair_shards):
  """Remote-style specs (here pipe:) go through webdataset's gopen and give the same batches as paths."""
  paths = resolve_shards(pair_shards)
  with pairs_input([f"pipe:cat {p}" for p in paths], shuffle_buffer=0) as piped, \
      pairs_input(paths, shuffle_buffer=0) as local:
    assert [list(b["keys"]) for b in take(piped, 3)] == [list(b["keys"]) for b in take(local, 3)]


def test_icl_undecodable_neighbor_is_dropped_and_counted(tmp_path):
  key = "cl000_0"
  write_tar(str(tmp_path / "icl-000000.tar"), [
      (f"{key}.target.png", png((1, 2, 3))), (f"{key}.target.txt", b"t"),
      (f"{key}.neighbor_0.png", b"broken"), (f"{key}.neighbor_0.txt", b"n0"),
      (f"{key}.neighbor_1.png", png(neighbor_color(0, 1))), (f"{key}.neighbor_1.txt", b"n1")])
  with icl_input(str(tmp_path), prefetch=0) as stream:
    batch = next(stream)  # 9 copies of the one example, over 9 epochs
    assert stream.counters == collections.Counter({"neighbor_undecodable_image": 9})
  np.testing.assert_array_equal(batch["neighbor_mask"], np.tile([True, False, False], (9, 1)))
  assert {detokenize(ids) for ids in batch["neighbor_ids"][:, 0]} == {"n1"}
