"""Joining the processes of a multi-host run (TPU pods, multi-node GPUs) with `jax.distributed`.

Every host runs the same `suti train` command. `--distributed` lets JAX find its peers itself (Cloud TPU pods,
SLURM, Open MPI); `--coordinator HOST:PORT --num-processes N --process-id I` (or SUTI_COORDINATOR,
SUTI_NUM_PROCESSES, SUTI_PROCESS_ID) set them by hand, e.g. for several processes on one machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax


@dataclass
class DistributedArgs:
  auto: bool = False
  coordinator: str = ""
  num_processes: int = 0
  process_id: int = -1

  @classmethod
  def from_env(cls, auto: bool = False, coordinator: str = "", num_processes: int = 0,
               process_id: int = -1) -> "DistributedArgs":
    env = os.environ
    return cls(auto=auto,
               coordinator=coordinator or env.get("SUTI_COORDINATOR", ""),
               num_processes=num_processes or int(env.get("SUTI_NUM_PROCESSES", "0") or 0),
               process_id=process_id if process_id >= 0 else int(env.get("SUTI_PROCESS_ID", "-1") or -1))

  @property
  def explicit(self) -> bool:
    return bool(self.coordinator)


def initialize(args: DistributedArgs) -> None:
  """Calls jax.distributed.initialize when asked; a no-op for a single process."""
  if args.explicit:
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      raise ValueError(f"--coordinator needs --num-processes N >= 1 and 0 <= --process-id < N "
                       f"(got {args.num_processes} and {args.process_id})")
    # CPU devices of different processes talk through gloo (the default CPU client has no cross-process
    # collectives); the setting touches only the CPU backend, and must precede backend initialisation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.auto:
    jax.distributed.initialize()
