"""The stage registry and the driver that every runner shares.

A stage is a plain function over one task: `run(ctx, task) -> TaskResult`. It reads its input files, writes
its outputs atomically under names fixed by the task, and returns its counts; the driver then writes the
task's done-marker. Runners (local, Ray) only decide *where* tasks run, so they produce the same output.

A stage's granularity says what one task is:
  input_shard  one raw input shard (the map side of the bucket shuffle)
  bucket       one bucket: the previous stage's `clusters-NNNNNN.tar`
  cluster      one cluster of the previous stage's bucket shards; these tasks exist only once that stage
               has run, so they are enumerated when the stage starts (`stage_tasks`), not in `plan_stages`

Stages and what flows between them ("kinds"):
  cluster_map     raw shards  -> buckets   read + normalise URLs + hash-bucket by page key (map)
  cluster_reduce  buckets     -> clusters  group per page key, exact dedup, size limits (reduce)
  clip_filter     clusters    -> clusters  CLIP near-dup / outlier removal, coherence threshold
  captions        clusters    -> clusters  new captions and prompts; writes <output>/clusters/
  experts         clusters    -> experts   one DreamBooth expert per cluster (accelerator, per cluster)
  targets         experts     -> icl       expert renders, CLIP-filtered, written as ICL shards (per bucket)

A stage with `on_failure` turns a task that still fails after its retries into counted drops (a failed
done-marker, retried on the next run); without it the exception ends the run, as a bug should.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_collections as mlc
from tqdm import tqdm

from data_pipeline import done_markers
from data_pipeline.stats import TaskResult, check_balanced, merge_results
from suti.core import atomic_io
from suti.core.tree_paths import flatten_dict
from suti.formats import cluster_shards

STATS_FILE = "stats.json"
RUN_FILE = "run.json"
GRANULARITIES = ("input_shard", "bucket", "cluster")


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
  """One unit of work: a stage applied to one input shard, one bucket, or one cluster."""
  stage: str
  task_id: str
  index: int  # the input shard's number, or the bucket (per-cluster tasks: the bucket holding the cluster)
  input_path: str  # a raw shard, or the previous stage's folder
  output_dir: str
  cluster_id: str = ""  # per-cluster tasks only (== task_id)

  @property
  def bucket_input(self) -> str:
    """Per-bucket and per-cluster stages: this bucket's cluster shard written by the previous stage."""
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
  """A pipeline stage. `run` and `on_failure` must be module-level functions: the Stage travels to worker
  processes and Ray workers by pickle."""
  name: str
  consumes: str  # "raw" | "buckets" | "clusters" | "experts" | ...
  produces: str
  output_subdir: str  # relative to the output folder
  stats_names: tuple[str, ...]  # stats.json stages its tasks report
  run: Callable[[StageContext, Task], TaskResult]
  granularity: str = "bucket"  # "input_shard" | "bucket" | "cluster": what one task is
  accelerator: bool = False  # on Ray: one remote task per Task with the runner's accelerator resources
  on_failure: Callable[[Task, str], TaskResult] | None = None  # (task, one-line error) -> counts to record
  recompute_on: tuple[str, ...] = ()  # dotted config prefixes whose change redoes this stage and later ones
  description: str = ""

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"stage {self.name}: granularity {self.granularity!r} is not one of {GRANULARITIES}")
    if self.granularity == "cluster" and self.consumes != "clusters":
      raise ValueError(f"stage {self.name}: a per-cluster stage consumes clusters, not {self.consumes}")
    if self.granularity == "input_shard" and self.consumes != "raw":
      raise ValueError(f"stage {self.name}: a per-input-shard stage consumes raw shards, not {self.consumes}")

  @property
  def unit(self) -> str:
    """What its progress bar counts."""
    return "cluster" if self.granularity == "cluster" else "task"


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


def runner_option(config: mlc.ConfigDict, key: str, default: Any) -> Any:
  """config.runner.<key>, or `default` for configs written before the key existed."""
  runner = config.get("runner")
  return default if runner is None else runner.get(key, default)


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class PlannedStage:
  """A configured stage and the folders it reads and writes; its tasks come from `stage_tasks`."""
  stage: Stage
  input_dir: str | None  # the previous stage's output folder; None for the first stage
  output_dir: str


