"""The package's import structure (docs/architecture.md): no circles, and imports only from a
layer to the layers below it. Read from the source with `ast`, lazy imports inside functions
included."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "qtx")

# Lowest first; a module may import modules of its own layer or of lower ones.
LAYERS = (
    ("tpu_host", "chips"),
    ("kernels", "quant", "parallel", "sharded_losses", "optim", "checkpoint", "metrics",
     "distributed", "flops", "data", "hostmem"),
    ("nn", "losses"),
    ("evaluate", "weights"),
    ("config_lib",),
    ("run",),
    ("step",),
    ("analysis",),
    ("aot",),
    ("modes",),
    ("main",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
  out = {}
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _imports(path, modules):
  """qtx modules that `path` imports (module-level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import mod` depends on pkg.mod; `from pkg import name` on pkg (its __init__)
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    for n in names:
      while n and n not in modules:
        n = n.rpartition(".")[0]
      if n and n != "qtx":
        found.add(n)
  return found


def _graph():
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _part(module):
  return module.split(".")[1] if module.count(".") else module


def test_every_module_has_a_layer():
  missing = sorted({_part(m) for m in _graph() if m != "qtx"} - set(RANK))
  assert not missing, f"give these a layer in LAYERS: {missing}"


def test_no_import_runs_up_a_layer():
  up = [(m, d) for m, deps in _graph().items() if m != "qtx" for d in deps
        if RANK[_part(d)] > RANK[_part(m)]]
  assert up == []


def test_quant_is_a_leaf():
  leaks = [(m, d) for m, deps in _graph().items() if m.startswith("qtx.quant")
           for d in deps if not d.startswith("qtx.quant")]
  assert leaks == []


def test_no_import_circles():
  graph = _graph()
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d, stack + [d])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert cycles == []


def test_the_checks_can_fail():
  """The graph really is read: known edges are seen."""
  graph = _graph()
  assert "qtx.run" in graph["qtx.modes.train"]
  assert "qtx.quant.layers" in graph["qtx.nn.attention"]
  assert "qtx.data.registry" in graph["qtx.data.synthetic"]
