"""User errors: one line on stderr and exit status 2, never a bare traceback (SUTI_DEBUG=1 shows it)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from suti.core.gc_tuning import tune_for_tracing

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def run_user_command(fn: Callable[[Sequence[str]], int | None], argv: Sequence[str], prog: str) -> int:
  """Runs a command's main; user errors become one line on stderr and exit status 2."""
  tune_for_tracing()
  try:
    return int(fn(argv) or 0)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
  except USER_ERRORS as e:
    if os.environ.get("SUTI_DEBUG"):
      raise
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def run_parsed_command(prog: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                       run: Callable[[argparse.Namespace], int | None], argv: Sequence[str] | None = None) -> int:
  """A command's `main`: its arguments on a CommandParser, `run` on them, user errors as one line."""
  parser = CommandParser(prog=prog)
  add_arguments(parser)
  return run_user_command(lambda a: run(parser.parse_args(a)), sys.argv[1:] if argv is None else argv, prog)


class CommandParser(argparse.ArgumentParser):
  """argparse for the `suti` commands: a usage error is a ValueError, so run_user_command prints it as the one
  line (and exit status 2) every other user error gets, instead of argparse's usage block and SystemExit."""

  def error(self, message: str):
    raise ValueError(f"{message} (see {self.prog} --help)")