def plan_stages(config: mlc.ConfigDict, layout: RunLayout, registry: StageRegistry) -> list[PlannedStage]:
  """The configured stages, checked to chain."""
  stages = [registry.get(name) for name in config.stages]
  if not stages:
    raise ValueError("config.stages is empty")
  kind, input_dir = "raw", None
  planned = []
  for stage in stages:
    if stage.consumes != kind:
      raise ValueError(f"stage {stage.name} needs {stage.consumes} input but follows a stage producing {kind}")
    out_dir = layout.stage_dir(stage.output_subdir)
    planned.append(PlannedStage(stage, input_dir, out_dir))
    kind, input_dir = stage.produces, out_dir
  return planned


def shard_cluster_ids(path: str) -> list[str]:
  """The cluster ids of one cluster shard in file order, from member names (`<cid>.meta.json`) or the packed
  index: no image is decoded."""
  ids = []
  with tarfile.open(path, mode="r:") as tar:
    for info in tar:
      if info.name == cluster_shards.PACKED_INDEX:
        ids = [str(meta["cluster_id"]) for meta in json.load(tar.extractfile(info))]
        break
      if info.name.endswith(".meta.json"):
        ids.append(info.name[:-len(".meta.json")])
  for cid in ids:
    if not cid or "." in cid or "/" in cid:
      raise ValueError(f"{path}: bad cluster id {cid!r}")
  return ids


def stage_tasks(planned: PlannedStage, config: mlc.ConfigDict, layout: RunLayout) -> list[Task]:
  """The tasks of one stage: the one place that turns a stage into tasks (runners and collect_stats).
  Per-cluster stages read the previous stage's shards, so call this only once that stage has run; the
  result is deterministic (bucket order, then file order)."""
  stage, out_dir = planned.stage, planned.output_dir
  if stage.granularity == "input_shard":
    return [Task(stage.name, f"{i:05d}", i, path, out_dir) for i, path in enumerate(layout.input_shards)]
  if stage.granularity == "bucket":
    return [Task(stage.name, f"{b:06d}", b, planned.input_dir, out_dir) for b in range(config.cluster.num_buckets)]
  tasks, seen = [], set()
  for b in range(config.cluster.num_buckets):
    path = os.path.join(planned.input_dir, cluster_shards.shard_name(b))
    if not os.path.exists(path):  # stages write no shard for an empty bucket
      continue
    for cid in shard_cluster_ids(path):
      if cid in seen:
        raise ValueError(f"{path}: cluster id {cid} appears twice in {planned.input_dir}")
      seen.add(cid)
      tasks.append(Task(stage.name, cid, b, planned.input_dir, out_dir, cluster_id=cid))
  return tasks


def plan(config: mlc.ConfigDict, layout: RunLayout, registry: StageRegistry) -> list[tuple[Stage, list[Task]]]:
  """The configured stages with their tasks enumerated now (per-cluster stages: the clusters on disk now)."""
  return [(p.stage, stage_tasks(p, config, layout)) for p in plan_stages(config, layout, registry)]


# ------------------------------------------------------------------------------------------------ tasks


def execute_task(ctx: StageContext, stage: Stage, task: Task) -> TaskResult:
  """Runs one task and records its done-marker (outputs first, marker last)."""
  result = stage.run(ctx, task)
  done_markers.DoneMarkers(ctx.layout.output_dir).mark(stage.name, task.task_id, result)
  return result


def one_line_error(error: BaseException) -> str:
  """`Type: first line of the message`; a Ray task error is reduced to the task's own exception."""
  cause = getattr(error, "cause", None)
  if isinstance(cause, BaseException):
    error = cause
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def run_task_with_retries(ctx: StageContext, stage: Stage, task: Task, max_retries: int) -> str | None:
  """Runs a task up to 1 + max_retries times in this process. Returns None when it succeeded, or its last
  one-line error when it never did and the stage has on_failure; otherwise the last exception propagates."""
  for attempt in range(max_retries + 1):
    try:
      execute_task(ctx, stage, task)
      return None
    except Exception as error:  # outputs are atomic: a failed attempt leaves nothing to clean up
      if attempt == max_retries:
        if stage.on_failure is None:
          raise
        return one_line_error(error)
  raise AssertionError("unreachable")


