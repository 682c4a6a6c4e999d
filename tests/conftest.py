"""Every test process sees 8 CPU devices, so sharded code runs on real meshes (DESIGN.md, Training at scale).

The flag must be set before jax initialises its backend, hence here and not inside a test. A value already in
XLA_FLAGS wins.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
