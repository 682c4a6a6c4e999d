"""DreamBench (the DreamBooth paper's benchmark) converted into the layout `suti eval` reads (suti.eval.benchmark).

  suti eval convert-dreambench --src ../shared/dreambench --out /tmp/dreambench

DreamBench's own folder holds `<subject>/NN.jpg` (4-6 photos) and `prompts_and_classes.txt`: a `subject_name,class`
table and two Python-style prompt lists, one for objects and one for live subjects (cats and dogs), written as
'a {0} {1} in the jungle'.format(unique_token, class_token). The converter writes `<out>/<subject>/NN.png` (the
photos re-encoded losslessly, EXIF rotation applied) and `<out>/prompts.json` with each subject's 25 prompts,
`{0}` filled with the identifier token and `{1}` with the class.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from tqdm import tqdm

from suti.core.errors import CommandParser
from suti.core.png import save_png
from suti.core.safe_image import ImageRejected, decode_image
from suti.eval.benchmark import IMAGE_EXTENSIONS, PROMPTS_FILE

LIVE_CLASSES = ("cat", "dog")  # DreamBench's 9 live subjects; they get the live-subject prompt list
_PROMPT = re.compile(r"""['"](?P<template>[^'"]*\{0\}[^'"]*\{1\}[^'"]*)['"]\s*\.format""")


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], list[str], list[str]]:
  """(subject -> class, object prompt templates, live-subject prompt templates) of prompts_and_classes.txt."""
  classes: dict[str, str] = {}
  for line in text.splitlines():
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and all(parts) and re.fullmatch(r"[\w\-]+", parts[0]) and parts[0] != "subject_name":
      classes[parts[0]] = parts[1]
  object_at, live_at = text.find("Object Prompts"), text.find("Live Subject Prompts")
  if not classes or object_at < 0 or live_at < 0:
    raise ValueError("not a DreamBench prompts_and_classes.txt (needs the class table, 'Object Prompts' and "
                     "'Live Subject Prompts')")
  first, second = sorted([object_at, live_at])
  blocks = {first: text[first:second], second: text[second:]}
  object_prompts = [m.group("template") for m in _PROMPT.finditer(blocks[object_at])]
  live_prompts = [m.group("template") for m in _PROMPT.finditer(blocks[live_at])]
  if not object_prompts or not live_prompts:
    raise ValueError("prompts_and_classes.txt: found no prompt templates of the form '...{0} {1}...'.format(...)")
  return classes, object_prompts, live_prompts


def convert_dreambench(src: str, out: str, token: str = "sks", progress: bool = False) -> dict:
  """Writes the benchmark layout for every subject of `src`; returns {"subjects": N, "images": N}."""
  table_path = os.path.join(src, "prompts_and_classes.txt")
  if not os.path.isfile(table_path):
    raise FileNotFoundError(f"{src} has no prompts_and_classes.txt: is it DreamBench's dataset folder?")
  with open(table_path, encoding="utf-8") as f:
    classes, object_prompts, live_prompts = parse_prompts_and_classes(f.read())
  subjects = sorted(classes)
  if progress:
    subjects = tqdm(subjects, desc="convert-dreambench", unit="subject")
  prompts, images, skipped = {}, 0, 0
  for name in subjects:
    folder = os.path.join(src, name)
    if not os.path.isdir(folder):
      raise ValueError(f"DreamBench subject {name!r} has no folder {folder}")
    written = 0
    for file in sorted(os.listdir(folder)):
      if not file.lower().endswith(IMAGE_EXTENSIONS):
        continue
      with open(os.path.join(folder, file), "rb") as f:
        data = f.read()
      try:
        pixels = decode_image(data)
      except ImageRejected:
        skipped += 1
        continue
      save_png(os.path.join(out, name, f"{written:02d}.png"), pixels)
      written += 1
    if not written:
      raise ValueError(f"DreamBench subject {name!r} has no readable image in {folder}")
    images += written
    cls = classes[name]
    templates = live_prompts if cls in LIVE_CLASSES else object_prompts
    prompts[name] = {"class": cls, "token": token, "prompts": [t.format(token, cls) for t in templates]}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, PROMPTS_FILE), "w", encoding="utf-8") as f:
    json.dump(prompts, f, indent=1, sort_keys=True)
  return {"subjects": len(prompts), "images": images, "skipped_images": skipped}


def main(argv: Sequence[str] | None = None) -> int:
  parser = CommandParser(prog="suti eval convert-dreambench", description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="DreamBench's dataset folder")
  parser.add_argument("--out", required=True, help="the benchmark folder to write")
  parser.add_argument("--token", default="sks", help="identifier token put in the prompts")
  args = parser.parse_args(argv)
  summary = convert_dreambench(args.src, args.out, args.token, progress=True)
  print(f"convert-dreambench: {summary['subjects']} subjects, {summary['images']} images "
        f"({summary['skipped_images']} unreadable skipped) -> {args.out}")
  return 0
