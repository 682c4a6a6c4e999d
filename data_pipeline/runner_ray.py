"""Ray runner: the same stage functions as the local runner, run by a pool of Ray actors.

Each actor keeps one StageContext (models loaded once per actor); tasks are handed out with
ray.util.ActorPool. Without `runner.ray_address` it starts a light local Ray (num_cpus from the config,
no dashboard) and shuts it down afterwards; with an address ("auto", "ray://host:10001") it joins that
cluster, where every node must see the input and output folders (a shared file system).
"""
from __future__ import annotations

import time

import ml_collections as mlc
from tqdm import tqdm

from data_pipeline import stages as stages_lib
from data_pipeline.stats import check_balanced


class StageWorker:
  """A Ray actor body: runs tasks of any stage against its own StageContext."""

  def __init__(self, config: mlc.ConfigDict, layout: stages_lib.RunLayout):
    import data_pipeline  # noqa: F401  (installs the torchvision shim in the worker)
    self.ctx = stages_lib.StageContext(config, layout)

  def run(self, stage: stages_lib.Stage, task: stages_lib.Task) -> str:
    stages_lib.execute_task(self.ctx, stage, task)
    return task.task_id


def init_ray(config: mlc.ConfigDict) -> bool:
  """Starts or joins Ray unless it is already up; returns True when this call started it."""
  import ray
  if ray.is_initialized():
    return False
  if config.runner.ray_address:
    ray.init(address=config.runner.ray_address, include_dashboard=False, log_to_driver=False)
  else:
    ray.init(num_cpus=config.runner.ray_num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
  return True


def run_ray(config: mlc.ConfigDict, layout: stages_lib.RunLayout,
            registry: stages_lib.StageRegistry | None = None, workers: int | None = None,
            progress: bool = True, timings: dict | None = None) -> dict:
  """Runs (or resumes) the configured stages on Ray; returns the stats.json object (`timings` as run_local)."""
  import ray
  from ray.util import ActorPool
  registry = registry or stages_lib.default_registry()
  workers = config.runner.workers if workers is None else workers
  workers = workers if workers and workers > 0 else 2
  stages_lib.prepare_output(config, layout)
  planned = stages_lib.plan(config, layout, registry)
  started = init_ray(config)
  actor_cls = ray.remote(num_cpus=1)(StageWorker)
  actors = [actor_cls.remote(config, layout) for _ in range(workers)]
  try:
    pool = ActorPool(actors)
    for stage, tasks in planned:
      pending = stages_lib.pending_tasks(layout, stage, tasks)
      stage_start = time.perf_counter()
      with tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc=f"{stage.name} (ray)", unit="task",
                disable=not progress) as bar:
        for _ in pool.map_unordered(lambda actor, task, s=stage: actor.run.remote(s, task), pending):
          bar.update(1)
      if timings is not None:
        timings[stage.name] = time.perf_counter() - stage_start
  finally:
    for actor in actors:
      ray.kill(actor)
    if started:
      ray.shutdown()
  stats = stages_lib.collect_stats(layout, planned)
  check_balanced(stats)
  return stats
