"""`suti eval`: DreamBench-style evaluation of a SuTI apprentice against its baselines.

  suti eval --checkpoint checkpoints/toy_suti --benchmark /tmp/toyweb/benchmark --out /tmp/eval \
      [--config configs/eval/toy.py] [--config.eval.methods="('suti', 'text_only')"] [--config.key=value ...]
  suti eval convert-dreambench --src ../shared/dreambench --out /tmp/dreambench

Writes <out>/metrics.json (per method: CLIP-I, CLIP-T, DINO when configured, identity and context accuracy on
toy benchmarks, near-copy rate, seconds per subject; per subject too), <out>/images/<method>/<subject>/PP_N.png
(every generated image: prompt PP, sample N), <out>/report.html and <out>/report.md with image grids, and prints
the report's path last.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from suti.config import load_config, split_overrides
from suti.core.errors import CommandParser, run_user_command
from suti.core.hashing import stable_seed
from suti.core.paths import resolve_path
from suti.core.png import save_png
from suti.embed.clip import ClipEmbedder
from suti.embed.dino import DinoEmbedder
from suti.eval import dreambench
from suti.eval import report as report_lib
from suti.eval.benchmark import read_benchmark
from suti.eval.methods import MethodRunner
from suti.eval.metrics import leave_one_out_cosine
from suti.eval.report import markdown_table
from suti.eval.scoring import Scorer, summarize
from suti.infer.load_model import load_model

CONFIG = "configs/eval/toy.py"  # load_config resolves it: the working folder, then the shipped configs/


def build_parser() -> argparse.ArgumentParser:
  parser = CommandParser(prog="suti eval", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True,
                      help="a SuTI apprentice (suti train workdir or export); "
                           "a relative path not in the working folder resolves against the shipped checkpoints/")
  parser.add_argument("--benchmark", required=True, help="a DreamBench-shaped folder (prompts.json + subjects)")
  parser.add_argument("--out", required=True, help="output folder for images, metrics.json and the report")
  parser.add_argument("--config", default=CONFIG,
                      help="evaluation config (default configs/eval/toy.py); a relative path "
                           "not in the working folder resolves against the installed package's configs/")
  parser.add_argument("--no-progress", action="store_true")
  return parser


def sample_overrides(cfg) -> dict:
  """The eval config's sampler settings; empty, 0 or negative values keep the checkpoint's own (None)."""
  s = cfg.sample
  scale = lambda v: float(v) if float(v) >= 0 else None
  return {"sampler": s.sampler or None, "steps": int(s.steps) or None, "text_scale": scale(s.text_scale),
          "neighbor_scale": scale(s.neighbor_scale), "guidance_mode": s.guidance_mode or None,
          "interleave_eta": scale(s.interleave_eta)}


def evaluate(checkpoint: str, benchmark_dir: str, out_dir: str, cfg, *, progress: bool = True,
             log=print) -> dict:
  """Runs every configured method on every subject, scores, writes images, metrics.json and the report; returns
  the metrics dict (also in <out>/metrics.json) with "report" set to the HTML path."""


  e = cfg.eval
  methods = list(e.methods)
  if not methods:
    raise ValueError("eval.methods is empty")
  if int(e.num_demos) < 1 or int(e.images_per_prompt) < 1:
    raise ValueError("eval.num_demos and eval.images_per_prompt must be >= 1")
  bench = read_benchmark(benchmark_dir, max_subjects=int(e.max_subjects), max_prompts=int(e.max_prompts))
  start = time.perf_counter()
  loaded = load_model(checkpoint, kind="apprentice")
  clip = ClipEmbedder(cfg.clip.model_name, resolve_path(cfg.clip.checkpoint), int(cfg.clip.batch_size))
  dino = DinoEmbedder(cfg.dino.model_name, resolve_path(cfg.dino.checkpoint)) if cfg.dino.checkpoint else None
  runner = MethodRunner(loaded, e, sample_overrides(cfg), cfg.dreambooth, methods)
  scorer = Scorer(clip, dino, e, cfg.toy, loaded.image_size)
  log(f"suti eval: {len(bench.subjects)} subjects x {len(bench.subjects[0].prompts)} prompts x "
      f"{e.images_per_prompt} images; methods {', '.join(methods)}; {loaded.kind} step {loaded.step} "
      f"({loaded.image_size}px); setup {time.perf_counter() - start:.0f} s")

  per_image: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
  seconds: dict[str, list[float]] = collections.defaultdict(list)
  per_subject: dict[str, dict] = {}
  grids: dict[str, dict] = {}
  real_images: dict[str, list] = collections.defaultdict(list)
  subjects = tqdm(bench.subjects, desc="eval", unit="subject", disable=not progress)
  for subject in subjects:
    demos = subject.images[:int(e.num_demos)]
    captions = [f"a photo of a {subject.cls}"] * len(demos)  # the pipeline's caption for an uninformative alt text
    prompts = [p for p in subject.prompts for _ in range(int(e.images_per_prompt))]
    seed = stable_seed(subject.name, int(e.seed))
    ref = scorer.reference(subject, demos)
    shown = min(int(e.report_prompts), len(subject.prompts))
    grids[subject.name] = {"demos": ref.demo_pixels, "prompts": subject.prompts[:shown]}
    per_subject[subject.name] = {}
    runs = [(m, lambda m=m: runner.run(m, demos, captions, prompts, subject.cls, subject.token, seed))
            for m in methods]
    if ref.toy is not None:
      runs.append(("real_renders", lambda: (scorer.real_renders(ref, prompts), 0.0)))
    for method, run in runs:
      images, secs = run()
      scores = scorer.score(ref, images, prompts)
      for name, values in scores.items():
        per_image[method][name].append(values)
      if method != "real_renders":
        seconds[method].append(secs)
        for i, image in enumerate(images):
          p, n = divmod(i, int(e.images_per_prompt))
          save_png(os.path.join(out_dir, "images", method, subject.name, f"{p:02d}_{n}.png"), image)
      grids[subject.name][method] = [images[i * int(e.images_per_prompt)] for i in range(shown)]
      per_subject[subject.name][method] = summarize({k: [v] for k, v in scores.items()})
    if len(ref.clip_real) > 1:
      real_images["clip_i"].append(leave_one_out_cosine(ref.clip_real))
      if ref.dino_real is not None:
        real_images["dino"].append(leave_one_out_cosine(ref.dino_real))

  results = {m: dict(summarize(per_image[m]), seconds_per_subject=round(float(np.mean(seconds[m])), 2))
             for m in methods}
  if "real_renders" in per_image:
    results["real_renders"] = summarize(per_image["real_renders"])
  if real_images:
    results["real_images"] = {k: round(float(np.mean(v)), 4) for k, v in real_images.items()}
  s = runner.sampler.sample_cfg
  settings = {"subjects": len(bench.subjects), "prompts": len(bench.subjects[0].prompts),
              "images_per_prompt": int(e.images_per_prompt), "demos": int(e.num_demos), "sampler": s.sampler,
              "steps": int(s.steps), "text_scale": float(s.text_scale), "neighbor_scale": float(s.neighbor_scale),
              "guidance_mode": str(s.guidance_mode), "interleave_eta": float(s.interleave_eta),
              "identity_candidates": int(cfg.toy.identity_candidates)}
  os.makedirs(out_dir, exist_ok=True)
  html_path = report_lib.write_report(out_dir, title=f"SuTI evaluation: {os.path.basename(bench.root.rstrip('/'))}",
                                      results=results, grids=grids, methods=methods + ["real_renders"],
                                      settings=settings, scale=max(1, 64 // loaded.image_size))
  metrics = {"checkpoint": loaded.path, "step": loaded.step, "benchmark": bench.root, "settings": settings,
             "methods": results, "per_subject": per_subject, "skipped_images": bench.skipped_images,
             "seconds": round(time.perf_counter() - start, 1), "report": html_path}
  with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  return metrics


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "convert-dreambench":
    return dreambench.main(argv[1:])
  overrides, rest = split_overrides(argv)
  args = build_parser().parse_args(rest)
  cfg = load_config(args.config, overrides)
  metrics = evaluate(args.checkpoint, args.benchmark, args.out, cfg, progress=not args.no_progress)
  print(markdown_table(metrics["methods"]))
  print(f"suti eval: {metrics['settings']['subjects']} subjects in {metrics['seconds']:.0f} s; "
        f"metrics {os.path.join(args.out, 'metrics.json')}")
  print(metrics["report"])
  return 0


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti eval"))
