"""The sweep language of a config's ``get_sweep(arg)`` (:func:`axis`, :func:`product`, :func:`zipit`) and its
expansion into named runs, each a config spec and overrides (:func:`expand`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from typing import Any, Iterable, Mapping, Sequence

from layerflow_jax.config import ConfigError, call_in_config_file, load_config, split_spec

ARG_PREFIX = "arg."

# ----------------------------------------------------------------------------- building sweeps (for get_sweep)


def axis(key: str, values: Iterable[Any]) -> list[dict]:
  """One swept key: ``axis("model.layer_embed", ["none", "text"])`` → ``[{key: "none"}, {key: "text"}]``."""
  values = list(values)
  if not values:
    raise ValueError(f"sweep axis {key!r} has no values")
  return [{key: v} for v in values]


def product(*axes: Sequence[Mapping]) -> list[dict]:
  """Every combination of the given run lists (the first varies slowest)."""
  return [_merge(parts) for parts in itertools.product(*axes)]


def zipit(*axes: Sequence[Mapping]) -> list[dict]:
  """Runs taken side by side: the i-th run merges the i-th entry of every list (all lists equally long)."""
  if len({len(a) for a in axes}) > 1:
    raise ValueError(f"sweep zipit: lists of different lengths {[len(a) for a in axes]}")
  return [_merge(parts) for parts in zip(*axes)]


def _merge(parts: Sequence[Mapping]) -> dict:
  run: dict = {}
  for part in parts:
    clash = set(run) & set(part)
    if clash:
      raise ValueError(f"sweep: key(s) {sorted(clash)} set twice in one run")
    run.update(part)
  return run


# ----------------------------------------------------------------------------- expanding a config's sweep


def _format_value(v: Any) -> str:
  if isinstance(v, str):
    return v
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (list, tuple, dict)):
    return json.dumps(v, separators=(",", ":"), sort_keys=True)
  return str(v)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each key's last component, or the whole key where two keys share the last component."""
  leaves = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def run_name(run: Mapping[str, Any], short: Mapping[str, str] | None = None) -> str:
  """A file-system-safe name from the run's swept values: ``layer_embed=none,steps=3``."""
  short = short or _short_keys(list(run))
  text = ",".join(f"{short.get(k, k)}={_format_value(v)}" for k, v in run.items()) or "base"
  text = re.sub(r"[^A-Za-z0-9_.,=+\-]", "_", text)
  if len(text) > 120:  # keep names usable as directory names
    text = text[:100] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
  return text


def run_spec(spec: str, run: Mapping[str, Any]) -> tuple[str, list[str]]:
  """The config spec (``arg.*`` keys folded into the argument) and the ``KEY=VALUE`` overrides of one run."""
  path, arg = split_spec(spec)
  arg_parts = [p for p in (arg or "").split(",") if p]
  overrides = []
  for key, value in run.items():
    if not isinstance(key, str) or not key:
      raise ConfigError(f"sweep run {dict(run)}: key {key!r} is not a config key")
    if key.startswith(ARG_PREFIX):
      name = key[len(ARG_PREFIX) :]
      if not name or any(c in str(value) for c in ",:") or any(c in name for c in ",=:"):
        raise ConfigError(f"sweep key {key!r}={value!r}: config arguments cannot contain ',', ':' or '='")
      arg_parts.append(f"{name}={value}")
    else:
      overrides.append(f"{key}={value!r}")
  new_spec = f"{path}:{','.join(arg_parts)}" if arg_parts else path
  return new_spec, overrides


def expand(spec: str, overrides: Sequence[str] = ()) -> list[dict]:
  """``FILE.py[:ARG]`` with ``get_sweep(ARG)`` → ``[{name, spec, overrides, swept}]``; every config is checked."""
  runs = call_in_config_file(spec, "get_sweep", "get_sweep: ")
  if not isinstance(runs, (list, tuple)) or not runs or not all(isinstance(r, Mapping) for r in runs):
    raise ConfigError(f"{spec}: get_sweep must return a non-empty list of dicts, got {type(runs).__name__}")
  keys: list[str] = []
  for r in runs:
    keys += [k for k in r if k not in keys]
  short = _short_keys(keys)
  out, seen = [], {}
  for r in runs:
    name = run_name(r, short)
    if name in seen:
      raise ConfigError(f"{spec}: runs {seen[name]} and {dict(r)} have the same name {name!r}")
    seen[name] = dict(r)
    rspec, rover = run_spec(spec, r)
    all_overrides = list(overrides) + rover
    try:
      load_config(rspec, all_overrides)  # fail before anything runs, naming the key
    except ConfigError as e:
      raise ConfigError(f"sweep run {name!r}: {e}") from None
    out.append({"name": name, "spec": rspec, "overrides": all_overrides, "swept": {k: r[k] for k in r}})
  return out
