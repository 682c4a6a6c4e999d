"""ICL training examples (target + neighbors + meta, the apprentice's training data) and their webdataset shards.

One sample per example, key `<cluster_id>_<n>`:
  <key>.target.png, <key>.target.txt          a kept expert output and the new prompt it renders
  <key>.neighbor_i.png, <key>.neighbor_i.txt  the cluster's real images (i = 0 .. K-1) and their captions
  <key>.meta.json                             cluster_id, page_url, source_keys, expert_id, skill, seed, scores
Images keep their source resolution; the trainer's loader (suti.train.input_pipeline, kind="icl") resizes.
Layout: train shards `<output>/icl/icl-NNNNNN.tar`, validation shards `<output>/icl/val/icl-NNNNNN.tar`, so a
glob `<output>/icl/*.tar` reads the train split only; a whole cluster lands in one split (is_validation).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from suti.core import tar_io
from suti.core.hashing import stable_int
from suti.core.png import decode_png, encode_png
from suti.formats.cluster_shards import ClusterRecord

_MEMBER = re.compile(r"^(?P<key>[^./]+)\.(?P<field>target\.png|target\.txt|meta\.json|"
                     r"neighbor_(?P<index>\d+)\.(?P<ext>png|txt))$")
ICL_DIR, VAL_DIR = "icl", "val"


@dataclass
class ICLExample:
  """One apprentice training example: a target rendered by the cluster's expert, and the real neighbors."""
  key: str
  target: np.ndarray  # uint8 [H, W, 3]
  prompt: str
  neighbors: list[np.ndarray]  # uint8 [H, W, 3] each, the cluster's real images
  neighbor_captions: list[str]
  meta: dict = field(default_factory=dict)

  def __eq__(self, other) -> bool:
    def same(a: np.ndarray, b: np.ndarray) -> bool:
      return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    return (isinstance(other, ICLExample) and same(self.target, other.target)
            and len(self.neighbors) == len(other.neighbors)
            and all(same(a, b) for a, b in zip(self.neighbors, other.neighbors))
            and (self.key, self.prompt, self.neighbor_captions, self.meta)
            == (other.key, other.prompt, other.neighbor_captions, other.meta))

  def members(self) -> list[tuple[str, bytes]]:
    """The tar members of this example, in a fixed order."""
    if not self.key or "." in self.key or "/" in self.key:
      raise ValueError(f"bad ICL example key {self.key!r} (no dots or slashes; webdataset splits at the dot)")
    if not self.neighbors or len(self.neighbors) != len(self.neighbor_captions):
      raise ValueError(f"example {self.key}: {len(self.neighbors)} neighbors and {len(self.neighbor_captions)} "
                       "captions (at least one neighbor, one caption each)")
    for what, image in [("target", self.target)] + [(f"neighbor {i}", n) for i, n in enumerate(self.neighbors)]:
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"example {self.key}: {what} must be a uint8 [H, W, 3] image, got {image.dtype} "
                         f"{image.shape}")
    out = [(f"{self.key}.target.png", encode_png(self.target)),
           (f"{self.key}.target.txt", self.prompt.encode("utf-8"))]
    for i, (image, caption) in enumerate(zip(self.neighbors, self.neighbor_captions)):
      out.append((f"{self.key}.neighbor_{i}.png", encode_png(image)))
      out.append((f"{self.key}.neighbor_{i}.txt", caption.encode("utf-8")))
    out.append((f"{self.key}.meta.json", json.dumps(self.meta, sort_keys=True).encode("utf-8")))
    return out


KeptTarget = tuple[np.ndarray, str, str, int, dict]  # (image, prompt, skill, seed, scores)


