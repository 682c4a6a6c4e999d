"""suti.core.torch_compat: torchvision (and what imports it) loads on the CPU-only torch; `import suti` stays cheap."""
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_suti_does_not_import_torch_and_installs_one_hook():
  result = _run(
      "import sys, suti, data_pipeline\n"
      "from suti.core import torch_compat\n"
      "torch_compat.install(); torch_compat.install()\n"
      "hooks = [f for f in sys.meta_path if isinstance(f, torch_compat._TorchvisionImportHook)]\n"
      "print(len(hooks), 'torch' in sys.modules)\n")
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["1", "False"]


def test_torch_users_import_after_suti():
  result = _run(
      "import sys, suti\n"
      "import open_clip\n"
      "from transformers import T5EncoderModel\n"
      "from diffusers import UNet2DConditionModel\n"
      "import torchvision.transforms\n"
      "from suti.core import torch_compat\n"
      "hooks = [f for f in sys.meta_path if isinstance(f, torch_compat._TorchvisionImportHook)]\n"
      "print('ok', len(hooks), torch_compat.ensure_torchvision_ops())\n")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["ok", "0", "present"]  # the hook fired once and removed itself


def test_without_the_shim_torchvision_fails_here():
  status = _run("from suti.core import torch_compat; print(torch_compat.ensure_torchvision_ops())")
  assert status.returncode == 0, status.stderr
  if status.stdout.strip() != "defined":
    pytest.skip(f"torchvision's extension loads on this machine ({status.stdout.strip()}): no shim needed")
  bare = _run("import torchvision")  # no suti import: no hook
  assert bare.returncode != 0
  assert "torchvision::nms" in bare.stderr
