"""Loading ml_collections configs: ``configs/FILE.py[:ARG]`` plus ``--config.KEY=VALUE`` overrides.

A config file defines ``get_config(arg: str | None) -> ConfigDict`` (big_vision style). Overrides are typed:
a value is parsed as a Python literal where possible and must match the existing key's type; an unknown key
or a wrong type is refused with a one-line error naming the key, the value and what was expected.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
import sys
from typing import Any, Sequence

import ml_collections as mlc

from configs import common, default

# Every setting, declared once: key → default, doc, allowed range (configs/default.py).
SCHEMA = default.SCHEMA


class ConfigError(ValueError):
  """A config that cannot be used (the message names the key, the value and what was expected)."""


def load_module(path: str):
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} does not exist")
  name = f"_layerflow_config_{abs(hash(str(file.resolve())))}"
  spec = importlib.util.spec_from_file_location(name, file)
  if spec is None or spec.loader is None:
    raise ConfigError(f"config file {path!r} cannot be loaded as a Python module")
  module = importlib.util.module_from_spec(spec)
  repo = str(file.resolve().parent.parent)
  if repo not in sys.path:  # so config files can `from configs import common`
    sys.path.insert(0, repo)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path}:{e.lineno}: syntax error: {e.msg}") from None
  except Exception as e:  # the file itself fails to run (a NameError, a bad import …)
    text = str(e).strip().splitlines()
    raise ConfigError(
      f"config file {path} fails to load: {type(e).__name__}: {text[0] if text else ''}"
    ) from None
  return module


def split_spec(spec: str) -> tuple[str, str | None]:
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def call_in_config_file(spec: str, function: str, error_prefix: str = "") -> Any:
  """``function(ARG)`` of the config file ``FILE.py[:ARG]``; a missing function or its ``ValueError`` becomes a
  :class:`ConfigError` naming the spec."""
  path, arg = split_spec(spec)
  module = load_module(path)
  if not hasattr(module, function):
    raise ConfigError(f"config file {path!r} defines no {function}(arg)")
  try:
    return getattr(module, function)(arg)
  except ValueError as e:
    raise ConfigError(f"{spec}: {error_prefix}{e}") from None


def load_config(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
  """``"configs/default.py:size=tiny"`` + ``["train.steps=10", ...]`` → a locked ConfigDict."""
  config = call_in_config_file(spec, "get_config")
  apply_overrides(config, overrides)
  return config


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: mlc.ConfigDict, overrides: Sequence[str]) -> mlc.ConfigDict:
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not KEY=VALUE")
    set_key(config, key.strip(), parse_value(raw.strip()))
  return config


def set_key(config: mlc.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, mlc.ConfigDict) or part not in node:
      here = sorted(node.keys()) if isinstance(node, mlc.ConfigDict) else []
      raise ConfigError(
        f"config key {'.'.join(parents[: i + 1])!r} does not exist (while setting {key}={value!r}); "
        f"expected one of: {', '.join(here) or '(none)'}"
      )
    node = node[part]
  if not isinstance(node, mlc.ConfigDict):
    raise ConfigError(f"config key {'.'.join(parents)!r} is not a group (while setting {key}={value!r})")
  if leaf not in node:
    known = sorted(node.keys())
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean {'.'.join(parents + close[:1])!r}? " if close else ""
    raise ConfigError(
      f"config key {key!r} does not exist (value {value!r}); {hint}expected one of the keys "
      f"here: {', '.join(known) or '(none)'}"
    )
  old = node[leaf]
  if isinstance(old, mlc.ConfigDict) and isinstance(value, dict):
    for k, v in value.items():
      set_key(config, f"{key}.{k}", v)
    return
  if isinstance(old, bool) and not isinstance(value, bool):
    raise ConfigError(f"config key {key!r}: {value!r} is not a bool; expected True or False")
  if isinstance(old, (int, float)) and not isinstance(old, bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config key {key!r}: {value!r} is not a number (expected {type(old).__name__})")
    if isinstance(old, int) and isinstance(value, float) and not value.is_integer():
      raise ConfigError(f"config key {key!r}: {value!r} is not an integer; expected an int")
    value = type(old)(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError):
    raise ConfigError(
      f"config key {key!r}: cannot set {value!r} (a {type(value).__name__}); expected a "
      f"{type(old).__name__} like the current value {old!r}"
    ) from None


def complete(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """Adds every declared key ``config`` lacks, at its default (the config of a checkpoint written before that key
  was declared ran with the default); returns ``config``."""
  return common.fill(config, SCHEMA)
