"""The stage registry and the driver that every runner shares.

A stage is a plain function over one shard-sized task: `run(ctx, task) -> TaskResult`. It reads its
input files, writes its outputs atomically under names fixed by the task, and returns its counts; the
driver then writes the task's done-marker. Runners (local, Ray) only decide *where* tasks run, so they
produce the same output. Later stages (experts, targets) register themselves the same way.

Stages and what flows between them ("kinds"):
  cluster_map     raw shards  -> buckets   read + normalise URLs + hash-bucket by page key (map)
  cluster_reduce  buckets     -> clusters  group per page key, exact dedup, size limits (reduce)
  clip_filter     clusters    -> clusters  CLIP near-dup / outlier removal, coherence threshold
  captions        clusters    -> clusters  new captions and prompts; writes <output>/clusters/
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import ml_collections as mlc

from data_pipeline import cluster_shards, shard_io
from data_pipeline.stats import TaskResult, merge_results

STATS_FILE = "stats.json"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunLayout:
  """Where one pipeline run reads and writes."""
  input_shards: tuple[str, ...]
  output_dir: str

  def stage_dir(self, subdir: str) -> str:
    return os.path.join(self.output_dir, subdir)

  @property
  def stats_path(self) -> str:
    return os.path.join(self.output_dir, STATS_FILE)


@dataclass(frozen=True)
class Task:
  """One unit of work: a stage applied to one input shard (map) or one bucket (the others)."""
  stage: str
  task_id: str
  index: int
  input_path: str  # a raw shard, or the previous stage's folder
  output_dir: str

  @property
  def bucket_input(self) -> str:
    """Per-bucket stages: this bucket's cluster shard written by the previous stage."""
    return os.path.join(self.input_path, cluster_shards.shard_name(self.index))

  @property
  def bucket_output(self) -> str:
    """Per-bucket stages: where this bucket's cluster shard goes."""
    return os.path.join(self.output_dir, cluster_shards.shard_name(self.index))


class StageContext:
  """What the tasks of one worker share: the config, the layout, and resources loaded once (a CLIP
  model, a captioner) on first use. One per process; never shared across processes."""

  def __init__(self, config: mlc.ConfigDict, layout: RunLayout):
    self.config = config
    self.layout = layout
    self._resources: dict[str, Any] = {}

  def resource(self, name: str, factory: Callable[[], Any]) -> Any:
    if name not in self._resources:
      self._resources[name] = factory()
    return self._resources[name]


@dataclass(frozen=True)
class Stage:
  name: str
  consumes: str  # "raw" | "buckets" | "clusters"
  produces: str
  output_subdir: str  # relative to the output folder
  stats_names: tuple[str, ...]  # stats.json stages its tasks report
  run: Callable[[StageContext, Task], TaskResult]
  per_input_shard: bool = False  # one task per raw shard instead of one per bucket
  description: str = ""


@dataclass
class StageRegistry:
  stages: dict[str, Stage] = field(default_factory=dict)

  def register(self, stage: Stage) -> None:
    if stage.name in self.stages:
      raise ValueError(f"stage {stage.name!r} registered twice")
    self.stages[stage.name] = stage

  def get(self, name: str) -> Stage:
    if name not in self.stages:
      raise ValueError(f"unknown stage {name!r}; known: {', '.join(self.stages)}")
    return self.stages[name]


def default_registry() -> StageRegistry:
  """The registry of the stages this package ships (imported lazily: torch only when needed)."""
  from data_pipeline import captions, clip_filter, cluster
  registry = StageRegistry()
  for stage in (cluster.MAP_STAGE, cluster.REDUCE_STAGE, clip_filter.STAGE, captions.STAGE):
    registry.register(stage)
  return registry


def plan(config: mlc.ConfigDict, layout: RunLayout, registry: StageRegistry) -> list[tuple[Stage, list[Task]]]:
  """The configured stages, checked to chain, each with its tasks."""
  stages = [registry.get(name) for name in config.stages]
  if not stages:
    raise ValueError("config.stages is empty")
  kind, input_dir = "raw", None
  planned = []
  for stage in stages:
    if stage.consumes != kind:
      raise ValueError(f"stage {stage.name} needs {stage.consumes} input but follows a stage producing {kind}")
    out_dir = layout.stage_dir(stage.output_subdir)
    if stage.per_input_shard:
      tasks = [Task(stage.name, f"{i:05d}", i, path, out_dir) for i, path in enumerate(layout.input_shards)]
    else:
      tasks = [Task(stage.name, f"{b:06d}", b, input_dir, out_dir) for b in range(config.cluster.num_buckets)]
    planned.append((stage, tasks))
    kind, input_dir = stage.produces, out_dir
  return planned


def execute_task(ctx: StageContext, stage: Stage, task: Task) -> TaskResult:
  """Runs one task and records its done-marker (outputs first, marker last)."""
  result = stage.run(ctx, task)
  shard_io.DoneMarkers(ctx.layout.output_dir).mark(stage.name, task.task_id, result)
  return result


def pending_tasks(layout: RunLayout, stage: Stage, tasks: list[Task]) -> list[Task]:
  markers = shard_io.DoneMarkers(layout.output_dir)
  return [t for t in tasks if not markers.is_done(stage.name, t.task_id)]


def _fingerprint(config: mlc.ConfigDict, layout: RunLayout) -> dict:
  """What must not change between a run and its resumption (the runner may)."""
  cfg = config.to_dict()
  cfg.pop("runner", None)
  return json.loads(json.dumps({"config": cfg, "inputs": list(layout.input_shards)}, default=str))


def prepare_output(config: mlc.ConfigDict, layout: RunLayout) -> bool:
  """Creates the output folder or checks that it belongs to this run; returns True when resuming."""
  os.makedirs(layout.output_dir, exist_ok=True)
  run_path = os.path.join(layout.output_dir, RUN_FILE)
  fingerprint = _fingerprint(config, layout)
  if os.path.exists(run_path):
    if shard_io.read_json(run_path) != fingerprint:
      raise ValueError(f"{layout.output_dir} holds a run with another config or input; use a new --output")
    shard_io.remove_stale_temporaries(layout.output_dir)
    return True
  shard_io.atomic_write_json(run_path, fingerprint)
  return False


def collect_stats(layout: RunLayout, planned: list[tuple[Stage, list[Task]]]) -> dict:
  """Sums the done-markers of all tasks into the stats.json object and writes it."""
  markers = shard_io.DoneMarkers(layout.output_dir)
  results = [markers.load(stage.name, t.task_id) for stage, tasks in planned for t in tasks]
  order = [name for stage, _ in planned for name in stage.stats_names]
  stats = merge_results(results, order)
  shard_io.atomic_write_bytes(layout.stats_path, (json.dumps(stats, indent=2) + "\n").encode("utf-8"))
  return stats