def record_failure(layout: RunLayout, stage: Stage, task: Task, error: str) -> TaskResult:
  """Writes the failed done-marker of a task: on_failure's counts, `"failed": true` and the error."""
  result = stage.on_failure(task, error)
  try:
    check_balanced(merge_results([result], ()))
  except ValueError as e:
    raise ValueError(f"stage {stage.name}: on_failure counts do not balance: {e}") from None
  path = done_markers.DoneMarkers(layout.output_dir).path(stage.name, task.task_id)
  atomic_io.atomic_write_json(path, {**result.to_dict(), "failed": True, "error": error})
  return result


def pending_tasks(layout: RunLayout, stage: Stage, tasks: list[Task]) -> list[Task]:
  markers = done_markers.DoneMarkers(layout.output_dir)
  return [t for t in tasks if not markers.is_done(stage.name, t.task_id)]


def _failures(layout: RunLayout, stage: Stage, tasks: Iterable[Task]) -> list[tuple[Task, str]]:
  """The tasks whose done-marker says they failed, with their errors."""
  if stage.on_failure is None:  # only such stages write failed markers
    return []
  markers = done_markers.DoneMarkers(layout.output_dir)
  failed = []
  for task in tasks:
    path = markers.path(stage.name, task.task_id)
    if os.path.isfile(path):
      marker = atomic_io.read_json(path)
      if marker.get("failed"):
        failed.append((task, str(marker.get("error", ""))))
  return failed


@dataclass
class _Rework:
  """Buckets whose output changed in this run because failed tasks were retried: later stages redo their
  tasks there (they read the missing output). A retried per-input-shard task feeds every bucket."""
  buckets: set[int] = field(default_factory=set)
  everything: bool = False

  def forget(self, layout: RunLayout, stage: Stage, tasks: list[Task]) -> None:
    """Removes the done-markers of this stage's failed tasks and of its tasks in reworked buckets."""
    markers = done_markers.DoneMarkers(layout.output_dir)
    redo = [t for t, _ in _failures(layout, stage, tasks)]
    redo += [t for t in tasks
             if (self.everything or t.index in self.buckets) and markers.is_done(stage.name, t.task_id)]
    for task in redo:
      path = markers.path(stage.name, task.task_id)
      if os.path.exists(path):
        os.remove(path)
    if redo and stage.granularity == "input_shard":
      self.everything = True
    self.buckets.update(t.index for t in redo)


# ------------------------------------------------------------------------------------------------ resuming


def _fingerprint(config: mlc.ConfigDict, layout: RunLayout) -> dict:
  """What must not change between a run and its resumption (the runner may)."""
  cfg = config.to_dict()
  cfg.pop("runner", None)
  return json.loads(json.dumps({"config": cfg, "inputs": list(layout.input_shards)}, default=str))


def _changed_keys(stored: dict, current: dict) -> list[str] | None:
  """Dotted config keys that differ between two fingerprints; None when the inputs differ."""
  if stored.get("inputs") != current["inputs"]:
    return None
  old, new = flatten_dict(stored.get("config", {}), "."), flatten_dict(current["config"], ".")
  missing = object()
  return sorted(k for k in set(old) | set(new) if old.get(k, missing) != new.get(k, missing))


def _under(key: str, prefix: str) -> bool:
  return key == prefix or key.startswith(prefix + ".")


def _stages_to_recompute(changed: list[str], stages: Sequence[Stage]) -> list[Stage] | None:
  """The earliest stage whose recompute_on covers a changed key, and every later stage; None when some
  changed key is covered by no stage."""
  earliest = len(stages)
  for key in changed:
    hits = [i for i, s in enumerate(stages) if any(_under(key, p) for p in s.recompute_on)]
    if not hits:
      return None
    earliest = min(earliest, hits[0])
  return list(stages[earliest:])


def _nested(a: str, b: str) -> bool:
  """True when folder a is b, inside b, or holds b (relative paths)."""
  pa, pb = os.path.normpath(a).split(os.sep), os.path.normpath(b).split(os.sep)
  n = min(len(pa), len(pb))
  return pa[:n] == pb[:n]


def _forget_stages(layout: RunLayout, redo: Sequence[Stage], stages: Sequence[Stage]) -> None:
  """Removes the done-markers of `redo` and the output folders that only they write (so a bucket that now
  yields nothing does not keep its old shard)."""
  kept = [s.output_subdir for s in stages if s not in redo]
  for stage in redo:
    shutil.rmtree(os.path.join(layout.output_dir, "_done", stage.name), ignore_errors=True)
    subdir = os.path.normpath(stage.output_subdir)
    if subdir in (".", "_done") or subdir.startswith("..") or os.path.isabs(subdir):
      continue
    if not any(_nested(subdir, k) for k in kept):
      shutil.rmtree(layout.stage_dir(subdir), ignore_errors=True)
  if os.path.exists(layout.stats_path):
    os.remove(layout.stats_path)


