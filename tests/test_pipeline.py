"""The whole pipeline on a toy web: pure clusters, shop pages recovered, galleries dropped, counts exact,
output format, hostile inputs, the transformers caption backends on tiny local models, the CLI."""
import collections
import glob
import io
import json
import os
import tarfile

import numpy as np
import pytest

from data_pipeline import cli, prompt_templates, stages
from suti.formats import cluster_shards
from data_pipeline.runner_local import run_local
from suti.toy.web import write_toyweb
from suti.config import load_config
from shared_fixtures import read_truth
from suti.core.tar_io import write_tar
from suti.core.shards import list_shards
from suti.core.png import encode_png

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline", "toy.py")
NO_CLIP = [("stages", "('cluster_map', 'cluster_reduce', 'captions')")]


def read_clusters(out: str) -> list[cluster_shards.ClusterRecord]:
  return [r for p in sorted(glob.glob(os.path.join(out, "clusters", "clusters-*.tar")))
          for r in cluster_shards.read_cluster_shard(p)]


def run(web: str, out: str, overrides=(), **kwargs) -> dict:
  config = load_config(CONFIG, list(overrides))
  return run_local(config, stages.RunLayout(tuple(list_shards(web)), out), progress=False, **kwargs)


@pytest.fixture(scope="session")
def toyweb(tmp_path_factory):
  out = str(tmp_path_factory.getbasetemp() / "pipeline_toyweb")
  if not os.path.exists(os.path.join(out, "00000.tar")):
    write_toyweb(out, 100, seed=0, image_size=32, shard_size=120)
  return out


@pytest.fixture(scope="session")
def full_run(toyweb, tmp_path_factory):
  out = str(tmp_path_factory.getbasetemp() / "pipeline_full_run")
  stats = run(toyweb, out)
  return out, stats


def test_counts_balance_and_chain(full_run):
  out, stats = full_run
  with open(os.path.join(out, "stats.json")) as f:
    assert json.load(f) == stats
  s = stats["stages"]
  assert list(s) == ["read", "cluster", "clip_filter", "captions"]
  for name, c in s.items():
    assert c["in"] == c["out"] + sum(c["dropped"].values()), name
  assert s["cluster"]["in"] == s["read"]["out"]
  assert s["clip_filter"]["in"] == s["cluster"]["out"]
  assert s["captions"]["in"] == s["clip_filter"]["out"] == s["captions"]["out"]
  records = read_clusters(out)
  assert stats["counters"]["clusters_out"] == len(records)
  assert sum(len(r.images) for r in records) == s["captions"]["out"]
  assert s["read"]["dropped"] and s["clip_filter"]["dropped"].get("incoherent_cluster", 0) > 0


def test_clusters_are_pure_and_shop_pages_recovered(full_run, toyweb):
  out, _ = full_run
  truth = read_truth(toyweb)
  records = read_clusters(out)
  pure = [len({truth[k]["subject"] for k in r.source_keys}) == 1 for r in records]
  purity = sum(pure) / len(records)
  # Shop pages that still have 3+ distinct images of their subject after corrupt files and copies.
  shop_images = collections.defaultdict(set)
  for t in truth.values():
    if t["page_kind"] == "shop" and not t["outlier"] and t["corrupt"] is None and t["duplicate"] is None:
      shop_images[t["page_id"]].add(json.dumps(t["context"], sort_keys=True))
  recoverable = {p for p, imgs in shop_images.items() if len(imgs) >= 3}
  recovered = {truth[r.source_keys[0]]["page_id"] for r, ok in zip(records, pure) if ok} & recoverable
  recall = len(recovered) / len(recoverable)
  print(f"purity {purity:.3f} recall {recall:.3f} ({len(records)} clusters, {len(recoverable)} shop pages)")
  assert purity >= 0.97 and recall >= 0.9
  # Galleries are gone; near duplicates and outliers mostly gone.
  assert not [r for r in records if truth[r.source_keys[0]]["page_kind"] == "gallery"]
  kept = [truth[k] for r in records for k in r.source_keys]
  assert sum(t["outlier"] for t in kept) <= 1
  # One copy of each picture survives (the original, an exact copy or a re-encoded near copy).
  pictures = [(t["page_id"], t["subject"], json.dumps(t["context"], sort_keys=True)) for t in kept]
  assert len(pictures) == len(set(pictures))


