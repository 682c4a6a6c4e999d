"""How our parameter paths and array layouts map onto a diffusers (PyTorch) state_dict, for every diffusers
model we read or write (UNet, VAE).

Our paths follow diffusers' module names except three renames: `to_out.0` -> `to_out`, `ff.net.0.proj` ->
`ff.proj_in`, `ff.net.2` -> `ff.proj_out`; `weight` is `kernel` for Linear / Conv and `scale` for norms. Conv
kernels are OIHW there and HWIO here, Linear (out, in) there and (in, out) here, and a 1x1 convolution there may
be a Linear here. Weights are read with safetensors.numpy only (never pickle).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from suti.core.atomic_io import read_json_object

_SEGMENT_RENAMES = (  # (ours, diffusers) path segments
    (("ff", "proj_in"), ("ff", "net", "0", "proj")),
    (("ff", "proj_out"), ("ff", "net", "2")),
    (("to_out",), ("to_out", "0")),
)


def diffusers_key(path: tuple[Any, ...]) -> str:
  """Our parameter path -> the diffusers state_dict key holding the same tensor."""
  parts = [str(p) for p in path[:-1]]
  for ours, theirs in _SEGMENT_RENAMES:
    n = len(ours)
    i = 0
    while i <= len(parts) - n:
      if tuple(parts[i:i + n]) == ours:
        parts[i:i + n] = list(theirs)
        i += len(theirs)
      else:
        i += 1
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(str(path[-1]))
  if leaf is None:
    raise ValueError(f"no diffusers counterpart for parameter {'.'.join(map(str, path))}")
  return ".".join(parts + [leaf])


def key_map(build: Callable[[], nnx.Module],
            keep: Callable[[tuple[Any, ...]], bool] | None = None) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
  """diffusers state_dict key -> (our parameter path, our shape) for the parameters of the module `build` makes
  (built abstractly: no weights are drawn) that `keep` accepts."""
  abstract = nnx.eval_shape(build)
  return {diffusers_key(path): (path, tuple(v.shape)) for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
          if keep is None or keep(path)}


def converted_shape(shape: tuple[int, ...], want_ndim: int) -> tuple[int, ...]:
  """Shape of a diffusers tensor after conversion to our layout."""
  if len(shape) == 4 and want_ndim == 4:  # conv OIHW -> HWIO
    return (shape[2], shape[3], shape[1], shape[0])
  if len(shape) == 4 and want_ndim == 2 and shape[2:] == (1, 1):  # 1x1 conv -> Linear (in, out)
    return (shape[1], shape[0])
  if len(shape) == 2:  # Linear (out, in) -> (in, out)
    return (shape[1], shape[0])
  return tuple(shape)


def to_ours(value: np.ndarray, want_ndim: int) -> np.ndarray:
  """A diffusers tensor (numpy) in our layout, float32."""
  value = np.asarray(value, dtype=np.float32)
  if value.ndim == 4 and want_ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 4 and want_ndim == 2:
    value = value[:, :, 0, 0].T
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def to_diffusers(value: np.ndarray, conv_1x1: bool = False) -> np.ndarray:
  """One of our arrays in diffusers' layout (conv HWIO -> OIHW, Linear (in, out) -> (out, in); with conv_1x1, a
  Linear of ours that is a 1x1 convolution there -> (out, in, 1, 1))."""
  value = np.asarray(value)
  if value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2:
    value = value.T[:, :, None, None] if conv_1x1 else value.T
  return np.ascontiguousarray(value)


def check_shapes(shapes: Mapping[str, tuple[int, ...]], wanted: Mapping[str, tuple[tuple[Any, ...], tuple[int, ...]]],
                 what: str) -> None:
  """Raises ValueError naming the first unexpected key, missing key or shape mismatch of a `what` checkpoint."""
  for key in shapes:
    if key not in wanted:
      raise ValueError(f"unexpected key in diffusers {what} checkpoint: {key} (no such parameter in this config)")
  for key, (_, want) in wanted.items():
    if key not in shapes:
      raise ValueError(f"missing key in diffusers {what} checkpoint: {key}")
    got = converted_shape(tuple(shapes[key]), len(want))
    if got != want:
      raise ValueError(f"shape mismatch for diffusers {what} key {key}: checkpoint gives {got} after conversion, "
                       f"the model expects {want}")


def safetensors_file(path: str) -> str:
  """The weights file of a diffusers model folder (or `path` itself when it is a .safetensors file)."""
  if os.path.isdir(path):
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.safetensors"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise ValueError(f"no diffusion_pytorch_model.safetensors in {path}")
  if not os.path.isfile(path):
    raise ValueError(f"no such checkpoint file: {path}")
  if not path.endswith(".safetensors"):
    raise ValueError(f"expected a .safetensors file (pickled checkpoints are not read), got {path}")
  return path


def read_config(path: str, what: str) -> dict[str, Any]:
  """config.json of a diffusers model folder (or the file itself) as a dict; one-line errors."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(f"no config.json for the diffusers {what} at {path}")
  return read_json_object(file)
