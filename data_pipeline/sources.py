"""Readers for raw web image-text pairs: webdataset tars, parquet files, Hugging Face datasets.

Every reader yields `RawSample`s and never fails on bad data: a bad sample is counted in the
caller's `drops` Counter under a reason and skipped, so that for every shard

    samples in = samples yielded + sum(drops)

holds exactly (`read_shard_counts` returns both numbers). Tar files are read as streams and never
extracted to disk; member names are validated, and links, devices and names that could escape a
folder are counted as "unsafe_member".

Drop reasons: zero_byte, undecodable_image, truncated_image, decompression_bomb (from
safe_image), truncated_tar, unreadable_shard, unsafe_member, oversized_member, bad_json,
non_utf8_text, missing_field:<image|url>.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterator

import numpy as np

from suti.core.safe_image import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from suti.core.shards import ARROW_SUFFIXES, PARQUET_SUFFIXES, TAR_SUFFIXES, datasets_arrow_files, is_datasets_folder
from suti.core.tar_io import MAX_MEMBER_BYTES, iter_tar_samples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_COLUMNS = ("jpg", "image", "png", "webp", "jpeg", "img")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "txt")
URL_COLUMNS = ("url", "URL")
ROW_BATCH = 256  # parquet / arrow rows read at a time: bounded memory on big files


@dataclasses.dataclass
class RawSample:
  """One web image-text pair."""
  key: str
  image: np.ndarray  # uint8 H x W x 3 RGB
  caption: str
  url: str
  page_url: str | None
  meta: dict  # the sample's json (tar) or its other columns (parquet / datasets)
  source: str  # the shard it came from


# ----------------------------------------------------------------------------------------------
# Shard listing.

# ----------------------------------------------------------------------------------------------
# Tar members.

# ----------------------------------------------------------------------------------------------
# Turning fields into a sample.

def _first(row: dict, names: tuple[str, ...]) -> Any:
  for n in names:
    if row.get(n) is not None:
      return row[n]
  return None


def _image_bytes(value: Any) -> bytes | None:
  if isinstance(value, dict):  # Hugging Face Image feature storage: {"bytes", "path"}
    value = value.get("bytes")
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  return None


def _make_sample(key: str, image_data: bytes | None, caption: Any, meta: dict, source: str,
                 drops: collections.Counter, max_pixels: int) -> RawSample | None:
  """Validate and decode one sample; count the reason and return None when it is bad."""
  if image_data is None:
    drops["missing_field:image"] += 1
    return None
  url = meta.get("url", meta.get("URL"))
  if not isinstance(url, str) or not url:
    drops["missing_field:url"] += 1
    return None
  if isinstance(caption, (bytes, bytearray)):
    try:
      caption = bytes(caption).decode("utf-8")
    except UnicodeDecodeError:
      drops["non_utf8_text"] += 1
      return None
  if caption is None:
    caption = meta.get("caption", "")
  if not isinstance(caption, str):
    caption = str(caption)
  try:
    image = decode_image(image_data, max_pixels=max_pixels)
  except ImageRejected as e:
    drops[e.reason] += 1
    return None
  page_url = meta.get("page_url")
  if not isinstance(page_url, str) or not page_url.strip():
    page_url = None
  return RawSample(key=key, image=image, caption=caption.strip(), url=url, page_url=page_url,
                   meta=meta, source=source)


def _sample_from_tar_fields(key: str, fields: dict[str, bytes], source: str,
                            drops: collections.Counter, max_pixels: int) -> RawSample | None:
  meta: dict = {}
  if "json" in fields:
    try:
      meta = json.loads(fields["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
      drops["bad_json"] += 1
      return None
    if not isinstance(meta, dict):
      drops["bad_json"] += 1
      return None
  image_data = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
  caption = fields.get("txt", fields.get("caption"))
  return _make_sample(key, image_data, caption, meta, source, drops, max_pixels)


# ----------------------------------------------------------------------------------------------
# Readers.

def _iter_tar(path: str, drops: collections.Counter, max_pixels: int) -> Iterator[RawSample]:
  try:
    stream = open(path, "rb")
  except OSError:
    drops["unreadable_shard"] += 1
    return
  with stream:
    for key, fields in iter_tar_samples(stream, drops, MAX_MEMBER_BYTES):
      sample = _sample_from_tar_fields(key, fields, path, drops, max_pixels)
      if sample is not None:
        yield sample


def _iter_rows(batches: Iterator[Any], path: str, drops: collections.Counter,
               max_pixels: int) -> Iterator[RawSample]:
  """Rows of parquet / arrow record batches -> samples."""
  stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(path).split(".")[0])
  index = 0
  for batch in batches:
    for row in batch.to_pylist():
      index += 1
      image_column = next((c for c in IMAGE_COLUMNS if c in row), None)
      image_data = _image_bytes(row.get(image_column)) if image_column else None
      meta = {k: v for k, v in row.items() if k != image_column and not isinstance(
          v, (bytes, bytearray))}
      caption = _first(row, CAPTION_COLUMNS)
      url = _first(row, URL_COLUMNS)
      if url is not None:
        meta["url"] = url
      key = row.get("key")
      key = str(key) if key not in (None, "") else f"{stem}_{index - 1:09d}"
      sample = _make_sample(key, image_data, "" if caption is None else caption, meta, path,
                            drops, max_pixels)
      if sample is not None:
        yield sample


def _iter_parquet(path: str, drops: collections.Counter, max_pixels: int) -> Iterator[RawSample]:
  import pyarrow.parquet as pq  # lazy: only parquet inputs pay for pyarrow
  try:
    batches = pq.ParquetFile(path).iter_batches(batch_size=ROW_BATCH)
    yield from _iter_rows(batches, path, drops, max_pixels)
  except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
    del e
    drops["unreadable_shard"] += 1


def _iter_arrow(path: str, drops: collections.Counter, max_pixels: int) -> Iterator[RawSample]:
  import datasets  # lazy (heavy, pulls pandas); read as load_from_disk does, one arrow file per shard
  try:
    ds = datasets.Dataset.from_file(path).with_format("arrow")
    batches = (t for t in ds.iter(batch_size=ROW_BATCH))
    yield from _iter_rows(batches, path, drops, max_pixels)
  except (OSError, ValueError) as e:
    del e
    drops["unreadable_shard"] += 1


def iter_shard(path: str, drops: collections.Counter,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[RawSample]:
  """The good samples of one shard; bad ones are counted in `drops` by reason and skipped."""
  if path.endswith(TAR_SUFFIXES):
    yield from _iter_tar(path, drops, max_pixels)
  elif path.endswith(PARQUET_SUFFIXES):
    yield from _iter_parquet(path, drops, max_pixels)
  elif path.endswith(ARROW_SUFFIXES):
    yield from _iter_arrow(path, drops, max_pixels)
  elif os.path.isdir(path) and is_datasets_folder(path):
    for arrow in datasets_arrow_files(path):
      yield from _iter_arrow(arrow, drops, max_pixels)
  else:
    raise ValueError(f"not a shard: {path!r} (expected .tar, .parquet, .arrow or a datasets folder)")


@dataclasses.dataclass
class ShardCounts:
  """What reading one shard gave: in == yielded + sum(dropped.values())."""
  yielded: int
  dropped: collections.Counter

  @property
  def total_in(self) -> int:
    return self.yielded + sum(self.dropped.values())


def read_shard(path: str, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> tuple[list[RawSample], ShardCounts]:
  """All good samples of a shard plus its counts (for small shards and tests)."""
  drops: collections.Counter = collections.Counter()
  samples = list(iter_shard(path, drops, max_pixels))
  return samples, ShardCounts(yielded=len(samples), dropped=drops)