def test_output_format(full_run):
  out, _ = full_run
  records = read_clusters(out)
  assert records
  for r in records:
    assert len(r.images) == len(r.captions) == len(r.source_keys) >= 3
    assert all(img.shape == (32, 32, 3) for img in r.images)
    meta = r.meta_json()
    assert meta["cluster_id"] == r.cluster_id and meta["page_url"].startswith("https://")
    clip = meta["clip"]
    assert clip["model"] == "toy-ViT-32" and clip["mean_pairwise_cosine"] >= 0.0
    assert len(clip["per_image_mean_cosine"]) == len(r.images)
    assert len(meta["alt_texts"]) == len(r.captions)
    subject = f"sks {meta['class_noun']}"
    assert {p["skill"] for p in r.prompts} == set(prompt_templates.SKILLS)
    assert all(subject in p["prompt"] for p in r.prompts)
  # webdataset reads the shards: one sample per cluster, keyed by cluster id.
  import webdataset as wds
  first = sorted(glob.glob(os.path.join(out, "clusters", "*.tar")))[0]
  sample = next(iter(wds.WebDataset(first, shardshuffle=False)))
  assert {"img_0.png", "img_0.txt", "prompts.json", "meta.json"} <= set(sample)
  assert json.loads(sample["meta.json"])["cluster_id"] == sample["__key__"]


def test_pipeline_never_reads_the_toy_ground_truth(full_run, toyweb, tmp_path):
  """The same crawl with the "toy" key stripped from every sample JSON gives the same clusters."""
  out, _ = full_run
  stripped = tmp_path / "stripped"
  stripped.mkdir()
  for path in sorted(glob.glob(os.path.join(toyweb, "*.tar"))):
    members = []
    with tarfile.open(path) as tar:
      for m in tar:
        data = tar.extractfile(m).read()
        if m.name.endswith(".json"):
          meta = json.loads(data)
          meta.pop("toy")
          data = json.dumps(meta).encode()
        members.append((m.name, data))
    write_tar(str(stripped / os.path.basename(path)), members)
  run(str(stripped), str(tmp_path / "out"))
  for a in sorted(glob.glob(os.path.join(out, "clusters", "*.tar"))):
    with open(a, "rb") as fa, open(tmp_path / "out" / "clusters" / os.path.basename(a), "rb") as fb:
      assert fa.read() == fb.read()


def _tar_with(path, entries):
  """entries: (TarInfo kwargs, bytes or None)."""
  with tarfile.open(path, "w") as tar:
    for name, data, kind in entries:
      info = tarfile.TarInfo(name)
      if kind == "sym":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
      elif kind == "hard":
        info.type, info.linkname = tarfile.LNKTYPE, "../../outside"
        tar.addfile(info)
      else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _png(value):
  return encode_png(np.full((8, 8, 3), value, np.uint8))


