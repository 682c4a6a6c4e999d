"""A non-editable install works from any folder: the shipped configs/ and checkpoints/ travel inside the package.

The project is built and installed (`pip install --no-deps --no-build-isolation --target`) from a copy of the
working tree, so the checkout gets no build/ folder and no stale build/lib can leak into the install. The
commands then run from an empty folder with PYTHONPATH naming only the install and PYTHONSAFEPATH=1, so neither
the checkout nor the working folder is on the child's sys.path.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the build reads: the top-level files (setup.py, README.md, ...) and these folders, without caches.
SOURCE_FOLDERS = ("suti", "data_pipeline", "configs", "checkpoints")
_CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")
IMAGE_SIZE = 16  # configs/toy_suti.py: the shipped apprentice's resolution
TOY_SUTI_PARAMS = "2,955,555"  # `suti info` prints the UNet total with thousands separators

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pip") is None, reason="pip is not installed")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(install folder, empty working folder, child environment) for a fresh non-editable install."""
  base = tmp_path_factory.mktemp("install")
  source, target, work = base / "src", base / "site", base / "work"
  source.mkdir()
  for name in os.listdir(ROOT):
    if os.path.isfile(os.path.join(ROOT, name)):
      shutil.copy2(os.path.join(ROOT, name), source / name)
  for name in SOURCE_FOLDERS:
    shutil.copytree(os.path.join(ROOT, name), source / name, ignore=_CACHES)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
  env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_INPUT="1")
  result = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile", "--quiet",
       "--no-warn-script-location", "--target", str(target), str(source)],
      capture_output=True, text=True, cwd=base, env=env, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  work.mkdir()
  env.update(PYTHONPATH=str(target), PYTHONSAFEPATH="1", PYTHONNOUSERSITE="1")
  return target, work, env


def _run(installed, *args, code=None):
  target, work, env = installed
  command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "suti.cli", *args]
  result = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env, timeout=300)
  assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
  return result.stdout


def _files(folder) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder)
                if "__pycache__" not in d for f in files if not f.endswith(".pyc"))


def test_install_ships_configs_checkpoints_and_package_data(installed):
  target = installed[0]
  shipped = target / "suti" / "shipped"
  for folder in ("configs", "checkpoints"):  # every file, nested folders included
    assert _files(shipped / folder) == _files(os.path.join(ROOT, folder)), folder
  assert (shipped / "checkpoints" / "toy_suti" / "3000" / "params" / "_METADATA").is_file()
  assert (shipped / "configs" / "pipeline" / "__init__.py").is_file()
  assert (target / "suti" / "embed" / "toy_clip_configs" / "toy-ViT-32.json").is_file()
  # The install is not a checkout: nothing at its root for suti.core.paths to take as the project's own folders.
  assert not (target / "configs").exists() and not (target / "checkpoints").exists()


def test_installed_copy_is_the_one_imported(installed):
  target, work, _ = installed
  out = _run(installed, code=(
      "import os, sys, suti\n"
      "from suti.config import load_config\n"
      "from suti.core.paths import resolve_path\n"
      "load_config('configs/eval/toy.py')\n"  # imports its sibling configs.pipeline.toy_icl
      "print(suti.__file__)\n"
      "print(sys.modules['configs'].__file__)\n"
      "print(resolve_path('checkpoints/toy_suti'))\n"
      "print(os.path.isdir(resolve_path('checkpoints/toy_clip')))\n"
      "print('\\n'.join(os.path.abspath(p or '.') for p in sys.path))\n"))
  suti_file, configs_file, checkpoint, clip_found, *path = out.splitlines()
  shipped = str(target / "suti" / "shipped")
  assert suti_file.startswith(str(target) + os.sep)
  assert configs_file == os.path.join(shipped, "configs", "__init__.py")
  assert checkpoint == os.path.join(shipped, "checkpoints", "toy_suti") and clip_found == "True"
  assert ROOT not in path and str(work) not in path


def test_info_and_generate_from_an_empty_folder(installed):
  work = installed[1]
  out = _run(installed, "info", "--config", "configs/toy_suti.py")
  assert any(line.split() == ["total", TOY_SUTI_PARAMS] for line in out.splitlines()), out

  rng = np.random.default_rng(0)
  demos = []
  for name in ("d1.png", "d2.png", "d3.png"):
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(work / name)
    demos += ["--demo", name]
  _run(installed, "generate", "--checkpoint", "checkpoints/toy_suti", *demos, "--prompt", "a sks ball on the beach",
       "--out", "x.png", "--steps", "2", "--no-progress")
  with Image.open(work / "x.png") as image:
    assert image.format == "PNG" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
