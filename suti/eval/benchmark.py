"""The DreamBench-shaped benchmark layout that `suti eval` reads (a contract user scripts rely on):

  DIR/prompts.json          {subject: {"class": "ball", "token": "sks", "prompts": ["a sks ball on the beach", ...]}}
  DIR/<subject>/NN.png      3-6 reference images of the subject (.jpg / .jpeg / .webp also read)

`suti data toyweb` writes it for held-out toy subjects; `suti eval convert-dreambench` makes it from DreamBench.
A reference image that cannot be decoded is skipped and counted (the subject keeps the others); a subject left
with none, a subject in prompts.json without a folder, or a malformed prompts.json is a one-line error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from suti.core.safe_image import ImageRejected, decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PROMPTS_FILE = "prompts.json"


@dataclass
class BenchmarkSubject:
  name: str
  cls: str
  token: str
  prompts: list[str]
  image_paths: list[str]
  images: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3], in file-name order


@dataclass
class Benchmark:
  root: str
  subjects: list[BenchmarkSubject]
  skipped_images: dict[str, str] = field(default_factory=dict)  # path -> reason


def _field(entry, name: str, kind, subject: str, path: str):
  value = entry.get(name) if isinstance(entry, dict) else None
  if not isinstance(value, kind):
    raise ValueError(f"{path}: subject {subject!r} needs a {kind.__name__} {name!r}")
  return value


def read_benchmark(root: str, *, max_subjects: int = 0, max_prompts: int = 0) -> Benchmark:
  """Reads the layout above (subjects sorted by name; the first max_subjects / max_prompts when > 0)."""
  path = os.path.join(root, PROMPTS_FILE)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"benchmark folder {root} does not exist")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"benchmark {root} has no {PROMPTS_FILE} (see `suti data toyweb` or "
                            "`suti eval convert-dreambench`)")
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except (OSError, ValueError) as err:
    raise ValueError(f"{path} is not valid JSON: {err}") from None
  if not isinstance(table, dict) or not table:
    raise ValueError(f"{path} must map at least one subject to its class and prompts")
  names = sorted(table)[:max_subjects or None]
  bench = Benchmark(os.path.abspath(root), [])
  for name in names:
    entry = table[name]
    cls = _field(entry, "class", str, name, path)
    prompts = _field(entry, "prompts", list, name, path)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
      raise ValueError(f"{path}: subject {name!r} needs a non-empty list of prompts")
    token = entry.get("token", "sks") if isinstance(entry.get("token", "sks"), str) else "sks"
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
      raise ValueError(f"benchmark subject {name!r} has no folder {folder}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    subject = BenchmarkSubject(name, cls, token, list(prompts[:max_prompts or None]), [])
    for file in files:
      image_path = os.path.join(folder, file)
      with open(image_path, "rb") as f:
        data = f.read()
      try:
        subject.images.append(decode_image(data))
        subject.image_paths.append(image_path)
      except ImageRejected as err:
        bench.skipped_images[image_path] = err.reason
    if not subject.images:
      raise ValueError(f"benchmark subject {name!r} has no readable image in {folder}")
    bench.subjects.append(subject)
  return bench
