"""Local runner: stages in order, tasks in this process or in worker processes, a tqdm bar per stage.

Workers are spawned processes (not forked: torch and open_clip do not survive a fork with threads) that
each keep one StageContext, so a model is loaded once per worker, not once per task. A failing task is
retried in the process that ran it, `runner.max_retries` times.
"""
from __future__ import annotations

import multiprocessing
from typing import Iterator

import ml_collections as mlc

from data_pipeline import registry as registry_lib
from data_pipeline import stages as stages_lib

# The worker process's own context (set by the pool initializer); each process has its own copy.
_WORKER_CONTEXT: stages_lib.StageContext | None = None


def _init_worker(config: mlc.ConfigDict, layout: stages_lib.RunLayout) -> None:
  global _WORKER_CONTEXT
  _WORKER_CONTEXT = stages_lib.StageContext(config, layout)


def _run_in_worker(job: tuple[stages_lib.Stage, stages_lib.Task, int]) -> tuple[str, str | None]:
  stage, task, max_retries = job
  return task.task_id, stages_lib.run_task_with_retries(_WORKER_CONTEXT, stage, task, max_retries)


class _LocalExecutor:
  """Runs a stage's pending tasks here (workers <= 1) or on a pool of spawned processes made on first need."""

  def __init__(self, config: mlc.ConfigDict, layout: stages_lib.RunLayout, workers: int):
    self.config, self.layout, self.workers = config, layout, workers
    self.max_retries = int(stages_lib.runner_option(config, "max_retries", 2))
    self.ctx = stages_lib.StageContext(config, layout)
    self.pool = None

  def __call__(self, stage: stages_lib.Stage, tasks: list[stages_lib.Task]
               ) -> Iterator[tuple[stages_lib.Task, str | None]]:
    if self.workers <= 1 or len(tasks) <= 1:
      for task in tasks:
        yield task, stages_lib.run_task_with_retries(self.ctx, stage, task, self.max_retries)
      return
    if self.pool is None:
      self.pool = multiprocessing.get_context("spawn").Pool(self.workers, _init_worker, (self.config, self.layout))
    by_id = {t.task_id: t for t in tasks}
    for task_id, error in self.pool.imap_unordered(_run_in_worker, [(stage, t, self.max_retries) for t in tasks]):
      yield by_id[task_id], error

  def close(self) -> None:
    if self.pool is not None:
      self.pool.close()
      self.pool.join()


def run_local(config: mlc.ConfigDict, layout: stages_lib.RunLayout,
              registry: stages_lib.StageRegistry | None = None, workers: int | None = None,
              progress: bool = True, timings: dict | None = None) -> dict:
  """Runs (or resumes) the configured stages; returns the stats.json object. `timings`, when given, receives
  each stage's wall time in seconds (kept out of stats.json, which must not depend on the machine)."""
  registry = registry or registry_lib.default_registry()
  workers = config.runner.workers if workers is None else workers
  executor = _LocalExecutor(config, layout, workers)
  try:
    return stages_lib.run_stages(config, layout, registry, executor, progress=progress, timings=timings)
  finally:
    executor.close()
