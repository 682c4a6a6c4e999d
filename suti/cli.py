"""The `suti` console script: one entry point, one subcommand per job.

User errors (a missing file, a bad config key, an image of the wrong shape) end with one line on stderr
and exit status 2; set SUTI_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from suti.core.errors import run_user_command

# subcommand -> (module with main(argv), one-line help). Modules are imported only when their command runs,
# so `suti info` does not pay for torch or Ray.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data_pipeline.cli", "web data pipeline: toyweb, train-clip, run, calibrate"),
    "train": ("suti.train.main", "base text-to-image or SuTI apprentice training"),
    "generate": ("suti.infer.generate", "few-shot generation from demonstration images"),
    "eval": ("suti.eval.main", "DreamBench-style evaluation"),
    "demo": ("suti.demo", "the whole loop on the embedded toy world"),
    "info": ("suti.info", "resolved config and parameter counts"),
    "export": ("suti.checkpoint.export", "a training run's EMA weights as a small checkpoint to ship"),
    "convert": ("suti.checkpoint.convert", "a local diffusers Stable Diffusion folder as one checkpoint"),
}

def _usage() -> str:
  lines = ["usage: suti <command> [args]", "", "commands:"]
  lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"suti: error: unknown command '{name}'\n{_usage()}", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[name][0])
  return run_user_command(module.main, rest, f"suti {name}")


if __name__ == "__main__":
  sys.exit(main())
