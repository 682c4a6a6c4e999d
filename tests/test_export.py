"""`suti export`: a run's EMA weights as a one-step checkpoint that loads exactly like the run."""
import os

import numpy as np

from suti import cli
from suti.core.tree_paths import flatten_dict
from suti.checkpoint.store import load_params


def _size(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_export_keeps_the_ema_weights_exactly_and_drops_the_rest(tiny_base_run, tmp_path, capsys):
  run = tiny_base_run  # 3 steps, checkpoint at 3: read, never written
  out = str(tmp_path / "export")
  assert cli.main(["export", "--checkpoint", run, "--out", out]) == 0
  assert "suti export:" in capsys.readouterr().out
  assert os.listdir(out) == ["3"]
  exported, meta = load_params(out)
  original, run_meta = load_params(run)  # EMA merged with the frozen part, as training saved it
  a, b = flatten_dict(exported), flatten_dict(original)
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  trained, _ = load_params(run, prefer_ema=False)
  assert any(not np.array_equal(v, flatten_dict(trained)[k]) for k, v in a.items())  # EMA, not the params
  assert meta["config"] == run_meta["config"] and meta["step"] == 3 and "input_positions" not in meta
  assert _size(out) * 2 < _size(os.path.join(run, "checkpoints", "3"))  # no optimizer state, one copy of weights
  assert cli.main(["export", "--checkpoint", run, "--out", out]) == 2
  assert "already holds a checkpoint" in capsys.readouterr().err
  assert cli.main(["export", "--checkpoint", run, "--out", out, "--overwrite", "--no-ema"]) == 0
  c = flatten_dict(load_params(out)[0])
  assert all(np.array_equal(c[k], v) for k, v in flatten_dict(trained).items())
  # Sampling defaults travel with the weights; keys outside `sample`, and values of the wrong type, are refused.
  assert cli.main(["export", "--checkpoint", run, "--out", out, "--overwrite", "--sample", "neighbor_scale=3.5",
                   "--sample", "steps=7"]) == 0
  sample = load_params(out)[1]["config"]["sample"]
  assert sample["neighbor_scale"] == 3.5 and sample["steps"] == 7
  assert {k: v for k, v in sample.items() if k not in ("neighbor_scale", "steps")} == \
      {k: v for k, v in run_meta["config"]["sample"].items() if k not in ("neighbor_scale", "steps")}
  capsys.readouterr()
  for bad in ("model.image_size=8", "steps=many", "neighbor_scale"):
    assert cli.main(["export", "--checkpoint", run, "--out", out, "--overwrite", "--sample", bad]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_export_of_a_folder_without_a_checkpoint_is_an_error(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert cli.main(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err.count("\n") == 1
