"""The library's import graph (read from the source, nothing imported): no cycle among module-level imports, none
even counting imports inside functions (which would hide one), and no project module imported inside a function
except the few listed in ``LAZY`` with their reason."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipelines", "layerflow_jax")
# Project modules imported inside a function on purpose: (importer, imported) → the reason, also written at the
# import. Anything else moves to the top of its module, where a cycle shows.
_CLI = "the CLI imports this module on every command, --help included: no jax, numpy or TensorFlow there"
_AOT = "the CLI parser imports it, and fake CPU devices must be set before jax starts (aot's docstring)"
LAZY = {
  ("data_pipelines.commands", "data_pipelines.importing"): _CLI,
  ("data_pipelines.commands", "data_pipelines.layerflow_latents"): _CLI,
  ("layerflow_jax.aot", "data_pipelines.spec"): _AOT,
  ("layerflow_jax.aot", "layerflow_jax.sharding"): _AOT,
  ("layerflow_jax.aot", "layerflow_jax.train.experiment"): _AOT,
  ("layerflow_jax.aot", "layerflow_jax.train.step"): _AOT,
  **{
    ("layerflow_jax.cli", m): _CLI
    for m in (
      "data_pipelines.pipeline",
      "layerflow_jax.demo",
      "layerflow_jax.evaluate",
      "layerflow_jax.layers",
      "layerflow_jax.media",
      "layerflow_jax.sampling",
      "layerflow_jax.stages",
      "layerflow_jax.train.trainer",
    )
  },
  ("layerflow_jax.cliargs", "layerflow_jax.layers"): _CLI + " (the parser's types)",
  ("layerflow_jax.cliargs", "layerflow_jax.train.checkpoint"): _CLI + " (the parser's types)",
  ("layerflow_jax.errors", "layerflow_jax.train.checkpoint"): _CLI + " (cli.main reports errors)",
  ("layerflow_jax.export.commands", "layerflow_jax.export.convert"): _CLI,
  ("layerflow_jax.export.commands", "layerflow_jax.export.diffusers_folder"): _CLI,
  ("layerflow_jax.export.commands", "layerflow_jax.export.official"): _CLI,
}
# The sweep package is what `layerflow sweep`'s parser is built from: jax, orbax, TFDS and matplotlib are imported
# where a run or a report needs them.
_SWEEP = "the CLI builds `layerflow sweep`'s parser from this package: no jax, orbax or TFDS at start-up"
LAZY.update(
  {
    ("layerflow_jax.sweep.plan", "layerflow_jax.train.logging"): _SWEEP,
    ("layerflow_jax.sweep.report", "layerflow_jax.evaluate"): _SWEEP,
    **{
      ("layerflow_jax.sweep.runners", m): _SWEEP
      for m in (
        "layerflow_jax.train.logging",
        "layerflow_jax.evaluate",
        "layerflow_jax.sampling",
        "layerflow_jax.train.trainer",
        "data_pipelines.registry",
        "layerflow_jax.train.checkpoint",
      )
    },
  }
)
PENDING: set[tuple[str, str]] = set()


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


def _function_level(tree: ast.Module) -> set[str]:
  """The project modules a module imports inside its functions."""
  return {
    t
    for fn in ast.walk(tree)
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
    for n in ast.walk(fn)
    for t in _targets(n)
  }


def test_no_cycle_among_module_level_imports():
  assert _cycle(_graph(nested=False), lambda m: True) is None


def test_no_cycle_even_through_function_level_imports():
  assert _cycle(_graph(nested=True), lambda m: True) is None


def test_the_model_is_in_the_graph():
  """The model, the encoders and the codec import at the top, so the cycle checks above see them (a cycle
  codec → vae → t5 → dit → codec once hid behind imports inside functions)."""
  graph = _graph(nested=False)
  assert {"layerflow_jax.codec", "layerflow_jax.dtypes"} <= graph["layerflow_jax.model.dit"]
  assert "layerflow_jax.encoders.vae" in graph["layerflow_jax.codec"]
  assert "layerflow_jax.dtypes" in graph["layerflow_jax.encoders.t5"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_project_modules_import_at_the_top(name):
  lazy = {t for (m, t) in (*LAZY, *PENDING) if m == name}
  assert _function_level(MODULES[name]) == lazy, "move these to the top of the module, or list them in LAZY"


def test_every_lazy_import_has_a_reason():
  assert all(m in MODULES and t in MODULES and len(reason) > 10 for (m, t), reason in LAZY.items())


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, lambda m: True) == ["a", "b", "c", "a"]
