"""A run killed with SIGKILL in the middle of a stage, then rerun, gives exactly the output of an
uninterrupted run: nothing lost, nothing duplicated, no temporary files left."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from suti.toy.web import write_toyweb

pytestmark = pytest.mark.costly(seconds=65)  # cold seconds (--durations): costly files start first

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(ROOT, "configs", "pipeline", "toy.py")


def _command(web: str, out: str, stages: str) -> list[str]:
  return [sys.executable, "-m", "data_pipeline.cli", "run", "--config", CONFIG, "--input", web, "--output", out,
          "--no-progress", "--config.cluster.num_buckets=24", f"--config.stages={stages}"]


def _stages() -> str:
  from suti.core.paths import resolve_path
  from suti.config import load_config
  if os.path.exists(resolve_path(load_config(CONFIG).clip.checkpoint)):
    return "('cluster_map','cluster_reduce','clip_filter','captions')"
  return "('cluster_map','cluster_reduce','captions')"


def _files(out: str) -> dict[str, bytes]:
  paths = glob.glob(os.path.join(out, "clusters", "*")) + glob.glob(os.path.join(out, "work", "**", "*"),
                                                                      recursive=True)
  files = {}
  for p in sorted(paths + [os.path.join(out, "stats.json")]):
    if os.path.isfile(p):
      with open(p, "rb") as f:
        files[os.path.relpath(p, out)] = f.read()
  return files


def _kill_mid_stage(cmd: list[str], out: str, stage: str, total: int) -> int:
  """Starts the run and SIGKILLs it once `stage` has some but not all of its tasks done."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker_dir = os.path.join(out, "_done", stage)
  deadline = time.time() + 120
  done = 0
  while time.time() < deadline and proc.poll() is None:
    done = len(os.listdir(marker_dir)) if os.path.isdir(marker_dir) else 0
    if 0 < done < total:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.002)
  proc.wait()
  return done


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  """A toy web and its uninterrupted run (shared by both kill points)."""
  root = tmp_path_factory.mktemp("resume")
  web, clean = str(root / "web"), str(root / "clean")
  write_toyweb(web, 60, seed=11, image_size=16, shard_size=15)
  stages = _stages()
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run(_command(web, clean, stages), cwd=ROOT, env=env, check=True, capture_output=True)
  return web, stages, _files(clean)


@pytest.mark.parametrize("stage", ["cluster_map", "bucket_stage"])
def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(clean_run, tmp_path, stage):
  web, stages, expected = clean_run
  if stage == "bucket_stage":  # the slowest bucket stage: the likeliest to be caught mid-way
    stage = "clip_filter" if "clip_filter" in stages else "captions"
  total = len(glob.glob(os.path.join(web, "*.tar"))) if stage == "cluster_map" else 24
  resumed = str(tmp_path / "resumed")
  env = dict(os.environ, PYTHONPATH=ROOT)

  done = _kill_mid_stage(_command(web, resumed, stages), resumed, stage, total)
  assert 0 < done < total, f"the run was not caught in the middle of {stage} ({done}/{total} tasks)"
  assert not os.path.exists(os.path.join(resumed, "stats.json"))
  subprocess.run(_command(web, resumed, stages), cwd=ROOT, env=env, check=True, capture_output=True)

  got = _files(resumed)
  assert sorted(got) == sorted(expected)  # no file missing, none extra (no temporaries)
  assert got == expected
  assert not [p for p in glob.glob(os.path.join(resumed, "**", "*"), recursive=True) if ".tmp-" in p]
