"""Listing input shards: a folder, a glob, one file, or a Hugging Face `save_to_disk` folder, in sorted order.

The one place that knows which files are shards, for the data pipeline's readers and the trainer's loader alike.
"""
from __future__ import annotations

import glob
import json
import os

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)


def is_datasets_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
      os.path.join(path, "dataset_dict.json"))


def datasets_arrow_files(folder: str) -> list[str]:
  """The arrow files of a `save_to_disk` folder (a Dataset, or every split of a DatasetDict)."""
  if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
    with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
      splits = json.load(f).get("splits", [])
    return [p for s in splits for p in datasets_arrow_files(os.path.join(folder, s))]
  with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
    state = json.load(f)
  return [os.path.join(folder, d["filename"]) for d in state.get("_data_files", [])]


def _is_shard_file(path: str) -> bool:
  return os.path.isfile(path) and path.endswith(TAR_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES)


def list_shards(spec: str) -> list[str]:
  """Shard paths for a folder, a glob, a single file, or a Hugging Face `save_to_disk` folder
  (one shard per arrow file), sorted. Raises ValueError when nothing matches."""
  if os.path.isdir(spec):
    if is_datasets_folder(spec):
      found = datasets_arrow_files(spec)
    else:
      found = [os.path.join(spec, n) for n in os.listdir(spec)]
      found = [p for p in found if _is_shard_file(p)] + [
          a for p in found if os.path.isdir(p) and is_datasets_folder(p)
          for a in datasets_arrow_files(p)]
  elif os.path.isfile(spec):
    found = [spec] if _is_shard_file(spec) else []
  else:
    found = [p for p in glob.glob(spec) if _is_shard_file(p)]
  if not found:
    raise ValueError(f"no input shards match {spec!r} (expected .tar, .parquet files or a "
                     "Hugging Face datasets folder)")
  return sorted(found)
