"""The import graph of moe_jax, kernels_pallas and eval, read from source.

No cycles; kernels_pallas is a leaf that imports nothing of moe_jax; only
main.py and the benchmarks import the training loop (train.py is a consumer,
not a library); and no function-level imports of moe_jax modules, which
would hide a cycle from this test (main.py excepted: it imports after flag
parsing so --help is fast).
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('moe_jax', 'kernels_pallas', 'eval')
TRAIN = 'moe_jax.train'
# Modules allowed to import the training loop.
TRAIN_CONSUMERS = ('moe_jax.main', 'moe_jax.bench.')


def module_files() -> dict[str, pathlib.Path]:
  mods = {}
  for pkg in PACKAGES:
    for path in sorted((REPO / pkg).rglob('*.py')):
      parts = path.relative_to(REPO).with_suffix('').parts
      name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
      mods[name] = path
  return mods


def imports(path: pathlib.Path, name: str, mods) -> tuple[set, set]:
  """(module-level, function-level) imports of project modules."""
  package = name.split('.') if path.name == '__init__.py' else (
      name.split('.')[:-1])
  tree = ast.parse(path.read_text())
  top, nested = set(), set()

  def targets(node):
    if isinstance(node, ast.Import):
      return {a.name for a in node.names}
    base = node.module or ''
    if node.level:
      anchor = package[:len(package) - (node.level - 1)]
      base = '.'.join(anchor + ([base] if base else []))
    return {base} | {f'{base}.{a.name}' for a in node.names}

  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      found = {t for t in targets(node) if t in mods and t != name}
      (top if node.col_offset == 0 else nested).update(found)
  return top, nested


def graph():
  mods = module_files()
  return {n: imports(p, n, mods) for n, p in mods.items()}


def find_cycles(edges: dict[str, set]) -> list[list[str]]:
  color, stack, found = {}, [], []

  def visit(u):
    color[u] = 1
    stack.append(u)
    for v in sorted(edges[u]):
      if color.get(v) == 1:
        found.append(stack[stack.index(v):] + [v])
      elif not color.get(v):
        visit(v)
    stack.pop()
    color[u] = 2

  for m in sorted(edges):
    if not color.get(m):
      visit(m)
  return found


def test_no_import_cycles():
  edges = {n: top | nested for n, (top, nested) in graph().items()}
  assert not find_cycles(edges)


def test_kernels_are_a_leaf():
  for name, (top, nested) in graph().items():
    if name.startswith('kernels_pallas'):
      bad = {m for m in top | nested if not m.startswith('kernels_pallas')}
      assert not bad, f'{name} imports {sorted(bad)}'


def test_only_main_and_benchmarks_import_train():
  importers = sorted(n for n, (top, nested) in graph().items()
                     if TRAIN in top | nested)
  assert importers and all(n.startswith(TRAIN_CONSUMERS) for n in importers), (
      importers)


def test_no_late_imports_of_the_project():
  late = {n: sorted(nested) for n, (_, nested) in graph().items()
          if nested and n != 'moe_jax.main'}
  assert not late, late


def test_the_checker_finds_a_cycle():
  assert find_cycles({'a': {'b'}, 'b': {'a'}}) == [['a', 'b', 'a']]
  assert not find_cycles({'a': {'b'}, 'b': set()})
