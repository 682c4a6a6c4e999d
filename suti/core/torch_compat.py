"""Lets `import torchvision` work on a CPU-only torch whose torchvision extension cannot load.

Why this exists: the environment pins torch 2.13.0 (CPU build) with torchvision 0.28.0, whose compiled
extension `torchvision/_C.so` links CUDA libraries and so fails to load. torchvision is meant to degrade
to its pure-Python parts in that case, but `torchvision/_meta_registrations.py` calls
`torch.library.register_fake("torchvision::nms")` (and `"torchvision::qnms"`) without checking that the
extension loaded, and that raises "operator torchvision::nms does not exist". Everything that imports
torchvision (open_clip, transformers' PyTorch vision code, diffusers, timm) then dies at import time.

What it does: before torchvision is first imported, it tries to load torchvision's own extension (so a
working install keeps its real kernels); only if that fails does it define the two operator *schemas*
(copied from torchvision's csrc/ops/nms.cpp, as found in `_C.so`) with no kernels, which is all the fake
registration needs. Calling `torchvision.ops.nms` then fails with torch's "no kernel for CPU" error,
while everything this project uses (transforms, models, open_clip, diffusers) works.

How it is used: `suti/__init__.py` and `data_pipeline/__init__.py` call `install()`, which puts a tiny
finder on `sys.meta_path`; the first time anything looks up `torchvision` it imports torch, runs
`ensure_torchvision_ops()` and steps aside. So `import suti` stays cheap (torch is not imported unless
torchvision is), and Ray workers get the hook as soon as they unpickle anything from `suti`.

When to delete it: once torchvision's extension loads here (a torchvision wheel built for the CPU torch,
or a CUDA machine), or once torchvision guards that registration with `extension._has_ops()`;
`ensure_torchvision_ops()` returning "native" on every machine in use is the sign.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from typing import Literal

# Schemas as torchvision's C++ extension defines them (csrc/ops/nms.cpp).
TORCHVISION_OP_SCHEMAS: dict[str, str] = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

OpsStatus = Literal["native", "defined", "present", "no-torch", "no-torchvision"]


def _op_exists(qualname: str) -> bool:
  import torch  # lazy: `import suti` must not import torch

  namespace, name = qualname.split("::")
  try:
    getattr(getattr(torch.ops, namespace), name)
  except (AttributeError, RuntimeError):
    return False
  return True


def _torchvision_extension_path() -> str | None:
  """Path of torchvision's compiled `_C` extension, found without importing torchvision."""
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
      candidate = os.path.join(folder, "_C" + suffix)
      if os.path.isfile(candidate):
        return candidate
  return None


def ensure_torchvision_ops() -> OpsStatus:
  """Makes the `torchvision::nms` / `qnms` operators known to torch before torchvision is imported.

  Returns "present" if they already existed, "native" if torchvision's own extension loaded,
  "defined" if the schemas had to be defined here, "no-torch" / "no-torchvision" if there is nothing
  to do. Idempotent.
  """
  if importlib.util.find_spec("torch") is None:
    return "no-torch"
  import torch  # lazy: `import suti` must not import torch

  if all(_op_exists(name) for name in TORCHVISION_OP_SCHEMAS):
    return "present"
  extension = _torchvision_extension_path()
  if extension is None:
    return "no-torchvision"
  try:
    # Loading the same library again later (torchvision does) is a no-op for the dynamic loader.
    torch.ops.load_library(extension)
  except (OSError, RuntimeError):
    pass
  else:
    if all(_op_exists(name) for name in TORCHVISION_OP_SCHEMAS):
      return "native"
  for qualname, schema in TORCHVISION_OP_SCHEMAS.items():
    if not _op_exists(qualname):
      torch.library.define(qualname, schema)  # torch keeps the defining Library alive
  return "defined"


class _TorchvisionImportHook:
  """A meta-path finder that never finds anything: it only runs `ensure_torchvision_ops()` once, when
  `torchvision` is first looked up, then removes itself and lets the normal finders import it."""

  def find_spec(self, fullname, path=None, target=None):  # noqa: D102 (importlib protocol)
    if fullname != "torchvision":
      return None
    if self in sys.meta_path:
      sys.meta_path.remove(self)  # first, so the look-ups inside ensure_torchvision_ops do not recurse
    ensure_torchvision_ops()
    return None


def install() -> None:
  """Arranges for `ensure_torchvision_ops()` to run before torchvision is first imported. Cheap and
  idempotent; does not import torch."""
  if "torchvision" in sys.modules:
    return  # too late to matter, or already imported successfully
  if any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
    return
  sys.meta_path.insert(0, _TorchvisionImportHook())
