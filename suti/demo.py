"""`suti demo`: the whole SuTI loop on the embedded toy world, on a laptop CPU, ending with a report.

  suti demo [--out suti_demo]                 # 6-8 min on 2 cores, with the shipped checkpoints
  suti demo --from-scratch [--out DIR]        # retrains the base and the apprentice first (~3 h on 2 cores)

1. `suti data toyweb`: a small synthetic crawl (shop and gallery pages, duplicates, corrupt files) and a
   benchmark of held-out subjects (never in any crawl).
2. `suti data run --config configs/pipeline/toy_icl.py`: URL clusters, CLIP filter, prompts, one DreamBooth expert
   per cluster (fewer steps than the shipped run: --expert-steps), its CLIP-filtered renders as ICL shards.
3. `suti eval`: the shipped apprentice (checkpoints/toy_suti) generates the held-out subjects few-shot from 3
   demos; against text-only, a DreamBooth expert trained on the demos, and copying a demo.
4. <out>/report.html and report.md: the pipeline's counts and previews, the metrics and the image grids.

--from-scratch first runs the commands that made the shipped checkpoints (README, "Shipped toy models"): a
3,000-page crawl, base training, the ICL pipeline on a 400-page crawl, apprentice training, each in <out>.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import sys
import time
from typing import Sequence

from data_pipeline import cli
from suti.config import load_config
from suti.core.errors import CommandParser, run_user_command
from suti.core.paths import resolve_path
from suti.eval.main import evaluate
from suti.eval.report import markdown_table
from suti.toy.web import write_toyweb
from suti.train.trainer import train

CONFIGS = "configs"  # load_config resolves configs/...: the working folder, then the shipped configs/


def log(message: str) -> None:
  print(f"suti demo: {message}", flush=True)


def run_pipeline(web: str, out: str, base: str, overrides: Sequence[str], progress: bool) -> dict:
  """`suti data run --config configs/pipeline/toy_icl.py` in this process; returns stats.json."""
  args = ["run", "--config", os.path.join(CONFIGS, "pipeline", "toy_icl.py"), "--input", web, "--output", out,
          f"--config.experts.base_checkpoint={base}", *overrides] + ([] if progress else ["--no-progress"])
  cli.main(args)
  with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
    return json.load(f)


def train_from_scratch(out: str, progress: bool) -> tuple[str, str]:
  """The shipped models' recipe (README): returns (base workdir, apprentice workdir)."""
  base_web, icl_web = os.path.join(out, "web_base"), os.path.join(out, "web_icl")
  base_dir, suti_dir, icl_out = (os.path.join(out, n) for n in ("toy_base", "toy_suti", "pipeline_full"))
  if not os.path.isdir(base_web):
    log("from scratch: a 3,000-page crawl for the base model")
    write_toyweb(base_web, 3000, seed=0, progress=progress)
  log("from scratch: base text-to-image training (configs/toy.py)")
  train(load_config(os.path.join(CONFIGS, "toy.py"), [("data.shards", os.path.join(base_web, "*.tar"))]), base_dir,
        progress=progress)
  if not os.path.isdir(icl_web):
    write_toyweb(icl_web, 400, seed=1, progress=progress)
  log("from scratch: the ICL pipeline with one expert per cluster (configs/pipeline/toy_icl.py)")
  run_pipeline(icl_web, icl_out, base_dir, ["--workers", "2"], progress)  # as the shipped run (README)
  log("from scratch: apprentice training (configs/toy_suti.py)")
  train(load_config(os.path.join(CONFIGS, "toy_suti.py"), [("data.shards", os.path.join(icl_out, "icl", "*.tar")),
                                                            ("train.init_from", base_dir)]), suti_dir,
        progress=progress)
  return base_dir, suti_dir


