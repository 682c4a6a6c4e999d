"""Checkpoint save time in one process: whole replicated arrays (the default) vs Orbax's replica-parallel slices.

  python benchmarks/checkpoint_save.py [--config configs/toy_suti.py] [--devices 8] [--repeats 3]

The model's parameters, EMA and Adam moments (the trainer's state, about 4x the weights) replicated over every
device of one process, as a data-parallel run holds them, saved synchronously. Replica-parallel saving cuts each
replicated array into one slice per device so that several hosts could share the writing; in one process that
only adds a device op per array and device, and a compile per new slice shape on the first save. Ends with one
JSON line: first_save_s and save_s (best repeat) for both, and `replica_parallel_vs_whole` (first save, ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/toy_suti.py")
  parser.add_argument("--devices", type=int, default=8, help="forced host CPU devices (ignored on accelerators)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()

  import jax  # after XLA_FLAGS: the device count is fixed when the backend starts
  import numpy as np
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from suti.checkpoint.store import Checkpointer
  from suti.config import load_config
  from suti.models.model import SuTIModel

  cfg = load_config(args.config)
  params = nnx.to_pure_dict(nnx.state(SuTIModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P())
  state = jax.device_put({"params": params, "ema": params, "opt_state": {"mu": params, "nu": params}}, replicated)
  count = sum(x.size for x in jax.tree.leaves(state))

  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, replica_parallel in (("whole", False), ("replica_parallel", True)):
      ckpt = Checkpointer(os.path.join(tmp, name), async_save=False, keep=1, replica_parallel=replica_parallel)
      times = []
      for step in range(1 + args.repeats):
        start = time.perf_counter()
        ckpt.save(step, state, {})
        ckpt.wait()
        times.append(time.perf_counter() - start)
      ckpt.close()
      results[name] = {"first_save_s": round(times[0], 3), "save_s": round(min(times[1:]), 3)}
      print(f"{name}: first save {times[0]:.2f} s, then {min(times[1:]):.2f} s", flush=True)
  print(json.dumps({"config": args.config, "devices": jax.device_count(), "arrays": len(jax.tree.leaves(state)),
                    "values": int(count), **results,
                    "replica_parallel_vs_whole": round(results["replica_parallel"]["first_save_s"] /
                                                       results["whole"]["first_save_s"], 2),
                    "replica_parallel_vs_whole_repeat": round(results["replica_parallel"]["save_s"] /
                                                              results["whole"]["save_s"], 2)}))


if __name__ == "__main__":
  main()
