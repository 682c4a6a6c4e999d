"""`suti data ...`: toyweb, train-clip, run, calibrate, calibrate-targets (also `python -m data_pipeline.cli ...`).

  suti data toyweb --out DIR --pages N --seed S [--image-size 32]
  suti data train-clip --out checkpoints/toy_clip --steps N
  suti data run --config configs/pipeline/toy.py --input DIR --output DIR [--runner local|ray]
                [--workers N] [--config.key=value ...]
  suti data calibrate --config configs/pipeline/toy.py --input DIR [--max-samples N]
  suti data calibrate-targets --config configs/pipeline/toy_icl.py --output DIR [--config.key=value ...]

User errors raise ValueError (one line, exit status 2 through suti.core.errors.run_user_command).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from data_pipeline import calibrate, calibrate_targets, runner_ray, stages
from data_pipeline import registry as registry_lib
from data_pipeline.preview import write_cluster_sheet, write_icl_sheet
from data_pipeline.runner_local import run_local
from data_pipeline.stats import format_summary
from suti import config as config_lib
from suti.core.errors import CommandParser, run_user_command
from suti.core.shards import list_shards
from suti.toy import clip_training as toy_clip
from suti.toy import web as toyweb


def _add_config_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="pipeline config file (configs/pipeline/*.py); a relative path "
                      "not in the working folder resolves against the installed package's configs/")
  parser.add_argument("--input", required=True, help="input shards: a folder, a glob, or one file")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The parser; the toy web / toy CLIP arguments (and their imports of torch) only for their command."""
  parser = CommandParser(prog="suti data", description="web data pipeline")
  sub = parser.add_subparsers(dest="command", required=True)
  toyweb_parser = sub.add_parser("toyweb", help="write a synthetic toy web crawl (webdataset shards)")
  clip_parser = sub.add_parser("train-clip", help="train the toy open_clip model")
  if command == "toyweb":
    toyweb.add_arguments(toyweb_parser)
  elif command == "train-clip":
    toy_clip.add_arguments(clip_parser)
  run_parser = sub.add_parser("run", help="run (or resume) the pipeline stages; writes stats.json",
                              epilog="config overrides: --config.key=value (e.g. --config.clip.batch_size=64)")
  _add_config_args(run_parser)
  run_parser.add_argument("--output", required=True, help="output folder (resumed when it exists)")
  run_parser.add_argument("--runner", choices=("local", "ray"), default="local")
  run_parser.add_argument("--workers", type=int, default=None, help="worker processes / Ray actors")
  run_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  cal_parser = sub.add_parser("calibrate", help="print CLIP similarity distributions to set thresholds")
  _add_config_args(cal_parser)
  cal_parser.add_argument("--max-samples", type=int, default=None)
  targets_parser = sub.add_parser("calibrate-targets",
                                  help="print expert target score distributions to set the target filter")
  targets_parser.add_argument("--config", required=True, help="pipeline config file with a targets.filter section")
  targets_parser.add_argument("--output", required=True, help="a pipeline output folder after the targets stage")
  return parser


def _layout(args: argparse.Namespace) -> "stages.RunLayout":
  shards = tuple(os.path.abspath(p) for p in list_shards(args.input))
  return stages.RunLayout(shards, os.path.abspath(args.output))


def cmd_run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  config = config_lib.load_config(args.config, overrides)
  layout = _layout(args)
  start = time.perf_counter()
  runner = runner_ray.run_ray if args.runner == "ray" else run_local
  stats = runner(config, layout, registry_lib.default_registry(), workers=args.workers, progress=not args.no_progress)
  print(format_summary(stats))
  counters = stats["counters"]
  read = stats["stages"].get("read", {"in": 0})
  last = list(stats["stages"].values())[-1]
  sheet = write_cluster_sheet(layout.output_dir)
  clusters = counters.get("clusters_out", 0)
  if "targets" in stats["stages"]:
    targets = stats["stages"]["targets"]
    keep = targets["out"] / targets["in"] if targets["in"] else 0.0
    result = (f"{clusters} clusters -> {stats['stages']['experts']['out']} experts -> {targets['out']} of "
              f"{targets['in']} renders kept ({keep:.0%}) -> ICL examples: {counters.get('icl_train_examples', 0)} "
              f"train, {counters.get('icl_val_examples', 0)} validation in {os.path.join(layout.output_dir, 'icl')}")
    sheet = write_icl_sheet(layout.output_dir) or sheet
  else:
    result = f"{clusters} clusters ({last['out']} images)"
  print(f"pipeline ({args.runner}): {read['in']} raw samples -> {result} in {time.perf_counter() - start:.1f}s; "
        f"page_url fallback {counters.get('page_url_fallback', 0)}; stats in {layout.stats_path}"
        + (f"; preview {sheet}" if sheet else ""))
  return 0


def cmd_calibrate(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  config = config_lib.load_config(args.config, overrides)
  cal = calibrate.calibrate(config, args.input, args.max_samples)
  print(calibrate.report(cal, config))
  return 0


def cmd_calibrate_targets(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  config = config_lib.load_config(args.config, overrides)
  cal = calibrate_targets.calibrate_targets(args.output)
  print(calibrate_targets.report(cal, config))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = config_lib.split_overrides(argv)
  args = build_parser(rest[0] if rest else None).parse_args(rest)
  if overrides and args.command not in ("run", "calibrate", "calibrate-targets"):
    raise ValueError(f"--config.* overrides apply to run, calibrate and calibrate-targets, not {args.command!r}")
  if args.command == "toyweb":
    return int(toyweb.run(args) or 0)
  if args.command == "train-clip":
    return int(toy_clip.run(args) or 0)
  if args.command == "run":
    return cmd_run(args, overrides)
  if args.command == "calibrate-targets":
    return cmd_calibrate_targets(args, overrides)
  return cmd_calibrate(args, overrides)


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti data"))
