"""Named LoRA adapters for the stacked DiT blocks.

An adapter (``motion``, ``content`` …) has a rank, an alpha, target projections (``q``, ``k``, ``v``, ``out``
and optionally ``ff_in``, ``ff_out``) and a block selection. Its weights are stacked over the *selected* blocks
only (``[n_selected, in, rank]`` and ``[n_selected, rank, out]``), so a rank-256 adapter on every 6th block of the
2B model holds exactly those parameters and nothing for the others. A is Kaiming-uniform (PEFT's
``kaiming_uniform_(a=√5)`` bound ``1/√in``), B is zero; the update is ``scale · (alpha / rank) · x A B`` with a
per-sample ``scale`` [B] given with the batch (the official motion-LoRA switch).

The forward pass runs the block stack in *segments*: maximal runs of consecutive blocks with the same set of
adapters, each segment one ``lax.scan`` over its slice of the stacked parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerflow_jax import sharding as shd

TARGETS = ("q", "k", "v", "out", "ff_in", "ff_out")


class LoraParam(nnx.Param):
  """A LoRA weight (a distinct type so filters can tell adapters from the base model)."""


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  name: str
  rank: int
  alpha: float
  targets: tuple[str, ...]
  blocks: tuple[int, ...]
  # False: the adapter is always on at its alpha / rank (the official content LoRA); a per-sample scale is refused.
  switch: bool = True

  @property
  def multiplier(self) -> float:
    return self.alpha / self.rank


def parse_blocks(spec: Any, num_layers: int, where: str = "blocks") -> tuple[int, ...]:
  """``"all"``, ``"every:K"`` (blocks K−1, 2K−1, …, the official every-6th = 5, 11, …), ``"every:K:OFFSET"``,
  or a list of block indices."""
  if isinstance(spec, str):
    if spec == "all":
      return tuple(range(num_layers))
    parts = spec.split(":")
    if parts[0] == "every" and len(parts) in (2, 3):
      k = int(parts[1])
      off = int(parts[2]) if len(parts) == 3 else k - 1
      if k <= 0 or not 0 <= off < k:
        raise ValueError(f"{where}: {spec!r} needs K > 0 and 0 <= OFFSET < K")
      return tuple(i for i in range(num_layers) if i % k == off)
    raise ValueError(
      f"{where}: {spec!r} unknown; expected 'all', 'every:K', 'every:K:OFFSET' or a list of ints"
    )
  blocks = tuple(sorted(int(i) for i in spec))
  bad = [i for i in blocks if not 0 <= i < num_layers]
  if bad or len(set(blocks)) != len(blocks):
    raise ValueError(f"{where}: {list(spec)} must be distinct block indices in [0, {num_layers})")
  return blocks


def specs_from_config(adapters_cfg: Mapping[str, Any], num_layers: int) -> tuple[AdapterSpec, ...]:
  specs = []
  for name in sorted(adapters_cfg.keys()):
    a = adapters_cfg[name]
    where = f"model.adapters.{name}"
    targets = a["targets"]
    targets = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
      raise ValueError(f"{where}.targets: {bad or targets} not LoRA targets; expected some of {TARGETS}")
    rank = int(a["rank"])
    if rank <= 0:
      raise ValueError(f"{where}.rank: {rank} must be positive")
    blocks = parse_blocks(a["blocks"], num_layers, f"{where}.blocks")
    if not blocks:
      raise ValueError(f"{where}.blocks: {a['blocks']!r} selects no block of {num_layers}")
    specs.append(
      AdapterSpec(
        name, rank, float(a.get("alpha", rank)), targets, blocks, switch=bool(a.get("switch", True))
      )
    )
  return tuple(specs)


def _dims(target: str, hidden: int, mlp: int) -> tuple[int, int]:
  return {"ff_in": (hidden, mlp), "ff_out": (mlp, hidden)}.get(target, (hidden, hidden))


def _kaiming_uniform(key, shape, dtype):
  bound = 1.0 / np.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Adapter(nnx.Module):
  """The weights of one adapter: ``{target}_a`` [n, in, r] and ``{target}_b`` [n, r, out]."""

  def __init__(self, spec: AdapterSpec, hidden: int, mlp: int, param_dtype, rngs: nnx.Rngs):
    n, r = len(spec.blocks), spec.rank
    for t in spec.targets:
      din, dout = _dims(t, hidden, mlp)
      in_name = "mlp" if t == "ff_out" else "embed"
      out_name = "mlp" if t == "ff_in" else ("embed" if t == "ff_out" else "heads")
      a = shd.param(_kaiming_uniform, ("layers", in_name, "lora_rank"))(
        rngs.params(), (n, din, r), param_dtype
      )
      b = shd.param(nnx.initializers.zeros_init(), ("layers", "lora_rank", out_name))(
        rngs.params(), (n, r, dout), param_dtype
      )
      setattr(self, f"{t}_a", LoraParam(a))
      setattr(self, f"{t}_b", LoraParam(b))


class BlockLora(NamedTuple):
  """LoRA inputs of one block: ``weights[adapter][target] = (A [in, r], B [r, out])`` and ``scales[adapter]`` [B]."""

  weights: Mapping[str, Mapping[str, tuple[jax.Array, jax.Array]]]
  scales: Mapping[str, jax.Array]


def project(linear: nnx.Linear, x, lora: BlockLora | None, target: str, base=None):
  """``linear(x)`` (or ``base``, the linear's output computed elsewhere, e.g. in FP8) plus every adapter's low-rank
  update on this target."""
  y = linear(x) if base is None else base
  if lora is None:
    return y
  for name, per_target in lora.weights.items():
    if target in per_target:
      a, b = per_target[target]
      s = lora.scales[name].astype(y.dtype)[:, None, None]
      y = y + s * ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))
  return y


def resolve_scales(specs: Sequence[AdapterSpec], given: Mapping[str, Any] | None, batch: int) -> dict:
  """Per-sample multipliers [B] = scale · alpha / rank (scale defaults to 1; unknown adapter names refused)."""
  given = dict(given or {})
  names = {s.name for s in specs}
  unknown = sorted(set(given) - names)
  if unknown:
    raise ValueError(f"adapter scale given for {unknown}, but the model's adapters are {sorted(names)}")
  fixed = sorted(s.name for s in specs if not s.switch and s.name in given)
  if fixed:
    raise ValueError(
      f"adapter scale given for {fixed}, which are not switchable (adapters.<name>.switch False)"
    )
  out = {}
  for s in specs:
    scale = jnp.broadcast_to(jnp.asarray(given.get(s.name, 1.0), jnp.float32), (batch,))
    out[s.name] = scale * s.multiplier
  return out


@dataclasses.dataclass(frozen=True)
class Segment:
  start: int
  stop: int
  slots: tuple[tuple[str, int], ...]  # (adapter name, index of `start` within the adapter's stack)


def segments(specs: Sequence[AdapterSpec], num_layers: int) -> list[Segment]:
  """Maximal runs of consecutive blocks with the same adapters."""
  members = [tuple(s.name for s in specs if i in s.blocks) for i in range(num_layers)]
  out: list[Segment] = []
  start = 0
  for i in range(1, num_layers + 1):
    if i == num_layers or members[i] != members[start]:
      slots = tuple(
        (name, next(s for s in specs if s.name == name).blocks.index(start)) for name in members[start]
      )
      out.append(Segment(start, i, slots))
      start = i
  return out


def segment_lora(seg: Segment, adapters: Mapping[str, Adapter], specs: Sequence[AdapterSpec]) -> dict:
  """Slices of each present adapter's stacks for a segment: ``{adapter: {target: (A[n], B[n])}}``."""
  n = seg.stop - seg.start
  out = {}
  for name, slot in seg.slots:
    spec = next(s for s in specs if s.name == name)
    ad = adapters[name]
    out[name] = {
      t: (getattr(ad, f"{t}_a")[...][slot : slot + n], getattr(ad, f"{t}_b")[...][slot : slot + n])
      for t in spec.targets
    }
  return out


# ----------------------------------------------------------------------------- merge / remove


_TARGET_LINEAR = {
  "q": ("attn1", "to_q"),
  "k": ("attn1", "to_k"),
  "v": ("attn1", "to_v"),
  "out": ("attn1", "to_out"),
  "ff_in": ("ff", "proj_in"),
  "ff_out": ("ff", "proj_out"),
}


def _spec(model, name: str) -> AdapterSpec:
  for s in model.cfg.adapters:
    if s.name == name:
      return s
  raise ValueError(f"model has no adapter {name!r}; adapters: {[s.name for s in model.cfg.adapters]}")


def _kernel(model, target: str) -> nnx.Param:
  mod, lin = _TARGET_LINEAR[target]
  return getattr(getattr(model.blocks, mod), lin).kernel


def remove(model, name: str) -> Adapter:
  """Detaches an adapter (the model then behaves as with the adapter's scale 0); returns its weights."""
  spec = _spec(model, name)
  adapter = model.adapters[name]
  del model.adapters[name]
  model.cfg = dataclasses.replace(model.cfg, adapters=tuple(s for s in model.cfg.adapters if s is not spec))
  return adapter


class Merged(NamedTuple):
  spec: AdapterSpec
  adapter: Adapter
  originals: dict  # target → the base kernels before merging (restored bitwise by unmerge)


def merge(model, name: str, scale: float = 1.0) -> Merged:
  """Folds ``scale · alpha/rank · A B`` into the base kernels of the selected blocks and detaches the adapter."""
  spec = _spec(model, name)
  adapter = model.adapters[name]
  idx = jnp.asarray(spec.blocks)
  originals = {}
  for t in spec.targets:
    kernel = _kernel(model, t)
    originals[t] = kernel[...]
    delta = jnp.einsum("nir,nro->nio", getattr(adapter, f"{t}_a")[...], getattr(adapter, f"{t}_b")[...])
    kernel[...] = kernel[...].at[idx].add((scale * spec.multiplier * delta).astype(kernel.dtype))
  remove(model, name)
  return Merged(spec, adapter, originals)


def unmerge(model, merged: Merged) -> None:
  """Exactly undoes :func:`merge`: restores the base kernels and re-attaches the adapter."""
  for t, kernel in merged.originals.items():
    _kernel(model, t)[...] = kernel
  model.adapters[merged.spec.name] = merged.adapter
  model.cfg = dataclasses.replace(model.cfg, adapters=tuple(model.cfg.adapters) + (merged.spec,))
