"""Every test process sees 8 CPU devices, so sharded code runs on real meshes (as on a TPU host or a multi-GPU node).

The flag must be set before jax initialises its backend, hence here and not inside a test. A value already in
XLA_FLAGS wins.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# Many tests (and the trainer's subprocesses) compile the same tiny train step: a persistent compilation cache
# shared by the whole session compiles each distinct program once. Tests that need a cold compile do not exist.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"suti-test-jax-cache-{os.getuid()}")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


import pytest  # noqa: E402  (after the environment above, which must precede jax)


@pytest.fixture(scope="session")
def ray_session():
  """One local Ray cluster per test process, shared by every test that runs the Ray runner."""
  import ray  # lazy: only the Ray tests pay for it
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024 * 1024)
  yield
  ray.shutdown()
