"""Where a relative path given by a user resolves: the working folder first, then the project's own files.

`configs/...` and `checkpoints/...` ship with the project. In a checkout (or an editable install) they sit at
the repository root; a non-editable `pip install .` puts them inside the package as `suti/shipped/configs` and
`suti/shipped/checkpoints`. So `suti generate --checkpoint checkpoints/toy_suti` and
`suti info --config configs/toy.py` work from any folder, and a file of the same name in the working folder wins.
"""
from __future__ import annotations

import os

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../suti
REPO_ROOT = os.path.dirname(_PACKAGE_DIR)  # a checkout's root (holds configs/ and checkpoints/)
SHIPPED_ROOT = os.path.join(_PACKAGE_DIR, "shipped")  # the same folders in a non-editable install


def project_roots() -> list[str]:
  """Folders that may hold the shipped configs/ and checkpoints/, in lookup order."""
  # A checkout is known by its setup.py: in an installed copy REPO_ROOT is site-packages, whose other packages'
  # folders must never be taken for ours.
  roots = [REPO_ROOT] if os.path.isfile(os.path.join(REPO_ROOT, "setup.py")) else []
  return roots + ([SHIPPED_ROOT] if os.path.isdir(SHIPPED_ROOT) else [])


def resolve_path(path: str) -> str:
  """An absolute path for `path`: as given when it exists (or is absolute or empty), else the first project
  root that holds it, else the path unchanged (the caller's own error then names what the user typed)."""
  if not path or os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path) if path else path
  for root in project_roots():
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  return path
