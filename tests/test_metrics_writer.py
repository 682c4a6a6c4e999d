"""metrics.jsonl round trip, resume truncation, TensorBoard events read back, and the no-op writer."""
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from suti.train.metrics_writer import MetricsWriter, metrics_path, read_metrics, truncate_metrics


def _events(workdir: str) -> EventAccumulator:
  acc = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
  acc.Reload()
  return acc


def _log_steps(workdir, steps, **kw):
  with MetricsWriter(workdir, **kw) as writer:
    for s in steps:
      writer.write_scalars(s, {"loss": 1.0 / (s + 1), "lr": 1e-4 * s, "grad_norm": 0.5 + s, "img_per_s": 100.0 + s})


def test_jsonl_round_trip_keeps_values_order_and_converts_numpy_and_jax_scalars(tmp_path):
  workdir = str(tmp_path / "run")  # created by the writer
  with MetricsWriter(workdir, tensorboard=False) as writer:
    writer.write_scalars(1, {"loss": 0.25, "lr": 3e-4, "grad_norm": 1.5, "img_per_s": 12.0})
    writer.write_scalars(np.int64(2), {"loss": np.float32(0.1), "lr": jnp.float32(0.5), "grad_norm": np.float64(2.0),
                                       "img_per_s": jnp.asarray(7, jnp.int32), "finite": jnp.asarray(True)})
    writer.write_scalars(3, {"loss": float("nan"), "lr": jnp.asarray(0.75, jnp.bfloat16)})
  records = read_metrics(workdir)
  assert records == [
      {"step": 1, "loss": 0.25, "lr": 3e-4, "grad_norm": 1.5, "img_per_s": 12.0},
      {"step": 2, "loss": 0.1, "lr": 0.5, "grad_norm": 2.0, "img_per_s": 7, "finite": True},
      {"step": 3, "loss": None, "lr": 0.75},
  ]
  assert [list(r) for r in records][0] == ["step", "loss", "lr", "grad_norm", "img_per_s"]  # key order kept
  assert type(records[1]["img_per_s"]) is int and type(records[1]["loss"]) is float
  # Plain strict JSON: float32 0.1 is written as its shortest text, NaN as null.
  lines = open(metrics_path(workdir)).read().splitlines()
  assert '"loss": 0.1,' in lines[1] and '"loss": null' in lines[2]
  assert all(json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines)


def test_torn_last_line_is_ignored_by_the_reader_and_cut_by_the_next_writer(tmp_path):
  workdir = str(tmp_path)
  _log_steps(workdir, [1, 2], tensorboard=False)
  with open(metrics_path(workdir), "a") as f:
    f.write('{"step": 3, "loss": 0.2')  # killed mid-write
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
  _log_steps(workdir, [3], tensorboard=False)  # a resumed run appends on a line of its own
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
  assert open(metrics_path(workdir)).read().count("\n") == 3


def test_reader_rejects_a_corrupt_middle_line_and_a_missing_file(tmp_path):
  with pytest.raises(ValueError, match="no metrics.jsonl"):
    read_metrics(str(tmp_path))
  with open(metrics_path(str(tmp_path)), "w") as f:
    f.write('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2 is not valid JSON"):
    read_metrics(str(tmp_path))


def test_truncate_drops_exactly_the_later_steps(tmp_path):
  workdir = str(tmp_path)
  _log_steps(workdir, range(1, 11), tensorboard=False)
  before = read_metrics(workdir)
  assert truncate_metrics(workdir, 6) == 4
  assert read_metrics(workdir) == before[:6]
  assert truncate_metrics(workdir, 6) == 0  # idempotent
  with open(metrics_path(workdir), "a") as f:
    f.write('{"step": 7, "lo')
  assert truncate_metrics(workdir, 6) == 1  # the torn line goes too
  assert open(metrics_path(workdir)).read().endswith("}\n")
  assert truncate_metrics(str(tmp_path / "fresh"), 0) == 0  # nothing logged yet
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]  # no temporary left behind


def test_resume_step_makes_the_log_look_like_an_uninterrupted_run(tmp_path):
  killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
  _log_steps(killed, range(1, 9))  # checkpoint at 5, killed after logging 8
  _log_steps(killed, range(6, 11), resume_step=5)
  _log_steps(straight, range(1, 11))
  assert read_metrics(killed) == read_metrics(straight)
  # TensorBoard: two event files, the first run's steps 6..8 hidden by the restart marker.
  assert len(os.listdir(os.path.join(killed, "tensorboard"))) == 2
  killed_loss = [(e.step, e.value) for e in _events(killed).Scalars("loss")]
  assert killed_loss == [(e.step, e.value) for e in _events(straight).Scalars("loss")]
  assert [s for s, _ in killed_loss] == list(range(1, 11))


def test_tensorboard_events_hold_the_same_scalars_image_and_text(tmp_path):
  workdir = str(tmp_path)
  image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  with MetricsWriter(workdir) as writer:
    writer.write_text(0, "config", "model.image_size: 16")
    for step in (10, 20):
      writer.write_scalars(step, {"loss": np.float32(0.1 * step), "lr": 1e-3, "grad_norm": 2.5, "img_per_s": 64.0})
    writer.write_image(20, "samples", image)
  acc = _events(workdir)
  for record in read_metrics(workdir):
    for key in ("loss", "lr", "grad_norm", "img_per_s"):
      event = next(e for e in acc.Scalars(key) if e.step == record["step"])
      assert event.value == np.float32(record[key])  # TensorBoard stores float32
  (image_event,) = acc.Images("samples")
  assert image_event.step == 20 and (image_event.width, image_event.height) == (7, 5)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string))), image)
  (text_tag,) = acc.Tags()["tensors"]
  assert text_tag.startswith("config")
  assert acc.Tensors(text_tag)[0].tensor_proto.string_val == [b"model.image_size: 16"]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "not_primary"
  with MetricsWriter(str(workdir), enabled=False) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_image(1, "samples", np.zeros((4, 4, 3), np.uint8))
    writer.write_text(1, "config", "x")
    writer.flush()
  assert not workdir.exists()


def test_bad_input_is_one_clear_error(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
      writer.write_scalars(1, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="'note' must be a number"):
      writer.write_scalars(1, {"note": "hello"})
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
      writer.write_scalars(1.5, {"loss": 1.0})
    with pytest.raises(ValueError, match="uint8"):
      writer.write_image(1, "samples", np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(2, {"loss": 1.0})
  assert not os.path.getsize(metrics_path(str(tmp_path)))  # rejected records left no partial line
