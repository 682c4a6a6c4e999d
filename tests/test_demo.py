"""`suti demo` end to end with tiny stand-in checkpoints: crawl, pipeline to ICL shards, evaluation, report."""
import json
import os

import pytest

from shared_fixtures import write_tiny_checkpoint
from suti import cli

pytestmark = pytest.mark.costly(seconds=80)  # cold seconds (--durations): costly files start first


def test_demo_runs_the_whole_loop_and_prints_the_report_last(tmp_path, capsys):
  app = write_tiny_checkpoint(str(tmp_path / "app"), live_neighbors=True)
  base = write_tiny_checkpoint(str(tmp_path / "base"), "toy.py")
  out = tmp_path / "demo"
  (out / "eval" / "grids").mkdir(parents=True)
  (out / "eval" / "grids" / "stale.png").write_bytes(b"from an earlier run")  # replaced, not mixed in
  assert cli.main(["demo", "--out", str(out), "--checkpoint", app, "--base", base, "--pages", "6", "--subjects", "2",
                   "--prompts", "1", "--expert-steps", "2", "--dreambooth-steps", "5", "--no-progress"]) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed[-1] == str(out / "report.html")
  with open(out / "pipeline" / "stats.json") as f:
    stats = json.load(f)["stages"]
  assert list(stats)[-2:] == ["experts", "targets"] and stats["experts"]["out"] > 0
  for s in stats.values():
    assert s["in"] == s["out"] + sum(s["dropped"].values())
  with open(out / "eval" / "metrics.json") as f:
    metrics = json.load(f)
  assert len(metrics["per_subject"]) == 2 and set(metrics["methods"]) >= {"suti", "text_only", "dreambooth", "copy"}
  page = (out / "report.html").read_text()
  assert "<td>experts</td>" in page and "<td>suti</td>" in page
  for subject in metrics["per_subject"]:
    assert f'src="eval/grids/{subject}.png"' in page and os.path.isfile(out / "eval" / "grids" / f"{subject}.png")
  md = (out / "report.md").read_text()
  assert "| targets |" in md and "| dreambooth |" in md
  assert sorted(os.listdir(out / "eval" / "grids")) == sorted(f"{s}.png" for s in metrics["per_subject"])


def test_demo_without_checkpoints_says_what_to_do(tmp_path, capsys):
  assert cli.main(["demo", "--out", str(tmp_path / "d"), "--checkpoint", str(tmp_path / "none"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is not a checkpoint folder" in err and "--from-scratch" in err


def test_demo_rejects_a_dreambooth_run_without_steps(tmp_path, capsys):
  assert cli.main(["demo", "--out", str(tmp_path / "d"), "--dreambooth-steps", "0", "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--dreambooth-steps must be >= 1" in err
  assert not os.path.exists(tmp_path / "d" / "web")  # refused before the crawl is written
