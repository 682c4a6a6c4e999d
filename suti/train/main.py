"""`suti train --config FILE --workdir DIR [--config.key=value ...]`: base or apprentice training.

The config says which (model.num_neighbors = 0: text-to-image pretraining on image-text pair shards; > 0: SuTI
apprentice training on ICL shards; train.kind = "vae": the toy VAE of a latent model, configs/toy_vae.py).
Running the same command on the same workdir resumes the run. Multi-host: the same command on every host with
`--distributed` (TPU pods, SLURM, MPI: JAX finds its peers) or with `--coordinator HOST:PORT --num-processes N
--process-id I`. See launch/README.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from suti.checkpoint.convert import with_init_text, with_pretrained
from suti.config import load_config, split_overrides
from suti.core.errors import CommandParser, run_user_command
from suti.train.distributed import DistributedArgs, initialize
from suti.train.trainer import train
from suti.train.vae_trainer import train_vae

EXIT_PREEMPTED = 143  # 128 + SIGTERM: schedulers see a job that was stopped, and requeue it


def build_parser() -> argparse.ArgumentParser:
  parser = CommandParser(prog="suti train", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="config file, e.g. configs/toy.py; a relative path "
                           "not in the working folder resolves against the installed package's configs/")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, sample grids")
  parser.add_argument("--distributed", action="store_true",
                      help="multi-host: jax.distributed.initialize() with auto-detection (TPU pod, SLURM, MPI)")
  parser.add_argument("--coordinator", default="", help="HOST:PORT of process 0 (explicit multi-process)")
  parser.add_argument("--num-processes", type=int, default=0)
  parser.add_argument("--process-id", type=int, default=-1)
  parser.add_argument("--max-steps", type=int, default=None,
                      help="stop after this many steps of this invocation (the run itself still targets train.steps)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(rest)
  cfg = load_config(args.config, overrides)
  if cfg.train.get("kind", "diffusion") == "vae":
    report = train_vae(cfg, args.workdir, max_steps=args.max_steps, progress=not args.no_progress)
    if report:
      print(f"suti train: VAE done, held-out PSNR {report['heldout_psnr_db']:.2f} dB, scaling factor "
            f"{report['scaling_factor']:.4f} -> {args.workdir}/vae (report.json beside it)")
    return 0
  initialize(DistributedArgs.from_env(args.distributed, args.coordinator, args.num_processes, args.process_id))
  cfg = with_pretrained(cfg, args.workdir)  # model.pretrained: a local diffusers folder, converted once
  cfg = with_init_text(cfg)  # train.init_from a converted checkpoint: its CLIP and tokenizer
  result = train(cfg, args.workdir, max_steps=args.max_steps, progress=False if args.no_progress else None)
  return EXIT_PREEMPTED if result.stopped_by == "preempted" else 0


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti train"))
