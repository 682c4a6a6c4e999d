"""The device mesh (`data` x `fsdp`) from `config.mesh`, and how batches are laid out on it.

Batches are split over both axes (every device holds a different slice of the batch); parameters are replicated
over `data` and, when large, sharded over `fsdp` (suti/train/sharding.py). With fsdp = 1 this is plain data
parallelism; with data = 1 it is pure FSDP.
"""
from __future__ import annotations

from typing import Sequence

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device


def mesh_shape(cfg_mesh: mlc.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; one of them may be -1 and takes what the other leaves."""
  sizes = [int(cfg_mesh.data), int(cfg_mesh.fsdp)]
  if sizes.count(-1) > 1:
    raise ValueError("only one of mesh.data and mesh.fsdp may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got mesh.data={sizes[0]} mesh.fsdp={sizes[1]}")
  if -1 in sizes:
    other = sizes[1 - sizes.index(-1)]
    if num_devices % other:
      raise ValueError(f"{num_devices} devices cannot be split into a mesh with an axis of {other}")
    sizes[sizes.index(-1)] = num_devices // other
  if sizes[0] * sizes[1] != num_devices:
    raise ValueError(f"mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} = {sizes[0] * sizes[1]} devices, "
                     f"but {num_devices} are available")
  return sizes[0], sizes[1]


def make_mesh(cfg_mesh: mlc.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices of all processes (or the given ones)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg_mesh, len(devices))
  if devices == list(jax.devices()):
    try:  # topology-aware placement on TPU / GPU pods; plain reshape where it does not apply (CPU)
      grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """The leading (batch) dimension split over every device; the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """The global batch (per micro-batch) must split evenly over the devices and the processes."""
  if grad_accum_steps < 1 or global_batch % grad_accum_steps:
    raise ValueError(f"train.batch_size={global_batch} is not divisible by train.grad_accum_steps={grad_accum_steps}")
  micro = global_batch // grad_accum_steps
  if micro % mesh.size:
    raise ValueError(f"the micro-batch ({micro} = train.batch_size / train.grad_accum_steps) is not divisible by "
                     f"the {mesh.size} devices of the mesh")
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size={global_batch} is not divisible by {jax.process_count()} processes")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into global arrays sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}
