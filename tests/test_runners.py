"""Local (in-process and worker processes) and Ray runners give byte-identical output.

The one Ray test module: Ray starts once here (slow on 2 cores)."""
import glob
import os

import pytest

from data_pipeline import stages
from data_pipeline.runner_local import run_local
from data_pipeline.runner_ray import run_ray
from suti.toy.web import write_toyweb
from suti.config import load_config
from suti.core.shards import list_shards

pytestmark = pytest.mark.costly(seconds=75)  # cold seconds (--durations): costly files start first

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline", "toy.py")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("runners") / "web")
  write_toyweb(out, 40, seed=5, image_size=32, shard_size=60)
  return out


def _outputs(out: str) -> dict[str, bytes]:
  files = {}
  for path in sorted(glob.glob(os.path.join(out, "clusters", "*.tar"))) + [os.path.join(out, "stats.json")]:
    with open(path, "rb") as f:
      files[os.path.relpath(path, out)] = f.read()
  return files


def _config():
  config = load_config(CONFIG, [("cluster.num_buckets", "4")])
  from suti.core.paths import resolve_path
  if not os.path.exists(resolve_path(config.clip.checkpoint)):
    config = load_config(CONFIG, [("cluster.num_buckets", "4"),
                                  ("stages", "('cluster_map', 'cluster_reduce', 'captions')")])
  return config


def test_local_workers_and_ray_give_identical_clusters(web, tmp_path, ray_session):
  config = _config()
  layout = lambda name: stages.RunLayout(tuple(list_shards(web)), str(tmp_path / name))
  local_stats = run_local(config, layout("local"), workers=0, progress=False)
  ray_stats = run_ray(config, layout("ray"), workers=2, progress=False)
  pool_stats = run_local(config, layout("pool"), workers=2, progress=False)
  assert local_stats == ray_stats == pool_stats
  local = _outputs(str(tmp_path / "local"))
  assert len(local) > 2
  assert local == _outputs(str(tmp_path / "ray")) == _outputs(str(tmp_path / "pool"))


def test_ray_resumes_a_local_run(web, tmp_path, ray_session):
  """Runs are resumable across runners: tasks done locally are not redone by Ray, forgotten ones are."""
  config = _config()
  layout = stages.RunLayout(tuple(list_shards(web)), str(tmp_path / "out"))
  run_local(config, layout, progress=False)
  first = _outputs(layout.output_dir)
  markers = sorted(glob.glob(os.path.join(layout.output_dir, "_done", "*", "*.json")))
  kept, forgotten = markers[:len(markers) // 2], markers[len(markers) // 2:]
  assert kept and forgotten
  for m in forgotten:  # forget half the work
    os.remove(m)
  # A redone task rewrites its marker (a new file by atomic rename): same name, new inode and mtime.
  stamp = lambda path: (os.stat(path).st_ino, os.stat(path).st_mtime_ns)
  before = {m: stamp(m) for m in kept}
  run_ray(config, layout, progress=False)
  assert {m: stamp(m) for m in kept} == before  # finished tasks were not run again
  assert all(os.path.isfile(m) for m in forgotten)  # forgotten ones were
  assert _outputs(layout.output_dir) == first
