"""The import graph of lcjax/ and pallas_kernels/: no circles, lcjax imports at module top.

The graph is read from the source with `ast` (nothing is imported): an edge A -> B for
every `import B` / `from B import x` in A (to B.x when x is a submodule), at any depth
of A, so a function-level import that would close a circle is caught too. A second test
imports every module first in a fresh interpreter, which catches what the static graph
cannot: a module taking a name from another that is still initializing.
"""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lcjax", "pallas_kernels")
# Heavy or optional packages that modules may import inside a function, where they are
# needed, so that importing lcjax does not pull them in.
LAZY_ALLOWED = {
  "torch",
  "transformers",
  "tensorflow_datasets",
  "datasets",
  "pyarrow",
  "array_record",
  "matplotlib",
  "tokenizers",
  "jieba",  # LongBench's Chinese word segmentation, used when installed (lcjax.eval.longbench)
}


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module in PACKAGES."""
  found = {}
  for package in PACKAGES:
    for directory, _, names in os.walk(os.path.join(ROOT, package)):
      for name in names:
        if not name.endswith(".py"):
          continue
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _imports(path: str, module: str, modules) -> list[tuple[str, bool]]:
  """(imported lcjax/pallas_kernels module, at module top?) for every import in a file."""
  tree = ast.parse(open(path).read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  top = {id(node) for node in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] in PACKAGES:
        out.append((name, id(node) in top))
  return out


def _graph():
  modules = _modules()
  graph, lazy = {}, []
  for module, path in modules.items():
    edges = set()
    for name, at_top in _imports(path, module, modules):
      target = name
      while target not in modules and "." in target:
        target = target.rpartition(".")[0]
      if target != module:
        edges.add(target)
      if not at_top:
        lazy.append(f"{module} imports {name} inside a function")
    graph[module] = edges
  return graph, lazy


def _cycle(graph):
  """One import circle as a list of modules, or None (iterative DFS)."""
  state = {}
  for start in sorted(graph):
    if state.get(start):
      continue
    stack = [(start, iter(sorted(graph[start])))]
    path = [start]
    state[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        state[node] = 2
        stack.pop()
        path.pop()
      elif state.get(child) == 1:
        return path[path.index(child) :] + [child]
      elif not state.get(child):
        state[child] = 1
        path.append(child)
        stack.append((child, iter(sorted(graph.get(child, ())))))
  return None


def test_no_import_circles():
  graph, _ = _graph()
  assert len(graph) > 60  # every module of both packages was read
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_check_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_lcjax_modules_are_imported_at_module_top():
  """No hidden imports: every import of an lcjax/pallas_kernels module is at module top."""
  _, lazy = _graph()
  assert not lazy, "\n".join(lazy)


def test_only_optional_packages_are_imported_inside_functions():
  offenders = []
  for module, path in _modules().items():
    tree = ast.parse(open(path).read(), path)
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        else:
          names = [node.module or ""]
        for name in names:
          if name.split(".")[0] not in LAZY_ALLOWED | set(PACKAGES):
            offenders.append(f"{module}: {name}")
  assert not offenders, "\n".join(offenders)


def test_every_module_imports_first_in_a_fresh_interpreter():
  """Importing any module first must work (a name taken from a half-initialized module
  fails only in some import orders, which the static graph cannot see)."""
  script = (
    "import importlib, sys\n"
    "failed = []\n"
    f"for name in {sorted(_modules())!r}:\n"
    "  for key in [k for k in sys.modules if k.split('.')[0] in ('lcjax', 'pallas_kernels')]:\n"
    "    del sys.modules[key]\n"
    "  try:\n"
    "    importlib.import_module(name)\n"
    "  except Exception as e:\n"
    "    failed.append(f'{name}: {type(e).__name__}: {e}')\n"
    "print('\\n'.join(failed))\n"
    "sys.exit(1 if failed else 0)\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]
