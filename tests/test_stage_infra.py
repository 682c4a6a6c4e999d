"""Pipeline infrastructure for per-cluster accelerator stages, on a fake three-stage pipeline:
seed (per bucket: copies prepared cluster shards) -> expert (per cluster) -> target (per bucket, filters).

The fake stages log every call to a file (one line: stage, task, pid, Ray actor or "-"), so tests count
calls across processes; files under `flags/` make a chosen cluster's expert fail (always, once, or on
the 3rd expert call of the test)."""
import os
import shutil
import sys

import ml_collections as mlc
import numpy as np
import pytest

from data_pipeline import stages
from suti.core import tar_io
from suti.core import atomic_io
from suti.formats import cluster_shards
from data_pipeline.runner_local import run_local
from data_pipeline.stats import TaskResult, format_summary

pytestmark = pytest.mark.costly(seconds=20)  # cold seconds (--durations): costly files start first

# bucket -> clusters (id, number of images); bucket 2 is empty; bucket 0 is packed, the others PNG shards.
CLUSTERS = {0: [("c0a", 2), ("c0b", 3)], 1: [("c1a", 2)], 3: [("c3a", 3), ("c3b", 4)]}
ORDER = ["c0a", "c0b", "c1a", "c3a", "c3b"]
NUM_BUCKETS = 4


# ------------------------------------------------------------------------------------------ fake stages


def _log(ctx: stages.StageContext, stage: str, task_id: str) -> None:
  actor = "-"
  if "ray" in sys.modules:
    import ray
    if ray.is_initialized():
      actor = ray.get_runtime_context().get_actor_id() or "-"
  with open(ctx.config.fake.log, "a") as f:
    f.write(f"{stage} {task_id} {os.getpid()} {actor}\n")


def seed_run(ctx, task):
  _log(ctx, "seed", task.task_id)
  result = TaskResult()
  counts = result.stage("seed")
  src = os.path.join(ctx.config.fake.source, cluster_shards.shard_name(task.index))
  if os.path.exists(src):
    n = len(stages.shard_cluster_ids(src))
    counts.in_ += n
    counts.out += n
    os.makedirs(task.output_dir, exist_ok=True)
    shutil.copyfile(src, task.bucket_output)
  return result


def expert_run(ctx, task):
  _log(ctx, "expert", task.task_id)
  flags = ctx.config.fake.flags
  if os.path.exists(os.path.join(flags, f"fail-{task.cluster_id}")):
    raise RuntimeError(f"expert {task.cluster_id} diverged\nsecond line of the message")
  once = os.path.join(flags, f"once-{task.cluster_id}")
  if os.path.exists(once):
    os.remove(once)
    raise RuntimeError(f"expert {task.cluster_id} hiccup")
  if os.path.exists(os.path.join(flags, "kill-at-3")) and len(_calls(ctx.config.fake.log, "expert")) == 3:
    raise RuntimeError("killed")
  record = next(r for r in cluster_shards.read_cluster_shard(task.bucket_input) if r.cluster_id == task.cluster_id)
  atomic_io.atomic_write_json(os.path.join(task.output_dir, f"{task.cluster_id}.json"),
                             {"cluster": task.cluster_id, "images": len(record.images)})
  result = TaskResult()
  result.stage("experts").in_ = 1
  result.stage("experts").out = 1
  return result


def expert_failed(task, error):
  result = TaskResult()
  result.stage("experts").in_ = 1
  result.stage("experts").drop("expert_failed")
  return result


def target_run(ctx, task):
  _log(ctx, "target", task.task_id)
  result = TaskResult()
  counts = result.stage("targets")
  shard = os.path.join(ctx.layout.stage_dir("work/seed"), cluster_shards.shard_name(task.index))
  kept = []
  for cid in stages.shard_cluster_ids(shard) if os.path.exists(shard) else []:
    path = os.path.join(task.input_path, f"{cid}.json")
    if not os.path.exists(path):  # its expert failed (counted there)
      continue
    counts.in_ += 1
    if atomic_io.read_json(path)["images"] >= ctx.config.fake.filter.min_images:
      counts.out += 1
      kept.append(cid)
    else:
      counts.drop("too_few_images")
  if kept:  # like the real stages: no output for a bucket that keeps nothing
    atomic_io.atomic_write_json(os.path.join(task.output_dir, f"icl-{task.index:06d}.json"), kept)
  return result


