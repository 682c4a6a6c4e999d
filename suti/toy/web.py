"""A synthetic web crawl of the toy world, written as img2dataset-style webdataset shards.

`suti data toyweb --out DIR --pages N --seed S [--image-size 32]` writes

  DIR/NNNNN.tar                 KEY.jpg|png, KEY.txt (alt text), KEY.json (url, page_url, caption,
                                key, status, width, height, and the ground truth under "toy")
  DIR/benchmark/<subject>/NN.png   3-5 reference images of held-out subjects
  DIR/benchmark/prompts.json    {subject: {"class", "token", "prompts"}} (prompts name the class only)

The crawl has what mining must cope with: shop pages (one subject in 3-8 contexts, descriptive or
useless alt text, sometimes one unrelated image), gallery pages (unrelated subjects), single-image
posts, exact and near duplicates, pages crawled under several spellings of their URL, pages
without a page URL, and a few corrupt files. Samples are shuffled across shards, as in a real
crawl. Only train-split subjects appear in the crawl; held-out subjects only in the benchmark.
The same seed gives the same bytes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from suti.core.errors import run_parsed_command
from suti.core.png import encode_png
from suti.core.tar_io import write_tar
from suti.toy import world as tw

# Pages come in blocks of 20 with these kinds, shuffled inside the block, so that even a small
# crawl has every kind in about these proportions.
PAGE_BLOCK = ("shop",) * 13 + ("gallery",) * 5 + ("single",) * 2
SITES = ("acme", "toyshop", "bücher", "gizmo", "kidstore", "café", "hobbyhaus", "emporium",
         "marktplatz", "petitsprix", "spielwaren", "funhouse")
TRACKING = ("utm_source=newsletter&utm_medium=email", "utm_campaign=spring&utm_source=fb",
            "fbclid=IwAR0abc", "gclid=Cj0KCQ")
FRAGMENTS = ("#reviews", "#top", "#gallery")
PAGE_PATHS = {"shop": ("products", "item"), "gallery": ("gallery", "album"), "single": ("blog", "post")}
CORRUPT_KINDS = ("truncated", "zero_byte", "garbage")
BENCHMARK_TOKEN = "sks"

P_MULTI_SPELLING = 0.3  # pages crawled under several spellings of their URL
P_NO_PAGE_URL = 0.1
P_OUTLIER = 0.15  # shop pages with one unrelated image (a banner, another product)
P_EXACT_DUP = 0.05
P_NEAR_DUP = 0.05
P_RECRAWL = 0.15  # per image of a multi-spelling page: seen again under another spelling
P_PNG = 0.15
P_DESCRIPTIVE = 0.6
CORRUPT_FRACTION = 0.015


def _ascii_host(site: str) -> str:
  return site.encode("idna").decode("ascii")


def _page_spelling(rng: np.random.Generator, site: str, path: str,
                   query: list[tuple[str, str]]) -> str:
  """One of the many ways the same page URL is written on the web."""
  scheme = "https" if rng.random() < 0.6 else "http"
  unicode_host = site != _ascii_host(site)
  if unicode_host and rng.random() < 0.5:
    host = f"www.{site}.example"  # an IDN written in Unicode; otherwise in punycode
  else:
    host = f"www.{_ascii_host(site)}.example"
    if rng.random() < 0.3:
      host = "".join(ch.upper() if rng.random() < 0.5 else ch for ch in host)
  if rng.random() < 0.2:
    host += ":443" if scheme == "https" else ":80"
  if rng.random() < 0.2:
    parts = path.split("/")
    path = "/".join(parts[:-1] + ["."] + parts[-1:]) if rng.random() < 0.5 else (
        "/shop/.." + path)
  pairs = list(query)
  if rng.random() < 0.5:
    pairs.reverse()
  text = "&".join(f"{k}={v}" for k, v in pairs)
  if rng.random() < 0.3:
    text = f"{text}&{rng.choice(TRACKING)}" if text else str(rng.choice(TRACKING))
  url = f"{scheme}://{host}{path}" + (f"?{text}" if text else "")
  if rng.random() < 0.2:
    url += str(rng.choice(FRAGMENTS))
  return url


def _encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
  if fmt == "png":
    return encode_png(image)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
  return buf.getvalue()


def _corrupt(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
  if kind == "zero_byte":
    return b""
  if kind == "truncated":
    return data[: max(1, len(data) // 2)]
  return rng.integers(0, 256, size=max(64, len(data) // 2), dtype=np.uint8).tobytes()


def _plan_pages(pages: int, rng: np.random.Generator) -> list[dict[str, Any]]:
  """Per page: kind, site, URL spellings, and the images (subject, context, caption)."""
  train = tw.subjects_of_split("train")
  order = rng.permutation(len(train))
  kinds: list[str] = []
  while len(kinds) < pages:
    kinds += [PAGE_BLOCK[i] for i in rng.permutation(len(PAGE_BLOCK))]
  plan = []
  next_shop = 0
  for pid, kind in enumerate(kinds[:pages]):
    site = str(rng.choice(SITES))
    folder, slug_word = PAGE_PATHS[kind]
    slug = f"{slug_word}-{pid:05d}"
    path = f"/{folder}/{slug}"
    query = sorted([("id", str(pid)), ("ref", str(rng.choice(["catalog", "home", "search"])))])
    n_spellings = 0 if rng.random() < P_NO_PAGE_URL else (
        int(rng.integers(2, 4)) if rng.random() < P_MULTI_SPELLING else 1)
    spellings = [_page_spelling(rng, site, path, query) for _ in range(n_spellings)]
    images = []
    if kind == "shop":
      subject = train[order[next_shop % len(train)]]
      next_shop += 1
      subjects = [subject] * int(rng.integers(3, 9))
      outlier_at = int(rng.integers(0, len(subjects) + 1)) if rng.random() < P_OUTLIER else -1
      if outlier_at >= 0:
        other = subject
        while other == subject:
          other = train[int(rng.integers(len(train)))]
        subjects.insert(outlier_at, other)
    elif kind == "gallery":
      subjects = [train[int(i)] for i in rng.choice(len(train), int(rng.integers(3, 9)),
                                                    replace=False)]
    else:
      subjects = [train[int(rng.integers(len(train)))]] * int(rng.integers(1, 3))
    main = subjects[0] if kind != "shop" else subject
    for i, s in enumerate(subjects):
      context = tw.sample_context(rng)
      descriptive = rng.random() < P_DESCRIPTIVE
      caption = tw.describe(s, context, rng=rng) if descriptive else tw.useless_caption(rng)
      images.append({"subject": s, "context": context, "caption": caption,
                     "caption_kind": "descriptive" if descriptive else "useless",
                     "outlier": kind == "shop" and s != main, "index": i})
    plan.append({"id": f"page-{pid:05d}", "kind": kind, "site": site, "slug": slug,
                 "folder": folder, "spellings": spellings, "images": images})
  return plan


def _page_samples(page: dict, rng: np.random.Generator, image_size: int) -> list[dict[str, Any]]:
  """The crawled samples of one page (before keys, shuffling and corruption)."""
  img_host = f"https://img.{_ascii_host(page['site'])}.example/{page['folder']}/{page['slug']}"
  out = []
  for image in page["images"]:
    pixels = tw.render(image["subject"], image["context"], image_size)
    fmt = "png" if rng.random() < P_PNG else "jpg"
    data = _encode(pixels, fmt, int(rng.integers(85, 96)))
    url = f"{img_host}/{image['index']:02d}.{fmt}"
    spelling = str(rng.choice(page["spellings"])) if page["spellings"] else None
    base = {"image": image, "fmt": fmt, "data": data, "url": url, "page_url": spelling,
            "caption": image["caption"], "duplicate": None, "page": page}
    out.append(base)
    if rng.random() < P_EXACT_DUP:  # the same file again, from a mirror
      out.append(dict(base, url=f"{img_host}/{image['index']:02d}-copy.{fmt}", duplicate="exact"))
    if rng.random() < P_NEAR_DUP:  # a re-encoded, slightly brighter copy
      near = np.clip(pixels.astype(np.int16) + 6, 0, 255).astype(np.uint8)
      out.append(dict(base, data=_encode(near, "jpg", 75), fmt="jpg", duplicate="near",
                      url=f"{img_host}/{image['index']:02d}-small.jpg"))
    if len(page["spellings"]) > 1 and rng.random() < P_RECRAWL:
      others = [s for s in page["spellings"] if s != spelling] or page["spellings"]
      out.append(dict(base, page_url=str(rng.choice(others)), duplicate="recrawl"))
  return out


def _sample_members(key: str, sample: dict, image_size: int) -> list[tuple[str, bytes]]:
  image, page = sample["image"], sample["page"]
  meta = {"url": sample["url"], "caption": sample["caption"], "key": key, "status": "success",
          "error_message": None, "width": image_size, "height": image_size}
  if sample["page_url"] is not None:
    meta["page_url"] = sample["page_url"]
  meta["toy"] = {
      "subject": image["subject"].id, "class": image["subject"].cls,
      "split": tw.split_of(image["subject"]), "page_kind": page["kind"], "page_id": page["id"],
      "context": image["context"].to_dict(), "caption_kind": image["caption_kind"],
      "outlier": image["outlier"], "duplicate": sample["duplicate"],
      "corrupt": sample.get("corrupt")}
  return [(f"{key}.{sample['fmt']}", sample["data"]),
          (f"{key}.txt", sample["caption"].encode("utf-8")),
          (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))]


def _write_benchmark(out_dir: str, rng: np.random.Generator, image_size: int,
                     per_class: int) -> tuple[int, int]:
  heldout = tw.subjects_of_split("heldout")
  prompts: dict[str, dict] = {}
  n_images = 0
  for cls in tw.SHAPES:
    candidates = [s for s in heldout if s.shape == cls]
    for i in rng.choice(len(candidates), min(per_class, len(candidates)), replace=False):
      subject = candidates[int(i)]
      folder = os.path.join(out_dir, "benchmark", subject.id)
      os.makedirs(folder, exist_ok=True)
      for n in range(int(rng.integers(3, 6))):
        context = tw.sample_context(rng, style_p=0.0, accessory_p=0.0)
        pixels = tw.render(subject, context, image_size)
        with open(os.path.join(folder, f"{n:02d}.png"), "wb") as f:
          f.write(_encode(pixels, "png", 0))
        n_images += 1
      prompts[subject.id] = {"class": cls, "token": BENCHMARK_TOKEN,
                             "prompts": tw.benchmark_prompts(cls, BENCHMARK_TOKEN)}
  os.makedirs(os.path.join(out_dir, "benchmark"), exist_ok=True)  # also with no subjects (benchmark_per_class=0)
  with open(os.path.join(out_dir, "benchmark", "prompts.json"), "w", encoding="utf-8") as f:
    json.dump(prompts, f, indent=1, sort_keys=True)
  return len(prompts), n_images


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise ValueError(f"output folder {out_dir!r} is not empty (pass overwrite=True / --overwrite)")
    for name in os.listdir(out_dir):
      if re.fullmatch(r"\d{5}\.tar", name):
        os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, "benchmark"), ignore_errors=True)
  os.makedirs(out_dir, exist_ok=True)


def write_toyweb(out_dir: str, pages: int, seed: int, image_size: int = 32,
                 shard_size: int = 500, *, benchmark_per_class: int = 2,
                 overwrite: bool = False, progress: bool = False) -> dict:
  """Write the toy crawl and benchmark under `out_dir`; returns a summary of what was written."""
  if pages < 1:
    raise ValueError(f"pages must be >= 1, got {pages}")
  if image_size not in tw.SIZES_PX:
    raise ValueError(f"image size must be one of {tw.SIZES_PX}, got {image_size}")
  if not 1 <= shard_size <= 10000:
    raise ValueError(f"shard size must be in 1..10000, got {shard_size}")
  _prepare_out_dir(out_dir, overwrite)
  rng = np.random.default_rng(seed)
  plan = _plan_pages(pages, rng)

  samples: list[dict] = []
  pages_iter = plan
  if progress:
    pages_iter = tqdm(plan, desc="toyweb pages", unit="page")
  for page in pages_iter:
    samples += _page_samples(page, rng, image_size)
  samples = [samples[int(i)] for i in rng.permutation(len(samples))]

  n_corrupt = min(len(samples), max(len(CORRUPT_KINDS), round(CORRUPT_FRACTION * len(samples))))
  for j, i in enumerate(sorted(rng.choice(len(samples), n_corrupt, replace=False))):
    kind = CORRUPT_KINDS[j % len(CORRUPT_KINDS)]
    samples[int(i)] = dict(samples[int(i)], corrupt=kind,
                           data=_corrupt(samples[int(i)]["data"], kind, rng))

  n_shards = (len(samples) + shard_size - 1) // shard_size
  for shard in range(n_shards):
    members: list[tuple[str, bytes]] = []
    for j, sample in enumerate(samples[shard * shard_size:(shard + 1) * shard_size]):
      members += _sample_members(f"{shard:05d}{j:04d}", sample, image_size)
    write_tar(os.path.join(out_dir, f"{shard:05d}.tar"), members)

  n_subjects, n_bench_images = _write_benchmark(out_dir, rng, image_size, benchmark_per_class)
  kinds = [p["kind"] for p in plan]
  dup = [s["duplicate"] for s in samples]
  return {
      "out_dir": out_dir, "pages": pages, "seed": seed, "image_size": image_size,
      "page_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
      "samples": len(samples), "shards": n_shards, "corrupt": n_corrupt,
      "exact_duplicates": dup.count("exact"), "near_duplicates": dup.count("near"),
      "recrawls": dup.count("recrawl"),
      "without_page_url": sum(s["page_url"] is None for s in samples),
      "outliers": sum(s["image"]["outlier"] for s in samples),
      "benchmark_subjects": n_subjects, "benchmark_images": n_bench_images,
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True, help="output folder (shards + benchmark/)")
  parser.add_argument("--pages", type=int, default=200, help="number of web pages")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image-size", type=int, default=32, choices=tw.SIZES_PX)
  parser.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")
  parser.add_argument("--benchmark-per-class", type=int, default=2,
                      help="held-out benchmark subjects per class")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the shards and benchmark of an earlier run in --out")


def run(args: argparse.Namespace) -> int:
  summary = write_toyweb(args.out, args.pages, args.seed, args.image_size, args.shard_size,
                         benchmark_per_class=args.benchmark_per_class, overwrite=args.overwrite,
                         progress=True)
  kinds = ", ".join(f"{v} {k}" for k, v in summary["page_kinds"].items())
  print(f"toyweb: {summary['samples']} samples in {summary['shards']} shards from "
        f"{summary['pages']} pages ({kinds}); {summary['corrupt']} corrupt, "
        f"{summary['exact_duplicates']} exact + {summary['near_duplicates']} near duplicates, "
        f"{summary['recrawls']} re-crawls, {summary['without_page_url']} without page URL; "
        f"benchmark: {summary['benchmark_subjects']} held-out subjects, "
        f"{summary['benchmark_images']} images -> {summary['out_dir']}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """`python -m suti.toy.web` = `suti data toyweb`."""
  return run_parsed_command("suti data toyweb", add_arguments, run, argv)


if __name__ == "__main__":
  raise SystemExit(main())
