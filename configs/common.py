"""Pieces shared by the config files: the setting declaration, argument parsing and the model size table."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import ml_collections as mlc

# CogVideoX sizes (2b/5b exact) and small ones for tests, the demo and single-GPU experiments.
MODEL_SIZES = {
  #        layers heads head_dim time_dim  pos      text_dim
  "tiny": dict(num_layers=2, num_heads=4, head_dim=32, time_embed_dim=128, pos_embed="sincos"),
  "small": dict(num_layers=8, num_heads=8, head_dim=64, time_embed_dim=256, pos_embed="sincos"),
  "2b": dict(num_layers=30, num_heads=30, head_dim=64, time_embed_dim=512, pos_embed="sincos"),
  "5b": dict(num_layers=42, num_heads=48, head_dim=64, time_embed_dim=512, pos_embed="rope"),
}


def model_size(size: str) -> dict:
  """The ``model.*`` values of one row of :data:`MODEL_SIZES` (and ``model.size``)."""
  if size not in MODEL_SIZES:
    raise ValueError(f"model size {size!r} unknown; expected one of {sorted(MODEL_SIZES)}")
  return dict(size=size, **MODEL_SIZES[size])


class Setting(NamedTuple):
  """One declared config key: its default (whose type is the key's type), a one-line doc and, for numbers, the
  allowed interval (``"[1, inf)"``, ``"(0, 1]"``; "" = any). ``kind`` gives the type where the default does not
  (a ``None`` default). A ``dict`` or ``list`` default is a free-form group: its entries are checked by
  :mod:`layerflow_jax.validate` (mixture entries, adapters, task weights)."""

  default: Any
  doc: str
  within: str = ""
  kind: type | None = None

  @property
  def type(self) -> type:
    return self.kind or type(self.default)

  @property
  def free_form(self) -> bool:
    return isinstance(self.default, (dict, list))

  def bounds(self) -> tuple[float, float, bool, bool] | None:
    """(low, high, low inclusive, high inclusive) of :attr:`within`, or None."""
    if not self.within:
      return None
    lo, hi = (x.strip() for x in self.within[1:-1].split(","))
    return float(lo), float(hi), self.within[0] == "[", self.within[-1] == "]"


def fill(config: mlc.ConfigDict, schema: Mapping[str, Setting]) -> mlc.ConfigDict:
  """Adds every key of ``schema`` that ``config`` lacks, at its default (dotted keys become nested groups)."""
  for key, setting in schema.items():
    *groups, leaf = key.split(".")
    node = config
    for g in groups:
      if g not in node:
        node[g] = mlc.ConfigDict()
      node = node[g]
    if not isinstance(node, mlc.ConfigDict) or leaf in node:
      continue
    v = setting.default
    node[leaf] = mlc.ConfigDict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
  return config


def build(schema: Mapping[str, Setting]) -> mlc.ConfigDict:
  """A ConfigDict of every declared key at its default."""
  return fill(mlc.ConfigDict(), schema)


def pack_arg(args: Mapping[str, Any], keys: Iterable[str]) -> str:
  """The ``"a=1,b=x"`` argument of another config file: ``args``' values of ``keys`` (big_vision's pack_arg), so a
  variant forwards the whole argument set of the config it builds on."""
  return ",".join(f"{k}={args[k]}" for k in keys)


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict over typed defaults (unknown keys refused)."""
  out = mlc.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; expected one of {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.strip().lower() in ("", "1", "true", "yes", "on")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value.strip()
  return out