def registry(on_failure: bool = False, accelerator: bool = False) -> stages.StageRegistry:
  reg = stages.StageRegistry()
  reg.register(stages.Stage("seed", "raw", "clusters", "work/seed", ("seed",), seed_run))
  reg.register(stages.Stage("expert", "clusters", "experts", "experts", ("experts",), expert_run,
                            granularity="cluster", accelerator=accelerator,
                            on_failure=expert_failed if on_failure else None))
  reg.register(stages.Stage("target", "experts", "icl", "icl", ("targets",), target_run,
                            recompute_on=("fake.filter",)))
  return reg


# ------------------------------------------------------------------------------------------ helpers


def _calls(log: str, stage: str) -> list[str]:
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return [line.split()[1] for line in f if line.split()[0] == stage]


def _write_sources(folder: str) -> None:
  rng = np.random.default_rng(0)
  for bucket, clusters in CLUSTERS.items():
    records = [cluster_shards.ClusterRecord(
        cid, f"https://shop.example/{cid}", [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(n)],
        [f"a photo {i}" for i in range(n)], [f"{cid}_{i}" for i in range(n)]) for cid, n in clusters]
    cluster_shards.write_cluster_shard(os.path.join(folder, cluster_shards.shard_name(bucket)), records,
                                       packed=bucket == 0)


