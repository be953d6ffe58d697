"""Which parameters train: whole leaves, or selected rows (blocks) of stacked leaves.

Parameters are handled as a flat ``{"path.to.leaf": array}`` dict. A *selection* maps each trainable path to
``None`` (the whole leaf) or a tuple of row indices on the stacked ``layers`` axis. ``split`` extracts the trainable
part (so the optimizer holds state for exactly those values) and ``combine`` writes it back into the full set.

Modes (``config.train.trainable``):
  * ``all`` — every parameter (adapters included).
  * ``official_base`` — LayerFlow's base stage: every 6th block (5, 11, … with their adaLN, q/k norms,
    attention and feed-forward) plus the layer embedder.
  * ``adapters`` — only the adapters named in ``config.train.trainable_adapters`` (default: all adapters).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax.nnx import traversals

from layerflow_jax.model import lora as lora_lib

SEP = "."
Selection = dict  # path → None | tuple[int, ...]


def flatten(tree: Mapping) -> dict:
  return traversals.flatten_mapping(tree, sep=SEP)


def unflatten(flat: Mapping) -> dict:
  return traversals.unflatten_mapping(dict(flat), sep=SEP)


def select(
  flat_params: Mapping[str, jax.Array],
  mode: str,
  *,
  num_layers: int,
  adapters: Sequence[str] | None = None,
  every: int = 6,
) -> Selection:
  paths = list(flat_params)
  if mode == "all":
    return {p: None for p in paths}
  if mode == "official_base":
    rows = tuple(lora_lib.parse_blocks(f"every:{every}", num_layers))
    sel: Selection = {}
    for p in paths:
      if p.startswith("blocks" + SEP):
        sel[p] = rows
      elif p.startswith(("layer_embed", "clip_embed", "given_embed")):
        sel[p] = None
    return sel
  if mode == "adapters":
    present = sorted({p.split(SEP)[1] for p in paths if p.startswith("adapters" + SEP)})
    wanted = list(adapters) if adapters else present
    missing = [a for a in wanted if a not in present]
    if missing:
      raise ValueError(f"train.trainable_adapters: {missing} not in the model's adapters {present}")
    if not wanted:
      raise ValueError("train.trainable='adapters' but the model has no adapters (model.adapters is empty)")
    return {p: None for p in paths if p.startswith("adapters" + SEP) and p.split(SEP)[1] in wanted}
  raise ValueError(f"train.trainable: {mode!r} unknown; expected 'all', 'official_base' or 'adapters'")


def split(flat_params: Mapping[str, jax.Array], selection: Selection) -> dict:
  """The trainable values: whole leaves, or the selected rows of stacked leaves."""
  out = {}
  for p, rows in selection.items():
    leaf = flat_params[p]
    out[p] = leaf if rows is None else leaf[np.asarray(rows)]
  return out


def combine(
  flat_params: Mapping[str, jax.Array], trainable: Mapping[str, jax.Array], selection: Selection
) -> dict:
  """Full parameters with the trainable values written in."""
  out = dict(flat_params)
  for p, rows in selection.items():
    out[p] = (
      trainable[p] if rows is None else out[p].at[np.asarray(rows)].set(trainable[p].astype(out[p].dtype))
    )
  return out


def count(trainable: Mapping[str, jax.Array]) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)))


def describe(selection: Selection) -> str:
  whole = sum(1 for r in selection.values() if r is None)
  rows = sorted({r for r in selection.values() if r is not None})
  text = f"{len(selection)} leaves ({whole} whole"
  if rows:
    text += f", {len(selection) - whole} by blocks {list(rows[0])}"
  return text + ")"
