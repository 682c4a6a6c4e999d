"""The clusters format (between the mining stages and the experts): webdataset tars, one sample per cluster,
key = cluster id.

  <cid>.img_0.png ... <cid>.img_{n-1}.png   images (source resolution)
  <cid>.img_i.txt                            captions
  <cid>.prompts.json                         [{"prompt": ..., "skill": ...}, ...] (after the captions stage)
  <cid>.meta.json                            cluster_id, page_url, source_keys (image order), clip stats, ...

The pipeline's intermediate cluster shards (under <output>/work/) hold the same records "packed": two
members per shard, `shard.index.json` (each cluster's meta.json plus its captions, image shapes and
prompts) and `shard.pixels.bin` (the raw uint8 pixels of all images, in order). No per-image members
and no PNG codec keep the CLIP stage bound by the model, not by tar parsing and decoding; PNG is
written once, for the final shards.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from suti.core import tar_io
from suti.core.png import decode_png, encode_png

_MEMBER = re.compile(r"^(?P<key>[^./]+)\.(?P<ext>img_(?P<index>\d+)\.(png|txt)|prompts\.json|meta\.json)$")
PACKED_INDEX, PACKED_PIXELS = "shard.index.json", "shard.pixels.bin"


@dataclass
class ClusterRecord:
  """One cluster: its images (uint8 HxWx3), their captions, new prompts and metadata."""
  cluster_id: str
  page_url: str
  images: list[np.ndarray]
  captions: list[str]
  source_keys: list[str]
  meta: dict = field(default_factory=dict)  # everything else meta.json holds (clip stats, urls, ...)
  prompts: list[dict] | None = None

  def __post_init__(self):
    n = len(self.images)
    if not (len(self.captions) == len(self.source_keys) == n):
      raise ValueError(f"cluster {self.cluster_id}: {n} images, {len(self.captions)} captions, "
                       f"{len(self.source_keys)} source keys")
    if not self.cluster_id or "." in self.cluster_id or "/" in self.cluster_id:
      raise ValueError(f"bad cluster id {self.cluster_id!r}")

  def __eq__(self, other) -> bool:
    return (isinstance(other, ClusterRecord) and len(self.images) == len(other.images)
            and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self.images, other.images))
            and (self.cluster_id, self.page_url, self.captions, self.source_keys, self.meta, self.prompts)
            == (other.cluster_id, other.page_url, other.captions, other.source_keys, other.meta, other.prompts))

  def select(self, keep: list[int], meta: dict | None = None) -> "ClusterRecord":
    """The same cluster with only the images at `keep` (in that order)."""
    return ClusterRecord(self.cluster_id, self.page_url, [self.images[i] for i in keep],
                         [self.captions[i] for i in keep], [self.source_keys[i] for i in keep],
                         dict(self.meta) if meta is None else meta, self.prompts)

  def meta_json(self) -> dict:
    return {**self.meta, "cluster_id": self.cluster_id, "page_url": self.page_url,
            "source_keys": list(self.source_keys), "num_images": len(self.images)}

  def members(self) -> list[tuple[str, bytes]]:
    """The webdataset members of this cluster in the clusters format: img_i.png + img_i.txt, prompts.json, meta.json."""
    cid = self.cluster_id
    out = []
    for i, (image, caption) in enumerate(zip(self.images, self.captions)):
      out.append((f"{cid}.img_{i}.png", encode_png(image)))
      out.append((f"{cid}.img_{i}.txt", caption.encode("utf-8")))
    if self.prompts is not None:
      out.append((f"{cid}.prompts.json", json.dumps(self.prompts, sort_keys=True).encode("utf-8")))
    out.append((f"{cid}.meta.json", json.dumps(self.meta_json(), sort_keys=True).encode("utf-8")))
    return out


def write_cluster_shard(path: str, records: Iterable[ClusterRecord], packed: bool = False) -> int:
  """Writes records (in the given order) to one tar atomically; returns how many. `packed` for the
  pipeline's intermediate shards, PNG members (the documented clusters format) otherwise."""
  records = list(records)
  if packed:
    index = [{**r.meta_json(), "packed": {"captions": r.captions, "shapes": [list(i.shape) for i in r.images],
                                          "prompts": r.prompts}} for r in records]
    pixels = b"".join(np.ascontiguousarray(i, dtype=np.uint8).tobytes() for r in records for i in r.images)
    tar_io.write_tar(path, [(PACKED_INDEX, json.dumps(index, sort_keys=True).encode("utf-8")),
                              (PACKED_PIXELS, pixels)])
  else:
    tar_io.write_tar(path, [m for r in records for m in r.members()])
  return len(records)


def _record(meta: dict, images: list[np.ndarray], captions: list[str], prompts: list | None) -> ClusterRecord:
  extra = {k: v for k, v in meta.items() if k not in ("cluster_id", "page_url", "source_keys", "num_images")}
  return ClusterRecord(meta["cluster_id"], meta["page_url"], images, captions, list(meta["source_keys"]),
                       extra, prompts)


def _read_packed(path: str, index_data: bytes, pixels: bytes) -> Iterator[ClusterRecord]:
  offset = 0
  for meta in json.loads(index_data):
    info = meta.pop("packed")
    images = []
    for shape in info["shapes"]:
      size = int(shape[0]) * int(shape[1]) * int(shape[2])
      if offset + size > len(pixels):
        raise ValueError(f"{path}: pixel data ends early")
      images.append(np.frombuffer(pixels, np.uint8, size, offset).reshape(shape))
      offset += size
    yield _record(meta, images, list(info["captions"]), info["prompts"])
  if offset != len(pixels):
    raise ValueError(f"{path}: {len(pixels) - offset} bytes of pixel data belong to no image")


def _record_from_members(key: str, parts: dict[str, bytes], path: str) -> ClusterRecord:
  if "meta.json" not in parts:
    raise ValueError(f"{path}: cluster {key} has no meta.json")
  meta = json.loads(parts["meta.json"])
  n = int(meta["num_images"])
  try:
    images = [decode_png(parts[f"img_{i}.png"]) for i in range(n)]
    captions = [parts[f"img_{i}.txt"].decode("utf-8") for i in range(n)]
  except KeyError as e:
    raise ValueError(f"{path}: cluster {key} lacks {e.args[0]}") from None
  prompts = json.loads(parts["prompts.json"]) if "prompts.json" in parts else None
  return _record(meta, images, captions, prompts)


def read_cluster_shard(path: str) -> Iterator[ClusterRecord]:
  """Reads the clusters of one shard (packed or not) in file order."""
  key, parts = None, {}
  members = tar_io.read_tar(path)
  for name, data in members:
    if name == PACKED_INDEX:
      pixels_name, pixels = next(members, (None, b""))
      if pixels_name != PACKED_PIXELS:
        raise ValueError(f"{path}: {PACKED_INDEX} not followed by {PACKED_PIXELS}")
      yield from _read_packed(path, data, pixels)
      return
    match = _MEMBER.match(name)
    if match is None:
      raise ValueError(f"{path}: unexpected member {name!r}")
    if match["key"] != key:
      if key is not None:
        yield _record_from_members(key, parts, path)
      key, parts = match["key"], {}
    parts[match["ext"]] = data
  if key is not None:
    yield _record_from_members(key, parts, path)


def shard_name(index: int) -> str:
  return f"clusters-{index:06d}.tar"
