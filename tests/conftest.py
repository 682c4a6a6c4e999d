"""Every test process sees 8 CPU devices, so sharded code runs on real meshes (as on a TPU host or a multi-GPU node).

The flag must be set before jax initialises its backend, hence here and not inside a test. A value already in
XLA_FLAGS wins.
"""
import fcntl
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Compiling dominates a cold run of the suite (tiny models, few steps): XLA:CPU's LLVM backend at -O0 compiles
# the tiny train step about 30% faster and runs it slower; a test that runs hundreds of steps compiles its own
# step at level 3 (jax.jit compiler_options). Tests only: the project itself keeps XLA's defaults.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0"

# Many tests (and the trainer's subprocesses) compile the same tiny train step: a persistent compilation cache
# shared by the whole session compiles each distinct program once. Tests that need a cold compile do not exist.
# Every program is kept, however fast it compiled (JAX's default skips those under 1 s): the eager ops of model
# tests are thousands of tiny programs, and reading them back beats compiling them again (model-test files warm:
# 38 s instead of 46 s on 2 cores).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"suti-test-jax-cache-{os.getuid()}")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402  (after the environment above, which must precede jax)

from suti.core.gc_tuning import tune_for_tracing  # noqa: E402

tune_for_tracing()  # as every `suti` command does: tracing is a large share of the suite's time


def pytest_collection_modifyitems(items):
  """The files that cost the most run first (`pytestmark = pytest.mark.costly(seconds=...)`, measured with
  --durations): `--dist loadfile` hands whole files to the workers in this order, so the long ones start at once
  and the short ones fill the gaps. Within a file the order stays as written."""
  def seconds(item):
    mark = item.get_closest_marker("costly")
    return mark.kwargs.get("seconds", 0) if mark else 0
  cost = {}
  for item in items:
    cost[item.path] = max(cost.get(item.path, 0), seconds(item))
  items.sort(key=lambda item: -cost[item.path])


@pytest.fixture(scope="session")
def ray_session():
  """One local Ray cluster per test process, shared by every test that runs the Ray runner."""
  import ray  # lazy: only the Ray tests pay for it
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024 * 1024)
  yield
  ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base_run(tmp_path_factory) -> str:
  """One tiny base model trained by `suti train` (3 steps, checkpoint at step 3, EMA) for the whole test run:
  the workdir that the export, apprentice-initialisation and experts tests read (never write).

  Under xdist every worker asks for it: the first builds it under a file lock in the run's shared temp folder,
  the others wait and reuse it."""
  from shared_fixtures import tiny_base_workdir

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers of this run
  with open(root / "tiny_base.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return tiny_base_workdir(str(root / "tiny_base"))