def test_hostile_inputs_are_counted_never_fatal(tmp_path):
  web = tmp_path / "web"
  web.mkdir()
  page = json.dumps({"url": "https://img.example/p/1.png", "page_url": "https://a.example/p", "caption": "x"})
  good = [(f"g{i}.png", _png(40 * i), None) for i in range(3)]
  good_meta = [(f"g{i}.json", json.dumps({"url": f"https://img.example/p/{i}.png", "key": f"g{i}",
                                          "page_url": "https://a.example/p"}).encode(), None) for i in range(3)]
  _tar_with(web / "00000.tar", [
      ("../escape.png", _png(1), None), ("../escape.json", page.encode(), None),
      ("/abs/x.png", _png(2), None), ("link.png", None, "sym"), ("hard.png", None, "hard"),
      ("bad.png", _png(3), None), ("bad.json", b"{not json", None),
      ("nourl.png", _png(4), None), ("nourl.json", b"{}", None),
      ("zero.png", b"", None), ("zero.json", page.encode(), None),
      ("garbage.jpg", np.random.default_rng(0).bytes(300), None), ("garbage.json", page.encode(), None),
      ("latin.png", _png(5), None), ("latin.txt", "caf\xe9".encode("latin-1"), None),
      ("latin.json", page.encode(), None),
      *[x for pair in zip(good, good_meta) for x in pair],
  ])
  (web / "00001.tar").write_bytes(b"\0" * 100 + b"this is not a tar")
  with open(web / "00000.tar", "rb") as f:
    (web / "00002.tar").write_bytes(f.read()[:3000])  # truncated mid-member
  before = set(os.listdir(tmp_path))
  out = tmp_path / "out"
  stats = run(str(web), str(out), NO_CLIP)
  assert set(os.listdir(tmp_path)) == before | {"out"}  # nothing escaped the output folder
  for root, _, files in os.walk(out):
    for name in files:
      assert os.path.realpath(os.path.join(root, name)).startswith(os.path.realpath(out))
      assert not os.path.islink(os.path.join(root, name))
  # 00000.tar: 5 unsafe members (two escaping names of one sample, an absolute name, a symlink, a hard link),
  # then one sample per reason and the 3 good ones. 00001.tar: not a tar at all. 00002.tar: 00000.tar cut at
  # byte 3000, which holds the whole 512-byte headers of exactly its first 3 members (all unsafe by name) and
  # stops before the 4th header: 3 unsafe members and the lost rest as one truncated_tar.
  with tarfile.open(web / "00000.tar") as tar:
    headers_in_cut = [m.name for m in tar.getmembers() if m.offset + 512 <= 3000]
  assert headers_in_cut == ["../escape.png", "../escape.json", "/abs/x.png"]
  expected_drops = {"unsafe_member": 5 + len(headers_in_cut), "bad_json": 1, "missing_field:url": 1,
                    "zero_byte": 1, "undecodable_image": 1, "non_utf8_text": 1,  # latin.txt is latin-1 bytes
                    "unreadable_shard": 1, "truncated_tar": 1}
  assert stats["stages"]["read"] == {"in": 3 + sum(expected_drops.values()), "out": 3,
                                     "dropped": dict(sorted(expected_drops.items()))}
  assert stats["stages"]["read"]["in"] == 18
  assert stats["stages"]["cluster"] == {"in": 3, "out": 3, "dropped": {}}
  assert stats["stages"]["captions"] == {"in": 3, "out": 3, "dropped": {}}
  records = read_clusters(str(out))
  assert [r.source_keys for r in records] == [["g0", "g1", "g2"]]  # the good page survives


def _tiny_transformers_models(folder):
  """A random ViT->GPT-2 captioner and a random GPT-2, with a word-level tokenizer; nothing downloaded."""
  import torch
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import (GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, ViTConfig,
                            ViTImageProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel)
  words = "a the sks ball box kite photo of on in beach snow grass wearing hat red blue sketch".split()
  vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                      pad_token="[PAD]", unk_token="[UNK]")
  torch.manual_seed(0)
  gpt = dict(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
  lm_dir, cap_dir = os.path.join(folder, "lm"), os.path.join(folder, "captioner")
  GPT2LMHeadModel(GPT2Config(**gpt)).save_pretrained(lm_dir)
  cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64),
      GPT2Config(**gpt, add_cross_attention=True, is_decoder=True))
  cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
  VisionEncoderDecoderModel(config=cfg).save_pretrained(cap_dir)
  ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(cap_dir)
  for d in (lm_dir, cap_dir):
    tokenizer.save_pretrained(d)
    # Random weights babble special tokens; suppressing them makes the models say words.
    gen = GenerationConfig(decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           suppress_tokens=[0, 1, 3])
    gen.save_pretrained(d)
  return cap_dir, lm_dir, set(words)


