"""Done-markers: `<output>/_done/<stage>/<task>.json`, written after a task's outputs, holding its counts.

A run killed at any point leaves either a finished task (marker present) or one that is redone from scratch.
"""
from __future__ import annotations

import json
import os

from data_pipeline.stats import TaskResult
from suti.core.atomic_io import atomic_write_json


class DoneMarkers:
  """Done-markers of one pipeline output: `<output>/_done/<stage>/<task>.json` holding the task's counts."""

  def __init__(self, output_dir: str):
    self.root = os.path.join(output_dir, "_done")

  def path(self, stage: str, task_id: str) -> str:
    return os.path.join(self.root, stage, f"{task_id}.json")

  def is_done(self, stage: str, task_id: str) -> bool:
    return os.path.isfile(self.path(stage, task_id))

  def mark(self, stage: str, task_id: str, result: TaskResult) -> None:
    atomic_write_json(self.path(stage, task_id), result.to_dict())

  def load(self, stage: str, task_id: str) -> TaskResult:
    with open(self.path(stage, task_id)) as f:
      return TaskResult.from_dict(json.load(f))