def examples_for_cluster(record: ClusterRecord, kept: Sequence[KeptTarget], expert_id: str,
                         max_neighbors: int) -> list[ICLExample]:
  """One example per kept target, numbered in the given order; the neighbors are the cluster's first
  `max_neighbors` real images (all of them when fewer)."""
  if max_neighbors < 1:
    raise ValueError(f"max_neighbors must be >= 1, got {max_neighbors}")
  if not record.images:
    raise ValueError(f"cluster {record.cluster_id} has no real images to serve as neighbors")
  k = min(max_neighbors, len(record.images))
  neighbors, captions = list(record.images[:k]), list(record.captions[:k])
  examples = []
  for n, item in enumerate(kept):
    if len(item) != 5:
      raise ValueError(f"a kept target is (image, prompt, skill, seed, scores), got {len(item)} fields")
    image, prompt, skill, seed, scores = item
    meta = {"cluster_id": record.cluster_id, "page_url": record.page_url,
            "source_keys": list(record.source_keys[:k]), "expert_id": expert_id, "skill": skill,
            "seed": int(seed), "scores": dict(scores)}
    examples.append(ICLExample(f"{record.cluster_id}_{n}", np.asarray(image), prompt, neighbors,
                               captions, meta))
  return examples


def is_validation(cluster_id: str, val_percent: float) -> bool:
  """True for a stable `val_percent`% of clusters: a sha256 of the id (never Python's salted hash), so every
  run, host and process puts a cluster, with all its examples, in the same split."""
  if not 0 <= val_percent <= 100:
    raise ValueError(f"val_percent must be in [0, 100], got {val_percent}")
  bucket = stable_int(f"icl-val:{cluster_id}") % 10000
  return bucket < round(val_percent * 100)


def icl_shard_name(index: int) -> str:
  if index < 0:
    raise ValueError(f"shard index must be >= 0, got {index}")
  return f"icl-{index:06d}.tar"


def icl_shard_path(output_dir: str, index: int, validation: bool = False) -> str:
  """`<output>/icl/icl-NNNNNN.tar` (train) or `<output>/icl/val/icl-NNNNNN.tar` (validation)."""
  folder = os.path.join(output_dir, ICL_DIR, VAL_DIR) if validation else os.path.join(output_dir, ICL_DIR)
  return os.path.join(folder, icl_shard_name(index))


def write_icl_shard(path: str, examples: Iterable[ICLExample]) -> int:
  """Writes the examples (in order) to one tar atomically; same examples -> same bytes. Returns how many."""
  examples = list(examples)
  keys = [e.key for e in examples]
  if len(set(keys)) != len(keys):
    raise ValueError(f"{path}: duplicate example keys")
  tar_io.write_tar(path, [m for e in examples for m in e.members()])
  return len(examples)


def _example(key: str, parts: dict[str, Any], path: str) -> ICLExample:
  for needed in ("target.png", "target.txt", "meta.json"):
    if needed not in parts:
      raise ValueError(f"{path}: example {key} has no {needed}")
  indices = sorted(parts["neighbors"])
  if indices != list(range(len(indices))) or any(set(parts["neighbors"][i]) != {"png", "txt"} for i in indices):
    raise ValueError(f"{path}: example {key} has incomplete neighbors {indices} (each needs .png and .txt, "
                     "numbered from 0)")
  try:
    meta = json.loads(parts["meta.json"])
  except ValueError:
    raise ValueError(f"{path}: example {key} has an unreadable meta.json") from None
  neighbors = [decode_png(parts["neighbors"][i]["png"]) for i in indices]
  captions = [parts["neighbors"][i]["txt"].decode("utf-8") for i in indices]
  return ICLExample(key, decode_png(parts["target.png"]), parts["target.txt"].decode("utf-8"), neighbors,
                    captions, meta)


def read_icl_shard(path: str) -> list[ICLExample]:
  """The examples of one shard, in file order (for tests and tools; training reads through TrainInput)."""
  examples: list[ICLExample] = []
  seen: set[str] = set()
  key, parts = None, {}
  for name, data in tar_io.read_tar(path):
    match = _MEMBER.match(name)
    if match is None:
      raise ValueError(f"{path}: unexpected member {name!r}")
    if match["key"] != key:
      if key is not None:
        examples.append(_example(key, parts, path))
      if match["key"] in seen:
        raise ValueError(f"{path}: the members of example {match['key']} are not together")
      key, parts = match["key"], {"neighbors": {}}
      seen.add(key)
    if match["index"] is not None:
      parts["neighbors"].setdefault(int(match["index"]), {})[match["ext"]] = data
    else:
      parts[match["field"]] = data
  if key is not None:
    examples.append(_example(key, parts, path))
  return examples