def prepare_output(config: mlc.ConfigDict, layout: RunLayout, stages: Sequence[Stage] = ()) -> bool:
  """Creates the output folder or checks that it belongs to this run; returns True when resuming. A config
  that differs only under some stages' `recompute_on` prefixes redoes the earliest such stage and the later
  ones (their markers removed, run.json rewritten); any other difference is an error."""
  os.makedirs(layout.output_dir, exist_ok=True)
  run_path = os.path.join(layout.output_dir, RUN_FILE)
  fingerprint = _fingerprint(config, layout)
  if not os.path.exists(run_path):
    atomic_io.atomic_write_json(run_path, fingerprint)
    return False
  stored = atomic_io.read_json(run_path)
  if stored != fingerprint:
    changed = _changed_keys(stored, fingerprint)
    redo = None if changed is None else _stages_to_recompute(changed, stages)
    if not redo:
      raise ValueError(f"{layout.output_dir} holds a run with another config or input; use a new --output")
    _forget_stages(layout, redo, stages)
    atomic_io.atomic_write_json(run_path, fingerprint)
    print(f"config changed ({', '.join(changed)}): redoing stages {', '.join(s.name for s in redo)}")
  atomic_io.remove_stale_temporaries(layout.output_dir)
  return True


# ------------------------------------------------------------------------------------------------ driving

# A runner's way of running tasks: (stage, pending tasks) -> (task, None | one-line error) as they finish.
Executor = Callable[[Stage, list[Task]], Iterator[tuple[Task, str | None]]]


def run_stages(config: mlc.ConfigDict, layout: RunLayout, registry: StageRegistry, execute: Executor,
               progress: bool = True, timings: dict | None = None, label: str = "") -> dict:
  """Runs (or resumes) the configured stages in order with `execute`; returns the stats.json object.

  Per stage: enumerate its tasks, forget failed tasks (and tasks downstream of retried ones), run the
  pending ones, record failures through on_failure, and refuse a stage where every task failed."""
  planned = plan_stages(config, layout, registry)
  prepare_output(config, layout, [p.stage for p in planned])
  rework = _Rework()
  for p in planned:
    stage = p.stage
    tasks = stage_tasks(p, config, layout)
    rework.forget(layout, stage, tasks)
    pending = pending_tasks(layout, stage, tasks)
    stage_start = time.perf_counter()
    with tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc=stage.name + label, unit=stage.unit,
              disable=not progress, leave=True) as bar:
      for task, error in execute(stage, pending):
        if error is not None:
          record_failure(layout, stage, task, error)
        bar.update(1)
    failed = _failures(layout, stage, tasks)
    if tasks and len(failed) == len(tasks):
      raise ValueError(f"stage {stage.name}: all {len(tasks)} tasks failed; first error: {failed[0][1]}")
    if timings is not None:
      timings[stage.name] = time.perf_counter() - stage_start
  stats = collect_stats(config, layout, planned)
  check_balanced(stats)
  return stats


def collect_stats(config: mlc.ConfigDict, layout: RunLayout, planned: list[PlannedStage]) -> dict:
  """Sums the done-markers of all tasks into the stats.json object and writes it. Failed tasks count through
  their on_failure counts and are listed under "failed" (per stage: tasks, first error)."""
  markers = done_markers.DoneMarkers(layout.output_dir)
  results, failed = [], {}
  for p in planned:
    for task in stage_tasks(p, config, layout):
      marker = atomic_io.read_json(markers.path(p.stage.name, task.task_id))
      results.append(TaskResult.from_dict(marker))
      if marker.get("failed"):
        entry = failed.setdefault(p.stage.name, {"tasks": 0, "first_error": str(marker.get("error", ""))})
        entry["tasks"] += 1
  order = [name for p in planned for name in p.stage.stats_names]
  stats = merge_results(results, order)
  if failed:
    stats["failed"] = failed
  atomic_io.atomic_write_bytes(layout.stats_path, (json.dumps(stats, indent=2) + "\n").encode("utf-8"))
  return stats
