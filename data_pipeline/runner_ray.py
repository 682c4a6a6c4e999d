"""Ray runner: the same stage functions as the local runner, run by Ray.

Ordinary stages run on a pool of Ray actors: each actor keeps one StageContext (models loaded once per
actor) and retries a failing task in place (`runner.max_retries`); tasks are handed out with
ray.util.ActorPool. Accelerator stages (DreamBooth experts) run as one Ray remote task per Task, with
the resources of `runner.accelerator_*`, so Ray places each on a GPU / TPU host and retries it there
(`runner.max_retries`, also after a worker crash). The actors are released first: they hold CPUs that
the remote tasks may need.

Without `runner.ray_address` it starts a light local Ray (num_cpus from the config, no dashboard) and
shuts it down afterwards; with an address ("auto", "ray://host:10001") it joins that cluster, where every
node must see the input and output folders (a shared file system).
"""
from __future__ import annotations

import json
from typing import Iterator

import ml_collections as mlc

from data_pipeline import registry as registry_lib
from data_pipeline import stages as stages_lib


class StageWorker:
  """A Ray actor body: runs tasks of any stage against its own StageContext."""

  def __init__(self, config: mlc.ConfigDict, layout: stages_lib.RunLayout):
    self.ctx = stages_lib.StageContext(config, layout)

  def run(self, stage: stages_lib.Stage, task: stages_lib.Task, max_retries: int) -> tuple[str, str | None]:
    return task.task_id, stages_lib.run_task_with_retries(self.ctx, stage, task, max_retries)


# The StageContext of this Ray worker process for accelerator tasks. A remote task has no object to keep
# state on, yet Ray reuses the worker process for the next task (up to max_calls): keeping the context here
# loads the base model and compiles the training step once per process instead of once per expert. Keyed by
# the run (config + layout) and holding only the latest run, so a worker reused by another run never sees
# stale resources. Process-local by construction (each worker process imports this module afresh).
_PROCESS_CONTEXT: dict[str, stages_lib.StageContext] = {}


def _process_context(config: mlc.ConfigDict, layout: stages_lib.RunLayout) -> stages_lib.StageContext:
  key = json.dumps([config.to_dict(), repr(layout)], sort_keys=True, default=str)
  if key not in _PROCESS_CONTEXT:
    _PROCESS_CONTEXT.clear()
    _PROCESS_CONTEXT[key] = stages_lib.StageContext(config, layout)
  return _PROCESS_CONTEXT[key]


def _run_accelerator_task(config: mlc.ConfigDict, layout: stages_lib.RunLayout, stage: stages_lib.Stage,
                          task: stages_lib.Task) -> str:
  """A Ray remote task body: one attempt (Ray retries it); raises on failure."""
  stages_lib.execute_task(_process_context(config, layout), stage, task)
  return task.task_id


def accelerator_options(config: mlc.ConfigDict) -> dict:
  """ray.remote options of an accelerator task, from runner.* (defaults for configs without the keys)."""
  resources = stages_lib.runner_option(config, "accelerator_resources", {})
  resources = resources.to_dict() if isinstance(resources, mlc.ConfigDict) else dict(resources or {})
  return dict(num_cpus=float(stages_lib.runner_option(config, "accelerator_num_cpus", 1.0)),
              num_gpus=float(stages_lib.runner_option(config, "accelerator_num_gpus", 0.0)),
              resources={k: float(v) for k, v in resources.items()},
              max_retries=int(stages_lib.runner_option(config, "max_retries", 2)),
              retry_exceptions=True,
              # Ray's default for GPU tasks is 1 call per process, which would reload the model for every expert.
              max_calls=int(stages_lib.runner_option(config, "accelerator_max_calls", 0)))


def init_ray(config: mlc.ConfigDict) -> bool:
  """Starts or joins Ray unless it is already up; returns True when this call started it."""
  import ray  # lazy: ray is an optional extra
  if ray.is_initialized():
    return False
  if config.runner.ray_address:
    ray.init(address=config.runner.ray_address, include_dashboard=False, log_to_driver=False)
  else:
    ray.init(num_cpus=config.runner.ray_num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
  return True


class _RayExecutor:
  """Actor pool for ordinary stages (made on first need), remote tasks for accelerator stages."""

  def __init__(self, config: mlc.ConfigDict, layout: stages_lib.RunLayout, workers: int):
    self.config, self.layout, self.workers = config, layout, workers
    self.max_retries = int(stages_lib.runner_option(config, "max_retries", 2))
    self.actors: list = []

  def __call__(self, stage: stages_lib.Stage, tasks: list[stages_lib.Task]
               ) -> Iterator[tuple[stages_lib.Task, str | None]]:
    if not tasks:
      return iter(())
    return self._remote_tasks(stage, tasks) if stage.accelerator else self._actor_pool(stage, tasks)

  def _actor_pool(self, stage, tasks):
    import ray  # lazy: ray is an optional extra
    from ray.util import ActorPool  # lazy: ray is an optional extra
    if not self.actors:
      actor_cls = ray.remote(num_cpus=1)(StageWorker)
      self.actors = [actor_cls.remote(self.config, self.layout) for _ in range(self.workers)]
    by_id = {t.task_id: t for t in tasks}
    pool = ActorPool(self.actors)
    for task_id, error in pool.map_unordered(lambda actor, task: actor.run.remote(stage, task, self.max_retries),
                                             tasks):
      yield by_id[task_id], error

  def _remote_tasks(self, stage, tasks):
    import ray  # lazy: ray is an optional extra
    self.release_actors()
    remote = ray.remote(**accelerator_options(self.config))(_run_accelerator_task)
    config_ref, layout_ref = ray.put(self.config), ray.put(self.layout)
    task_of = {remote.remote(config_ref, layout_ref, stage, task): task for task in tasks}
    waiting = list(task_of)
    while waiting:
      (ref,), waiting = ray.wait(waiting, num_returns=1)
      try:
        ray.get(ref)
      except Exception as error:  # the task's exception (or a worker crash) after Ray's retries
        if stage.on_failure is None:
          for other in waiting:
            ray.cancel(other)
          raise
        yield task_of[ref], stages_lib.one_line_error(error)
        continue
      yield task_of[ref], None

  def release_actors(self) -> None:
    import ray  # lazy: ray is an optional extra
    for actor in self.actors:
      ray.kill(actor)
    self.actors = []


def run_ray(config: mlc.ConfigDict, layout: stages_lib.RunLayout,
            registry: stages_lib.StageRegistry | None = None, workers: int | None = None,
            progress: bool = True, timings: dict | None = None) -> dict:
  """Runs (or resumes) the configured stages on Ray; returns the stats.json object (`timings` as run_local)."""
  import ray  # lazy: ray is an optional extra
  registry = registry or registry_lib.default_registry()
  workers = config.runner.workers if workers is None else workers
  workers = workers if workers and workers > 0 else 2
  stages_lib.plan_stages(config, layout, registry)  # a config that does not chain fails before Ray starts
  started = init_ray(config)
  executor = _RayExecutor(config, layout, workers)
  try:
    return stages_lib.run_stages(config, layout, registry, executor, progress=progress, timings=timings,
                                 label=" (ray)")
  finally:
    executor.release_actors()
    if started:
      ray.shutdown()

