"""Training logs: `<workdir>/metrics.jsonl` (the contract users' scripts read) and TensorBoard event files.

metrics.jsonl holds one JSON object per logged step, `{"step": S, "loss": ..., "lr": ..., ...}`, appended and
flushed line by line, so a killed run keeps every line it wrote (at worst a torn last line, which readers
ignore and the next writer cuts off). A run that resumes from a checkpoint at step S first drops the lines
logged after S (they will be logged again), so the file ends up as if the run had never stopped; TensorBoard
gets the same treatment through a restart marker that hides the killed run's later events.

Only the primary host writes: on the others `MetricsWriter(..., enabled=False)` does nothing at all.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from suti.core.atomic_io import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def _json_value(key: str, value: Any) -> float | int | bool | None:
  """A Python number for one logged value (numpy / jax scalars included); NaN and inf become null (strict JSON)."""
  if isinstance(value, (bool, int, float)):
    array = np.asarray(value)
  elif hasattr(value, "__array__") or isinstance(value, np.generic):
    array = np.asarray(value)
  else:
    raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
  if array.ndim != 0:
    raise ValueError(f"metric {key!r} must be a scalar, got an array of shape {array.shape}")
  if array.dtype == np.bool_:
    return bool(array)
  if np.issubdtype(array.dtype, np.integer):
    return int(array)
  if not np.issubdtype(array.dtype, np.floating):
    try:  # bfloat16 and other ml_dtypes floats are not np.floating subtypes
      array = array.astype(np.float32)
    except (TypeError, ValueError):
      raise ValueError(f"metric {key!r} must be a number, got dtype {array.dtype}") from None
  number = float(array)
  if not math.isfinite(number):
    return None
  if array.dtype.itemsize < 8:
    # Shortest text that reads back to the same float32 ("0.1", not "0.10000000149011612").
    number = float(str(array.astype(np.float32)))
  return number


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
  """(complete lines without their newline, the torn tail after the last newline: b"" when there is none)."""
  end = data.rfind(b"\n") + 1
  return data[:end].split(b"\n")[:-1], data[end:]


def _parse_line(line: bytes, number: int, path: str) -> dict:
  try:
    record = json.loads(line)
  except ValueError:
    raise ValueError(f"{path}: line {number} is not valid JSON") from None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    raise ValueError(f"{path}: line {number} is not a JSON object with an integer 'step'")
  return record


def read_metrics(workdir: str) -> list[dict]:
  """The logged records of a workdir's metrics.jsonl, in file order; a torn last line (killed mid-write) is ignored."""
  path = metrics_path(workdir)
  if not os.path.isfile(path):
    raise ValueError(f"no {METRICS_FILE} in {workdir!r}")
  with open(path, "rb") as f:
    lines, _torn = _split_lines(f.read())
  return [_parse_line(line, n, path) for n, line in enumerate(lines, start=1) if line.strip()]


def truncate_metrics(workdir: str, after_step: int) -> int:
  """Drops the records with step > after_step (and a torn last line), atomically; returns how many lines it dropped.

  Called on resume from the checkpoint at `after_step`: later lines were logged by the killed run after its last
  checkpoint and will be logged again. A missing file drops nothing.
  """
  path = metrics_path(workdir)
  if not os.path.isfile(path):
    return 0
  with open(path, "rb") as f:
    lines, torn = _split_lines(f.read())
  kept = [line for n, line in enumerate(lines, start=1)
          if line.strip() and _parse_line(line, n, path)["step"] <= after_step]
  dropped = sum(1 for line in lines if line.strip()) - len(kept) + (1 if torn else 0)
  if dropped:
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
  return dropped


def _cut_torn_tail(path: str) -> None:
  """Removes a torn last line so that the next appended record starts on a line of its own."""
  if not os.path.isfile(path):
    return
  with open(path, "rb") as f:
    data = f.read()
  if data and not data.endswith(b"\n"):
    with open(path, "r+b") as f:
      f.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
  """Writes scalars to metrics.jsonl and TensorBoard, images and text to TensorBoard.

  `resume_step=S` (a run restarted from its checkpoint at step S) drops metrics.jsonl lines with step > S and
  hides the same steps of earlier event files in TensorBoard. With `enabled=False` every method is a no-op and
  nothing is created.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self._file = None
    self._summary = None
    self._closed = False
    if not enabled:
      return
    if resume_step is not None and resume_step < 0:
      raise ValueError(f"resume_step must be >= 0, got {resume_step}")
    os.makedirs(workdir, exist_ok=True)
    path = metrics_path(workdir)
    self.dropped_lines = 0  # metrics.jsonl lines after resume_step, logged before the restart and removed
    if resume_step is not None:
      self.dropped_lines = truncate_metrics(workdir, resume_step)
    _cut_torn_tail(path)
    self._file = open(path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported here: hosts that never write need not load it

      logdir = os.path.join(workdir, TENSORBOARD_DIR)
      os.makedirs(logdir, exist_ok=True)
      # Event file names carry only a whole-second timestamp; a run restarted within the same second would
      # overwrite the previous file, so a sequence number keeps them apart and in chronological order.
      sequence = sum(1 for name in os.listdir(logdir) if ".tfevents." in name)
      self._summary = SummaryWriter(
          logdir=logdir, flush_secs=30, filename_suffix=f".{sequence:04d}",
          # TensorBoard keeps events with step < purge_step from earlier files.
          purge_step=None if resume_step is None else resume_step + 1)

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"MetricsWriter for {self.workdir!r} is closed")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends {"step": step, **scalars} to metrics.jsonl (flushed) and logs each scalar to TensorBoard."""
    if not self.enabled:
      return
    self._check_open()
    step = _json_value("step", step)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if "step" in scalars:
      raise ValueError("'step' is given as its own argument, not among the scalars")
    record = {"step": step}
    for key, value in scalars.items():
      if not isinstance(key, str) or not key:
        raise ValueError(f"metric names must be non-empty strings, got {key!r}")
      record[key] = _json_value(key, value)
    # One write of one whole line: a kill can tear at most this line, never an earlier one.
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._summary is not None:
      for key, value in record.items():
        if key != "step":
          self._summary.add_scalar(key, math.nan if value is None else float(value), step)

  def write_image(self, step: int, tag: str, image_uint8_hwc: np.ndarray) -> None:
    """A TensorBoard image summary of one uint8 [H, W, 3] picture (e.g. preview.sample_grid's)."""
    if not self.enabled:
      return
    self._check_open()
    image = np.asarray(image_uint8_hwc)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if self._summary is not None:
      self._summary.add_image(tag, image, int(step), dataformats="HWC")

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A TensorBoard text summary (e.g. the resolved config, once at the start)."""
    if not self.enabled:
      return
    self._check_open()
    if self._summary is not None:
      self._summary.add_text(tag, str(text), int(step))

  def flush(self) -> None:
    """Pushes everything to disk (metrics.jsonl is also synced, so it survives a machine crash)."""
    if not self.enabled or self._closed:
      return
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._summary is not None:
      self._summary.flush()

  def close(self) -> None:
    """Flushes and closes; closing twice is fine, writing after closing is an error."""
    if not self.enabled or self._closed:
      return
    self.flush()
    self._file.close()
    if self._summary is not None:
      self._summary.close()
    self._closed = True

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
