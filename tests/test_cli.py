"""The `suti` console script: dispatch, one-line user errors, and `suti info` parameter counts."""
import os
import subprocess
import sys

from suti import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_command_exits_2(capsys):
  assert cli.main(["frobnicate"]) == 2
  assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_info_sd15_counts_exactly_sd15_unet(capsys):
  assert cli.main(["info", "--config", os.path.join(ROOT, "configs", "sd15.py")]) == 0
  out = capsys.readouterr().out
  total = [l for l in out.splitlines() if l.startswith("total")]
  assert total and total[0].split()[-1] == "859,520,964"
  assert "vae: 83,653,863 (frozen; 8x downsampling, 4 latent channels: 512 px images)" in out  # SD 1.5's VAE


def test_info_apprentice_adds_neighbor_layers(capsys):
  def total(config, *extra):
    assert cli.main(["info", "--config", os.path.join(ROOT, "configs", config), *extra]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("total")][0]
    return int(line.split()[-1].replace(",", ""))

  base = total("toy.py")
  assert total("toy_suti.py") > base
  assert total("toy.py", "--config.model.num_neighbors=3") == total("toy_suti.py")


def test_info_bad_key_is_one_line_error():
  proc = subprocess.run([sys.executable, "-m", "suti.cli", "info", "--config", "configs/toy.py",
                         "--config.model.nope=1"], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.startswith("suti info: error: unknown config key 'model.nope'")
  assert proc.stderr.count("\n") == 1


def test_every_command_runs_with_the_tracing_gc_thresholds():
  """run_user_command raises the collector's thresholds before the command's main runs (suti/core/gc_tuning.py)."""
  import gc

  from suti.core.errors import run_user_command
  from suti.core.gc_tuning import THRESHOLDS

  seen = []
  before = gc.get_threshold()
  gc.set_threshold(700, 10, 10)
  try:
    assert run_user_command(lambda argv: seen.append(gc.get_threshold()), [], "suti test") == 0
  finally:
    gc.set_threshold(*before)
  assert seen == [THRESHOLDS]
