"""The house's one-way layering, read from every module's imports (those inside functions too).

A package imports only packages on a lower level; packages on one level do not import each other; modules do
not import each other in a cycle. A failure names the importing file, its line and the imported module.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PACKAGES = ("suti", "data_pipeline")

# Lowest first. `suti` (its __init__, which installs the torch shim) and `suti.config` sit with core: they
# import nothing of the project but core.
LEVELS: list[tuple[str, ...]] = [
    ("suti.core",),
    ("suti", "suti.config"),
    ("suti.formats", "suti.embed", "suti.viz"),
    ("suti.toy",),
    ("suti.models", "suti.diffusion"),
    ("suti.checkpoint",),
    ("suti.infer",),
    ("suti.train",),
    ("suti.experts", "suti.methods"),
    ("suti.eval",),
    ("data_pipeline",),
    ("suti.cli", "suti.demo", "suti.info"),
]
LEVEL_OF = {unit: i for i, units in enumerate(LEVELS) for unit in units}


def module_files(root: str = ROOT) -> dict[str, str]:
  """Dotted module name -> file, for every module of the project's packages."""
  found = {}
  for package in PROJECT_PACKAGES:
    for folder, _, files in os.walk(os.path.join(root, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          found[dotted.removesuffix(".__init__")] = path
  return found


def unit_of(module: str) -> str:
  """The layering unit of a module: its longest prefix listed in LEVELS."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in LEVEL_OF:
      return ".".join(parts[:n])
  raise KeyError(f"module {module} belongs to no level of the layering; add its package to LEVELS")


def imports_of(module: str, path: str, modules: dict[str, str]) -> list[tuple[int, str]]:
  """(line, imported project module) for every import statement in the file, at any depth."""
  is_package = path.endswith("__init__.py")
  out = []
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import sub` imports the submodule when there is one, else a name of pkg
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    out += [(node.lineno, t) for t in targets if t.split(".")[0] in PROJECT_PACKAGES]
  return out


def layering_violations(root: str = ROOT) -> list[str]:
  modules = module_files(root)
  problems = []
  for module, path in sorted(modules.items()):
    src = unit_of(module)
    for line, target in imports_of(module, path, modules):
      dst = unit_of(target)
      if src == dst:
        continue
      where = f"{os.path.relpath(path, root)}:{line} imports {target}"
      if LEVEL_OF[dst] > LEVEL_OF[src]:
        problems.append(f"{where}: {dst} sits above {src}")
      elif LEVEL_OF[dst] == LEVEL_OF[src] and dst != "suti":
        problems.append(f"{where}: {dst} and {src} sit on one level")
  return problems


def import_cycles(root: str = ROOT) -> list[str]:
  """One line per cycle among modules: 'a.py -> b.py -> ... -> a.py'."""
  modules = module_files(root)
  graph = {m: sorted({t for _, t in imports_of(m, p, modules) if t in modules and t != m})
           for m, p in modules.items()}
  # A package's __init__ is imported by its submodules implicitly; an edge to it is not a cycle by itself.
  index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(" <-> ".join(os.path.relpath(modules[m], root) for m in sorted(component)))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return cycles


def test_every_import_follows_the_layering():
  problems = layering_violations()
  assert not problems, f"{len(problems)} imports break the layering:\n" + "\n".join(problems)


def test_no_import_cycles():
  cycles = import_cycles()
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_has_a_level():
  for module in module_files():
    unit_of(module)  # raises naming the module


@pytest.fixture
def fake_project(tmp_path):
  """A tiny tree with the project's package names, to show the checker catches what it is named after."""
  def write(rel: str, text: str = "") -> None:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  for pkg in ("suti", "suti/core", "suti/infer", "suti/train", "data_pipeline"):
    write(f"{pkg}/__init__.py")
  return tmp_path, write


def test_checker_names_an_upward_import_inside_a_function(fake_project):
  root, write = fake_project
  write("suti/infer/gen.py", "def f():\n  from suti.train import step\n")
  write("suti/train/step.py", "from suti.infer import gen\n")
  problems = layering_violations(str(root))
  assert problems == ["suti/infer/gen.py:2 imports suti.train.step: suti.train sits above suti.infer"]


def test_checker_names_suti_importing_data_pipeline(fake_project):
  root, write = fake_project
  write("suti/core/io.py", "import data_pipeline\n")
  assert layering_violations(str(root)) == [
      "suti/core/io.py:1 imports data_pipeline: data_pipeline sits above suti.core"]


def test_checker_finds_a_cycle_within_a_package(fake_project):
  root, write = fake_project
  write("suti/core/a.py", "from suti.core import b\n")
  write("suti/core/b.py", "def f():\n  from . import a\n")
  assert layering_violations(str(root)) == []
  assert import_cycles(str(root)) == ["suti/core/a.py <-> suti/core/b.py"]