def stats_table(stats: dict) -> list[tuple[str, int, int, str]]:
  return [(name, s["in"], s["out"], ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-")
          for name, s in stats["stages"].items()]


def write_demo_report(out: str, stats: dict, metrics: dict, timings: dict[str, float]) -> str:
  """report.md and report.html in <out>: pipeline counts and previews, the evaluation table and grids."""
  eval_dir = os.path.relpath(os.path.dirname(metrics["report"]), out)
  previews = [p for p in ("pipeline/clusters_preview.png", "pipeline/icl_preview.png")
              if os.path.isfile(os.path.join(out, p))]
  rows = stats_table(stats)
  timing = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
  md = ["# SuTI toy-world demo", "", f"Times: {timing}.", "", "## The data pipeline", "",
        "| stage | in | out | dropped |", "|---|---|---|---|"]
  md += [f"| {n} | {i} | {o} | {d} |" for n, i, o, d in rows]
  md += [""] + [f"![{p}]({p})" for p in previews]
  md += ["", "## Few-shot generation on held-out subjects", "", markdown_table(metrics["methods"]), "",
         f"Full evaluation report: [{eval_dir}/report.html]({eval_dir}/report.html); image grids (demos | "
         f"{' | '.join(m for m in metrics['methods'] if m != 'real_images')}):", ""]
  md += [f"![{s}]({eval_dir}/grids/{s}.png)" for s in metrics["per_subject"]]
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md) + "\n")

  table = "".join(f"<tr><td>{html.escape(n)}</td><td>{i}</td><td>{o}</td><td>{html.escape(d)}</td></tr>"
                  for n, i, o, d in rows)
  with open(os.path.join(os.path.dirname(metrics["report"]), "report.html"), encoding="utf-8") as f:
    eval_html = f.read()
  body = eval_html.split("<body>", 1)[1].rsplit("</body>", 1)[0].replace('src="grids/', f'src="{eval_dir}/grids/')
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>SuTI toy-world demo</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
img{{image-rendering:pixelated;max-width:100%}}</style></head>
<body><h1>SuTI toy-world demo</h1><p>Times: {html.escape(timing)}.</p>
<h2>The data pipeline</h2><table><tr><th>stage</th><th>in</th><th>out</th><th>dropped</th></tr>{table}</table>
{''.join(f'<p><img src="{p}" alt="{p}"></p>' for p in previews)}
<h2>Few-shot generation on held-out subjects</h2>{body}</body></html>
"""
  path = os.path.join(out, "report.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path


def build_parser() -> argparse.ArgumentParser:
  parser = CommandParser(prog="suti demo", description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="suti_demo", help="output folder (replaced)")
  parser.add_argument("--checkpoint", default="checkpoints/toy_suti",
                      help="the apprentice to evaluate; "
                           "a relative path not in the working folder resolves against the shipped checkpoints/")
  parser.add_argument("--base", default="checkpoints/toy_base",
                      help="the base model (experts, DreamBooth); "
                           "a relative path not in the working folder resolves against the shipped checkpoints/")
  parser.add_argument("--from-scratch", action="store_true", help="retrain the base and the apprentice first")
  parser.add_argument("--pages", type=int, default=16, help="pages of the demo crawl")
  parser.add_argument("--subjects", type=int, default=8, help="held-out subjects to evaluate")
  parser.add_argument("--prompts", type=int, default=4, help="prompts per subject")
  parser.add_argument("--expert-steps", type=int, default=60, help="DreamBooth steps of the pipeline's experts")
  parser.add_argument("--dreambooth-steps", type=int, default=None,
                      help="steps of the evaluation's DreamBooth baseline per subject (default: the eval config's, "
                           "as in the README's figures)")
  parser.add_argument("--no-progress", action="store_true")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  # checked before anything is deleted or trained, so a typo costs neither an earlier run nor hours of training
  if args.subjects < 1 or args.prompts < 1:
    raise ValueError("--subjects and --prompts must be >= 1")
  if args.dreambooth_steps is not None and args.dreambooth_steps < 1:
    raise ValueError("--dreambooth-steps must be >= 1")
  progress = not args.no_progress
  out = os.path.abspath(args.out)
  if os.path.isdir(out) and not args.from_scratch:
    for name in ("web", "pipeline", "eval", "report.md", "report.html"):
      path = os.path.join(out, name)
      shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
  os.makedirs(out, exist_ok=True)
  timings: dict[str, float] = {}
  start = time.perf_counter()
  base, checkpoint = resolve_path(args.base), resolve_path(args.checkpoint)
  if args.from_scratch:
    base, checkpoint = train_from_scratch(out, progress)
    timings["training from scratch"] = time.perf_counter() - start
  for path, what in ((base, "--base"), (checkpoint, "--checkpoint")):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{what} {path} is not a checkpoint folder (run from the repository, or pass "
                              "--from-scratch)")

  t = time.perf_counter()
  web = os.path.join(out, "web")
  summary = write_toyweb(web, args.pages, seed=7, benchmark_per_class=-(-args.subjects // 8), progress=progress)
  log(f"toy crawl: {summary['samples']} samples from {args.pages} pages, benchmark of "
      f"{summary['benchmark_subjects']} held-out subjects")
  timings["toy crawl"] = time.perf_counter() - t

  t = time.perf_counter()
  stats = run_pipeline(web, os.path.join(out, "pipeline"), base,
                       [f"--config.experts.steps={args.expert_steps}", "--config.targets.seeds_per_prompt=1"], progress)
  timings["pipeline"] = time.perf_counter() - t

  t = time.perf_counter()
  overrides = [("eval.max_prompts", str(args.prompts)), ("eval.images_per_prompt", "1"),
               ("eval.max_subjects", str(args.subjects)), ("eval.report_prompts", str(args.prompts)),
               ("dreambooth.base_checkpoint", base)]
  if args.dreambooth_steps is not None:
    overrides.append(("dreambooth.steps", str(args.dreambooth_steps)))
  cfg = load_config(os.path.join(CONFIGS, "eval", "toy.py"), overrides)
  metrics = evaluate(checkpoint, os.path.join(web, "benchmark"), os.path.join(out, "eval"), cfg, progress=progress,
                     log=log)
  timings["evaluation"] = time.perf_counter() - t
  print(markdown_table(metrics["methods"]))
  path = write_demo_report(out, stats, metrics, timings)
  log(f"done in {time.perf_counter() - start:.0f} s; report:")
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti demo"))