def test_transformers_backends_on_tiny_local_models(tmp_path):
  cap_dir, lm_dir, words = _tiny_transformers_models(str(tmp_path / "models"))
  web, out = str(tmp_path / "web"), str(tmp_path / "out")
  write_toyweb(web, 12, seed=1, image_size=16)
  stats = run(web, out, NO_CLIP + [("cluster.num_buckets", "2"), ("captions.backend", "transformers"),
                                      ("captions.captioner_path", cap_dir), ("captions.lm_path", lm_dir),
                                      ("captions.max_new_tokens", "6")])
  records = read_clusters(out)
  assert records and stats["stages"]["captions"]["out"] == sum(len(r.images) for r in records)
  for r in records:
    assert r.meta["captioner"] == "transformers"
    for caption in r.captions:  # written by the captioner: words of its vocabulary, not the alt text
      assert caption and set(caption.split()) <= words
    assert [p["skill"] for p in r.prompts] == list(prompt_templates.SKILLS)
    subject = f"sks {r.meta['class_noun']}"
    assert all(p["prompt"].startswith(f"a {subject}, ") for p in r.prompts)


def test_unknown_backend_and_missing_model_folder_are_one_line_errors(toyweb, tmp_path):
  with pytest.raises(ValueError, match="captions.backend"):
    run(toyweb, str(tmp_path / "a"), NO_CLIP + [("captions.backend", "magic")])
  with pytest.raises(ValueError, match="not a local model folder"):
    run(toyweb, str(tmp_path / "b"), NO_CLIP + [("captions.backend", "transformers"),
                                                ("captions.lm_path", str(tmp_path / "nope"))])


def test_cli_run_and_errors(toyweb, tmp_path, capsys):
  out = str(tmp_path / "out")
  argv = ["run", "--config", CONFIG, "--input", toyweb, "--output", out, "--no-progress",
          "--config.stages=('cluster_map','cluster_reduce','captions')"]
  assert cli.main(argv) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("pipeline (local): ") and "clusters" in last
  # A rerun finds every task done and changes nothing.
  before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "clusters", "*.tar"))}
  assert cli.main(argv) == 0
  assert before == {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "clusters", "*.tar"))}
  # Reusing the folder with another config is refused.
  with pytest.raises(ValueError, match="another config"):
    cli.main(argv + ["--config.cluster.min_size=4"])
  with pytest.raises(ValueError, match="unknown config key"):
    cli.main(argv + ["--config.cluster.nope=1"])
  with pytest.raises(ValueError):
    cli.main(["run", "--config", CONFIG, "--input", str(tmp_path / "missing"), "--output", out])


def test_calibrate_prints_distributions(toyweb, capsys):
  assert cli.main(["calibrate", "--config", CONFIG, "--input", toyweb, "--max-samples", "300"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  report = json.loads(lines[-1])
  same, rand = report["percentiles"]["same_page"], report["percentiles"]["random"]
  assert set(same) == set(rand) == {f"p{p}" for p in (1, 5, 10, 25, 50, 75, 90, 95, 99)}
  assert same["p50"] > rand["p50"]  # pages mostly show one subject
  assert set(report["suggested"]) == {"clip.cluster_threshold", "clip.outlier_threshold", "clip.near_dup_threshold"}


def test_preview_sheet_shows_one_row_per_cluster(full_run, tmp_path):
  from PIL import Image

  from data_pipeline.preview import write_cluster_sheet
  out, stats = full_run
  clusters = [r for p in sorted(glob.glob(os.path.join(out, "clusters", "*.tar")))
              for r in cluster_shards.read_cluster_shard(p)]
  rows = min(len(clusters), 5)
  path = write_cluster_sheet(out, max_clusters=5, max_images=8, cell=16, gap=2)
  sheet = np.asarray(Image.open(path))
  widest = max(min(len(c.images), 8) for c in clusters[:rows])
  assert sheet.shape == (2 + rows * 18, 2 + widest * 18, 3)  # gutter 2 around and between 16-pixel tiles
  # The first tile is the first cluster's first image, resized; past a cluster's last image the row is white.
  first = clusters[0]
  expected = np.asarray(Image.fromarray(first.images[0]).resize((16, 16), Image.NEAREST))
  assert np.array_equal(sheet[2:18, 2:18], expected)
  if len(first.images) < widest:
    assert (sheet[2:18, 2 + 18 * len(first.images):] == 255).all()
  assert write_cluster_sheet(str(tmp_path)) is None  # no clusters, no picture
