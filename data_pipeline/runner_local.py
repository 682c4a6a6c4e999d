"""Local runner: stages in order, tasks in this process or in worker processes, a tqdm bar per stage.

Workers are spawned processes (not forked: torch and open_clip do not survive a fork with threads) that
each keep one StageContext, so a model is loaded once per worker, not once per task.
"""
from __future__ import annotations

import multiprocessing
import time

import ml_collections as mlc
from tqdm import tqdm

from data_pipeline import stages as stages_lib
from data_pipeline.stats import check_balanced

# The worker process's own context (set by the pool initializer); each process has its own copy.
_WORKER_CONTEXT: stages_lib.StageContext | None = None


def _init_worker(config: mlc.ConfigDict, layout: stages_lib.RunLayout) -> None:
  global _WORKER_CONTEXT
  _WORKER_CONTEXT = stages_lib.StageContext(config, layout)


def _run_in_worker(job: tuple[stages_lib.Stage, stages_lib.Task]) -> str:
  stage, task = job
  stages_lib.execute_task(_WORKER_CONTEXT, stage, task)
  return task.task_id


def run_local(config: mlc.ConfigDict, layout: stages_lib.RunLayout,
              registry: stages_lib.StageRegistry | None = None, workers: int | None = None,
              progress: bool = True, timings: dict | None = None) -> dict:
  """Runs (or resumes) the configured stages; returns the stats.json object. `timings`, when given, receives
  each stage's wall time in seconds (kept out of stats.json, which must not depend on the machine)."""
  registry = registry or stages_lib.default_registry()
  workers = config.runner.workers if workers is None else workers
  stages_lib.prepare_output(config, layout)
  planned = stages_lib.plan(config, layout, registry)
  ctx = stages_lib.StageContext(config, layout)
  pool = None
  try:
    for stage, tasks in planned:
      pending = stages_lib.pending_tasks(layout, stage, tasks)
      stage_start = time.perf_counter()
      with tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc=stage.name, unit="task",
                disable=not progress, leave=True) as bar:
        if workers <= 1 or len(pending) <= 1:
          for task in pending:
            stages_lib.execute_task(ctx, stage, task)
            bar.update(1)
        else:
          if pool is None:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (config, layout))
          for _ in pool.imap_unordered(_run_in_worker, [(stage, t) for t in pending]):
            bar.update(1)
      if timings is not None:
        timings[stage.name] = time.perf_counter() - stage_start
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  stats = stages_lib.collect_stats(layout, planned)
  check_balanced(stats)
  return stats


