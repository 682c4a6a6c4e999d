"""The toy web crawl: determinism, ground truth, the mess it must contain, the benchmark."""
import argparse
import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from suti.toy import world as tw
from suti.toy import web as toyweb
from data_pipeline.sources import iter_shard
from suti.core.shards import list_shards

PAGES = 60


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("toyweb"))
  summary = toyweb.write_toyweb(out, PAGES, seed=11, image_size=32, shard_size=100)
  return out, summary


@pytest.fixture(scope="module")
def raw(crawl):
  """Every sample straight from the tars: key -> {ext: bytes}."""
  out, _ = crawl
  samples = collections.OrderedDict()
  for name in sorted(os.listdir(out)):
    if not name.endswith(".tar"):
      continue
    with tarfile.open(os.path.join(out, name)) as tar:
      for m in tar.getmembers():
        key, ext = m.name.split(".", 1)
        samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
  return samples


def _meta(fields):
  return json.loads(fields["json"])


def test_same_seed_same_bytes_other_seed_differs(crawl, tmp_path):
  out, _ = crawl
  again = str(tmp_path / "again")
  toyweb.write_toyweb(again, PAGES, seed=11, image_size=32, shard_size=100)
  for root, _, files in os.walk(out):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), out)
      with open(os.path.join(out, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
        assert a.read() == b.read(), rel
  other = str(tmp_path / "other")
  toyweb.write_toyweb(other, PAGES, seed=12, image_size=32, shard_size=100)
  with open(os.path.join(out, "00000.tar"), "rb") as a, open(
      os.path.join(other, "00000.tar"), "rb") as b:
    assert a.read() != b.read()


def test_shards_are_img2dataset_shaped(crawl, raw):
  out, summary = crawl
  samples = raw
  assert len(samples) == summary["samples"]
  assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == [
      f"{i:05d}.tar" for i in range(summary["shards"])]
  for key, fields in samples.items():
    assert "." not in key
    assert {"txt", "json"} <= set(fields) and ({"jpg", "png"} & set(fields))
    meta = _meta(fields)
    assert meta["key"] == key
    assert meta["caption"] == fields["txt"].decode("utf-8")
    assert meta["url"].startswith("https://img.")
    assert meta["status"] == "success"


def test_ground_truth_is_consistent(crawl, raw):
  _, summary = crawl
  pages = collections.defaultdict(list)
  for fields in raw.values():
    toy = _meta(fields)["toy"]
    subject = tw.Subject.from_id(toy["subject"])
    assert toy["class"] == subject.cls
    assert toy["split"] == tw.split_of(subject) == "train"  # held-out subjects stay out
    tw.Context(**toy["context"])  # a valid context
    pages[toy["page_id"]].append((fields, toy))
  assert len(pages) == PAGES
  kinds = collections.Counter(entries[0][1]["page_kind"] for entries in pages.values())
  assert kinds == summary["page_kinds"] and set(kinds) == {"shop", "gallery", "single"}
  for entries in pages.values():
    kind = entries[0][1]["page_kind"]
    subjects = {t["subject"] for _, t in entries if not t["outlier"]}
    if kind in ("shop", "single"):
      assert len(subjects) == 1
    if kind == "shop":
      originals = [t for _, t in entries if t["duplicate"] is None]
      assert 3 <= sum(not t["outlier"] for t in originals) <= 8
      assert sum(t["outlier"] for t in originals) <= 1
    if kind == "gallery":
      assert len({t["subject"] for _, t in entries if t["duplicate"] is None}) >= 3
    # All images of a page sit in one folder of one image host (the page_url-less fallback).
    folders = {_meta(f)["url"].rsplit("/", 1)[0] for f, _ in entries}
    assert len(folders) == 1


def test_pixels_match_the_ground_truth(raw):
  checked = 0
  for fields in raw.values():
    toy = _meta(fields)["toy"]
    if toy["corrupt"] or toy["duplicate"] == "near":
      continue
    expected = tw.render(tw.Subject.from_id(toy["subject"]), tw.Context(**toy["context"]), 32)
    fmt = "png" if "png" in fields else "jpg"
    got = np.asarray(Image.open(io.BytesIO(fields[fmt])).convert("RGB"))
    if fmt == "png":
      assert np.array_equal(got, expected)
    else:
      assert np.abs(got.astype(int) - expected).mean() < 8
    checked += 1
  assert checked > 100


def test_descriptive_captions_describe_the_subject(raw):
  kinds = collections.Counter()
  for fields in raw.values():
    meta = _meta(fields)
    toy = meta["toy"]
    kinds[toy["caption_kind"]] += 1
    if toy["caption_kind"] == "descriptive":
      assert tw.describe_subject(tw.Subject.from_id(toy["subject"])) in meta["caption"]
  assert kinds["descriptive"] > 0 and kinds["useless"] > 0


def test_the_crawl_has_the_mess_mining_must_handle(crawl, raw):
  _, summary = crawl
  by_page = collections.defaultdict(set)
  dup = collections.Counter()
  corrupt = collections.Counter()
  no_page = 0
  for fields in raw.values():
    meta = _meta(fields)
    toy = meta["toy"]
    dup[toy["duplicate"]] += 1
    corrupt[toy["corrupt"]] += 1
    if "page_url" in meta:
      by_page[toy["page_id"]].add(meta["page_url"])
    else:
      no_page += 1
  assert no_page == summary["without_page_url"] > 0
  assert any(len(spellings) > 1 for spellings in by_page.values())
  assert dup["exact"] == summary["exact_duplicates"] > 0
  assert dup["near"] == summary["near_duplicates"] > 0
  assert dup["recrawl"] == summary["recrawls"] > 0
  assert {k for k in corrupt if k} == set(toyweb.CORRUPT_KINDS)
  assert sum(v for k, v in corrupt.items() if k) == summary["corrupt"]
  # Exact duplicates carry the same bytes as their original on another URL.
  images = collections.defaultdict(set)
  for fields in raw.values():
    toy = _meta(fields)["toy"]
    if not toy["corrupt"]:
      data = fields.get("jpg", fields.get("png"))
      images[data].add(toy["duplicate"])
  assert any({None, "exact"} <= kinds for kinds in images.values())


def test_iter_shard_counts_exactly_the_corrupt_samples(crawl, raw):
  out, summary = crawl
  drops = collections.Counter()
  yielded = [s for p in list_shards(out) for s in iter_shard(p, drops)]
  assert len(yielded) + sum(drops.values()) == summary["samples"]
  assert sum(drops.values()) == summary["corrupt"]
  assert all(s.meta["toy"]["corrupt"] is None for s in yielded)
  assert set(drops) <= {"zero_byte", "truncated_image", "undecodable_image"}
  assert drops["zero_byte"] == sum(
      1 for f in raw.values() if _meta(f)["toy"]["corrupt"] == "zero_byte")
  # page_url is None exactly when the json has none.
  assert sum(s.page_url is None for s in yielded) == sum(
      "page_url" not in s.meta for s in yielded)


def test_benchmark_layout(crawl):
  out, summary = crawl
  with open(os.path.join(out, "benchmark", "prompts.json")) as f:
    prompts = json.load(f)
  assert len(prompts) == summary["benchmark_subjects"] == 2 * len(tw.SHAPES)
  per_class = collections.Counter(v["class"] for v in prompts.values())
  assert set(per_class.values()) == {2}
  n_images = 0
  for subject_id, entry in prompts.items():
    subject = tw.Subject.from_id(subject_id)
    assert tw.split_of(subject) == "heldout" and entry["class"] == subject.cls
    files = sorted(os.listdir(os.path.join(out, "benchmark", subject_id)))
    assert 3 <= len(files) <= 5 and files == [f"{i:02d}.png" for i in range(len(files))]
    n_images += len(files)
    for p in entry["prompts"]:
      words = p.split()
      i = words.index(entry["token"])
      assert words[i + 1] == subject.cls and words[i - 1] not in tw.COLOURS
  assert n_images == summary["benchmark_images"]


def test_cli_run_and_errors(tmp_path, capsys):
  parser = argparse.ArgumentParser()
  toyweb.add_arguments(parser)
  out = str(tmp_path / "web")
  args = parser.parse_args(["--out", out, "--pages", "3", "--seed", "1", "--image-size", "16"])
  assert toyweb.run(args) == 0
  assert "toyweb:" in capsys.readouterr().out
  assert Image.open(os.path.join(out, "benchmark", sorted(os.listdir(
      os.path.join(out, "benchmark")))[0], "00.png")).size == (16, 16)
  with pytest.raises(ValueError, match="not empty"):
    toyweb.run(args)
  args.overwrite = True
  assert toyweb.run(args) == 0
  with pytest.raises(ValueError, match="pages"):
    toyweb.write_toyweb(str(tmp_path / "x"), 0, seed=0)
  with pytest.raises(ValueError, match="image size"):
    toyweb.write_toyweb(str(tmp_path / "y"), 3, seed=0, image_size=20)


def test_a_crawl_without_benchmark_subjects_has_an_empty_benchmark(tmp_path):
  summary = toyweb.write_toyweb(str(tmp_path / "w"), pages=3, seed=0, image_size=16, benchmark_per_class=0)
  assert summary["benchmark_subjects"] == 0
  with open(tmp_path / "w" / "benchmark" / "prompts.json") as f:
    assert json.load(f) == {}
