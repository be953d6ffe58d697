"""The library's import graph (read from the source, nothing imported): no cycle among module-level imports, and
none on the data path even counting imports inside functions (which would hide one)."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipelines", "layerflow_jax")
# From a config to the batches the train step reads.
DATA_PATH = ("data_pipelines", "layerflow_jax.train.trainer", "layerflow_jax.train.experiment")
# Imported inside functions on purpose, with the reason at the import.
LAZY = {"data_pipelines.commands": 2}  # the CLI parser module: TFDS/jax only in the commands that need them


def _modules() -> dict[str, ast.Module]:
  out = {}
  for pkg in PACKAGES:
    for path in (REPO / pkg).rglob("*.py"):
      name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
      out[name] = ast.parse(path.read_text())
  return out


MODULES = _modules()


def _targets(node) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in MODULES]
  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
    return subs if len(subs) == len(node.names) else [m for m in [node.module] + subs if m in MODULES]
  return []


def _graph(nested: bool) -> dict[str, set[str]]:
  graph = {}
  for name, tree in MODULES.items():
    nodes = ast.walk(tree) if nested else tree.body
    graph[name] = {t for n in nodes for t in _targets(n)} - {name}
  return graph


def _cycle(graph: dict[str, set[str]], within) -> list[str] | None:
  """One import cycle among the modules ``within`` accepts, or None."""
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    stack.append(m)
    for t in sorted(graph[m]):
      if not within(t):
        continue
      if state.get(t) == 1:
        return stack[stack.index(t) :] + [t]
      if t not in state and (found := visit(t, stack)):
        return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if within(m) and m not in state and (found := visit(m, [])):
      return found
  return None


def _on_data_path(name: str) -> bool:
  return any(name == p or name.startswith(p + ".") for p in DATA_PATH)


def test_no_cycle_among_module_level_imports():
  assert _cycle(_graph(nested=False), lambda m: True) is None


def test_data_path_has_no_cycle_even_through_function_level_imports():
  assert _cycle(_graph(nested=True), _on_data_path) is None


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("data_pipelines")))
def test_data_modules_import_at_the_top(name):
  nested = [
    n
    for n in ast.walk(MODULES[name])
    if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in MODULES[name].body
  ]
  assert len(nested) == LAZY.get(name, 0), [ast.unparse(n) for n in nested]


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, lambda m: True) == ["a", "b", "c", "a"]