@pytest.fixture
def world(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  _write_sources(str(src))
  (tmp_path / "flags").mkdir()
  return tmp_path


def make_config(world, name: str = "out", max_retries: int = 0, min_images: int = 2, other: int = 0):
  c = mlc.ConfigDict()
  c.stages = ("seed", "expert", "target")
  c.cluster = mlc.ConfigDict({"num_buckets": NUM_BUCKETS})
  c.runner = mlc.ConfigDict({"workers": 0, "max_retries": max_retries, "ray_address": "", "ray_num_cpus": 2})
  c.fake = mlc.ConfigDict({"source": str(world / "src"), "log": str(world / f"{name}.log"),
                           "flags": str(world / "flags"), "filter": {"min_images": min_images}, "other": other})
  return c


def layout(world, name: str = "out") -> stages.RunLayout:
  return stages.RunLayout((), str(world / name))


def flag(world, name: str) -> None:
  (world / "flags" / name).write_text("")


def _balanced(stats: dict) -> None:
  for name, s in stats["stages"].items():
    assert s["in"] == s["out"] + sum(s["dropped"].values()), name


ALL_KEPT = {"seed": {"in": 5, "out": 5, "dropped": {}}, "experts": {"in": 5, "out": 5, "dropped": {}},
            "targets": {"in": 5, "out": 5, "dropped": {}}}


def _outputs(out: str) -> dict[str, bytes]:
  files = {}
  for sub in ("work/seed", "experts", "icl"):
    for root, _, names in os.walk(os.path.join(out, sub)):
      for n in names:
        with open(os.path.join(root, n), "rb") as f:
          files[os.path.relpath(os.path.join(root, n), out)] = f.read()
  with open(os.path.join(out, "stats.json"), "rb") as f:
    files["stats.json"] = f.read()
  return files


# ------------------------------------------------------------------------------------------ tests


def test_one_task_per_cluster_across_buckets_and_a_rerun_does_nothing(world):
  config, lay = make_config(world), layout(world)
  stats = run_local(config, lay, registry(), progress=False)
  log = config.fake.log
  assert _calls(log, "seed") == [f"{b:06d}" for b in range(NUM_BUCKETS)]
  assert _calls(log, "expert") == ORDER  # one per cluster, bucket order then file order
  assert sorted(os.listdir(os.path.join(lay.output_dir, "_done", "expert"))) == sorted(f"{c}.json" for c in ORDER)
  assert _calls(log, "target") == [f"{b:06d}" for b in range(NUM_BUCKETS)]
  icl = os.path.join(lay.output_dir, "icl")
  assert sorted(os.listdir(icl)) == [f"icl-{b:06d}.json" for b in (0, 1, 3)]
  assert [c for b in (0, 1, 3) for c in atomic_io.read_json(os.path.join(icl, f"icl-{b:06d}.json"))] == ORDER
  assert stats["stages"] == ALL_KEPT and "failed" not in stats
  _balanced(stats)
  # The task list: index = the bucket holding the cluster, so bucket_input is its shard.
  planned = stages.plan_stages(config, lay, registry())
  tasks = stages.stage_tasks(planned[1], config, lay)
  assert [(t.task_id, t.cluster_id, t.index) for t in tasks] == [
      ("c0a", "c0a", 0), ("c0b", "c0b", 0), ("c1a", "c1a", 1), ("c3a", "c3a", 3), ("c3b", "c3b", 3)]
  assert all(t.cluster_id in stages.shard_cluster_ids(t.bucket_input) for t in tasks)
  assert [t.task_id for s, ts in stages.plan(config, lay, registry()) if s.name == "expert" for t in ts] == ORDER
  # A rerun finds every task done.
  with open(log) as f:
    before = f.read()
  assert run_local(config, lay, registry(), progress=False) == stats
  with open(log) as f:
    assert f.read() == before


def test_a_killed_run_resumes_with_the_remaining_clusters(world):
  config, lay = make_config(world), layout(world)
  flag(world, "kill-at-3")
  with pytest.raises(RuntimeError, match="killed"):  # no on_failure: the exception ends the run
    run_local(config, lay, registry(), progress=False)
  assert sorted(os.listdir(os.path.join(lay.output_dir, "_done", "expert"))) == ["c0a.json", "c0b.json"]
  assert not os.path.exists(lay.stats_path)
  stats = run_local(config, lay, registry(), progress=False)
  assert _calls(config.fake.log, "expert") == ["c0a", "c0b", "c1a", "c1a", "c3a", "c3b"]
  assert stats["stages"] == ALL_KEPT


def test_on_failure_counts_the_drop_and_the_next_run_retries(world):
  config, lay = make_config(world, max_retries=1), layout(world)
  flag(world, "fail-c1a")
  stats = run_local(config, lay, registry(on_failure=True), progress=False)
  assert _calls(config.fake.log, "expert") == ["c0a", "c0b", "c1a", "c1a", "c3a", "c3b"]  # 1 + max_retries tries
  marker = atomic_io.read_json(os.path.join(lay.output_dir, "_done", "expert", "c1a.json"))
  assert marker["failed"] is True and marker["error"] == "RuntimeError: expert c1a diverged"
  assert stats["stages"]["experts"] == {"in": 5, "out": 4, "dropped": {"expert_failed": 1}}
  assert stats["stages"]["targets"] == {"in": 4, "out": 4, "dropped": {}}
  assert stats["failed"] == {"expert": {"tasks": 1, "first_error": "RuntimeError: expert c1a diverged"}}
  assert "1 failed tasks" in format_summary(stats) and "expert c1a diverged" in format_summary(stats)
  _balanced(stats)
  assert not os.path.exists(os.path.join(lay.output_dir, "icl", "icl-000001.json"))
  # The cause is gone: the next run retries only that cluster, and the targets of its bucket.
  os.remove(world / "flags" / "fail-c1a")
  stats = run_local(config, lay, registry(on_failure=True), progress=False)
  assert _calls(config.fake.log, "expert")[6:] == ["c1a"]
  assert _calls(config.fake.log, "target")[4:] == ["000001"]
  assert stats["stages"] == ALL_KEPT and "failed" not in stats
  assert atomic_io.read_json(os.path.join(lay.output_dir, "icl", "icl-000001.json")) == ["c1a"]


def test_a_stage_where_every_task_failed_is_an_error(world):
  for cid in ORDER:
    flag(world, f"fail-{cid}")
  with pytest.raises(ValueError, match="stage expert: all 5 tasks failed; first error: RuntimeError: expert c0a"):
    run_local(make_config(world), layout(world), registry(on_failure=True), progress=False)


def test_local_runner_retries_a_task_in_process(world):
  flag(world, "once-c3a")
  config = make_config(world, max_retries=1)
  stats = run_local(config, layout(world), registry(), progress=False)
  assert _calls(config.fake.log, "expert") == ["c0a", "c0b", "c1a", "c3a", "c3a", "c3b"]
  assert stats["stages"] == ALL_KEPT
  flag(world, "once-c3a")
  with pytest.raises(RuntimeError, match="hiccup"):
    run_local(make_config(world, "other"), layout(world, "other"), registry(), progress=False)


def test_recompute_on_redoes_that_stage_and_later_ones_only(world, capsys):
  lay = layout(world)
  run_local(make_config(world), lay, registry(), progress=False)
  assert os.path.exists(os.path.join(lay.output_dir, "icl", "icl-000001.json"))
  stricter = make_config(world, min_images=3)
  capsys.readouterr()
  stats = run_local(stricter, lay, registry(), progress=False)
  assert capsys.readouterr().out.strip() == "config changed (fake.filter.min_images): redoing stages target"
  log = stricter.fake.log
  assert len(_calls(log, "seed")) == 4 and len(_calls(log, "expert")) == 5  # nothing new: experts stay
  assert len(_calls(log, "target")) == 8
  assert stats["stages"]["targets"] == {"in": 5, "out": 3, "dropped": {"too_few_images": 2}}
  assert stats["stages"]["experts"] == ALL_KEPT["experts"]
  _balanced(stats)
  # Bucket 1 keeps nothing now: its old output is gone, not stale.
  assert sorted(os.listdir(os.path.join(lay.output_dir, "icl"))) == ["icl-000000.json", "icl-000003.json"]
  assert run_local(stricter, lay, registry(), progress=False) == stats  # run.json now holds the new config
  assert len(_calls(log, "target")) == 8
  with pytest.raises(ValueError, match="another config"):
    run_local(make_config(world, min_images=3, other=1), lay, registry(), progress=False)


@pytest.fixture(scope="module")
def ray_with_this_module(ray_session):
  import ray.cloudpickle
  ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


def test_ray_runs_accelerator_clusters_as_remote_tasks_with_retries(world, ray_with_this_module):
  from data_pipeline.runner_ray import run_ray
  reg = registry(accelerator=True)
  flag(world, "once-c0b")
  ray_config = make_config(world, "ray", max_retries=2)
  ray_stats = run_ray(ray_config, layout(world, "ray"), reg, workers=1, progress=False)
  with open(ray_config.fake.log) as f:
    lines = [line.split() for line in f]
  experts = [line for line in lines if line[0] == "expert"]
  assert sorted(line[1] for line in experts) == sorted(ORDER + ["c0b"])  # c0b failed once, Ray retried it
  assert all(line[3] == "-" and int(line[2]) != os.getpid() for line in experts)  # remote tasks, not actors
  assert all(line[3] != "-" for line in lines if line[0] != "expert")  # the other stages: the actor pool
  local_config = make_config(world, "local", max_retries=2)
  flag(world, "once-c0b")
  local_stats = run_local(local_config, layout(world, "local"), reg, progress=False)
  assert ray_stats == local_stats and ray_stats["stages"] == ALL_KEPT
  assert _outputs(str(world / "ray")) == _outputs(str(world / "local"))


def test_stage_granularity_and_chaining_are_checked(world):
  with pytest.raises(ValueError, match="granularity 'expert'"):
    stages.Stage("x", "clusters", "experts", "x", ("x",), expert_run, granularity="expert")
  with pytest.raises(ValueError, match="per-cluster stage consumes clusters"):
    stages.Stage("x", "buckets", "experts", "x", ("x",), expert_run, granularity="cluster")
  config = make_config(world)
  config.stages = ("seed", "target")
  with pytest.raises(ValueError, match="stage target needs experts input but follows a stage producing clusters"):
    run_local(config, layout(world), registry(), progress=False)
  # A cluster id with a dot would make a marker path ambiguous: refused when the tasks are enumerated.
  tar_io.write_tar(str(world / "bad.tar"), [("a.b.meta.json", b"{}")])
  with pytest.raises(ValueError, match="bad cluster id 'a.b'"):
    stages.shard_cluster_ids(str(world / "bad.tar"))
