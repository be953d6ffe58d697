"""Logical axes → mesh axes: the one rules table, the mesh from config, and activation constraints.

Model code names logical axes only (``batch``, ``video_tokens``, ``embed``, ``heads``, ``mlp``, ``layers`` …).
This module is the only place that knows mesh axes (``data``, ``fsdp``, ``tensor``, ``sequence``).

Parameters and activations use separate names so they can be mapped differently (as in levanter): parameter
``embed`` is sharded over ``fsdp`` and ``sequence`` (ZeRO-3 style: devices that split a clip's tokens would otherwise
hold whole copies of the weights), while activation ``act_embed`` stays replicated.

Multi-slice TPU (or multi-host GPU with a slow network between hosts): ``config.mesh.dcn`` gives how many of each
axis's devices lie across the data-centre network; ``make_mesh`` then builds the device array with
``mesh_utils.create_hybrid_device_mesh`` so that only those factors cross slices (put ``data`` there).

The mesh uses ``AxisType.Auto`` on purpose: the model states its intent with sharding constraints and GSPMD
propagates the rest; ``jax.make_mesh``'s Explicit default (jax ≥ 0.9) would make every op's sharding part of
its type, which the scanned NNX model does not need.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# The one rules table. A logical axis maps to a mesh axis, a tuple of mesh axes, or None (replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # activations
  ("batch", ("data", "fsdp")),
  ("video_tokens", "sequence"),
  ("text_tokens", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_kv", None),
  # parameters
  ("layers", None),
  ("embed", ("fsdp", "sequence")),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("time_embed", None),
  ("text_embed", None),
  ("patch", None),
  ("channels", None),
  ("modulation", ("tensor", "fsdp", "sequence")),  # adaLN kernels [time_embed, 6·hidden]: 20% of 2B
  ("norm", None),
  ("lora_rank", None),
  ("clips", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves a ``{data, fsdp, tensor, sequence}`` config (one entry may be -1) against the device count."""
  unknown = [k for k in mesh_cfg.keys() if k not in MESH_AXES + ("dcn",)]
  if unknown:
    raise ValueError(f"mesh: unknown axis {unknown[0]!r}; expected axes {MESH_AXES} (and 'dcn')")
  shape = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  wild = [a for a, n in shape.items() if n == -1]
  if len(wild) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {wild}")
  for a, n in shape.items():
    if n == 0 or n < -1:
      raise ValueError(f"mesh.{a}: size {n} is invalid; expected a positive size or -1")
  fixed = math.prod(n for n in shape.values() if n != -1)
  if wild:
    if num_devices % fixed:
      raise ValueError(
        f"mesh: fixed axes use {fixed} devices, which does not divide the {num_devices} available"
      )
    shape[wild[0]] = num_devices // fixed
  total = math.prod(shape.values())
  if total != num_devices:
    raise ValueError(f"mesh: {shape} uses {total} devices but {num_devices} are available")
  return shape


def dcn_shape(mesh_cfg, shape: dict[str, int]) -> dict[str, int]:
  """Per-axis factors across the data-centre network (``mesh.dcn``; all 1 = a single slice / ICI-only mesh)."""
  dcn_cfg = mesh_cfg.get("dcn", None) or {}
  unknown = [k for k in dcn_cfg.keys() if k not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh.dcn: unknown axis {unknown[0]!r}; expected axes {MESH_AXES}")
  dcn = {a: int(dcn_cfg.get(a, 1)) for a in MESH_AXES}
  for a, n in dcn.items():
    if n < 1 or shape[a] % n:
      raise ValueError(f"mesh.dcn.{a}: {n} does not divide mesh.{a}={shape[a]}; expected a positive divisor")
  return dcn


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """The ``(data, fsdp, tensor, sequence)`` mesh over ``devices`` (default: all, across processes).

  With ``mesh.dcn`` factors > 1 the device order comes from ``create_hybrid_device_mesh``: each axis is split into
  an outer DCN part (across slices, or processes where devices carry no slice index) and an inner ICI part.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  dcn = dcn_shape(mesh_cfg, shape)
  if math.prod(dcn.values()) == 1:
    return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types, devices=devices)
  ici = tuple(shape[a] // dcn[a] for a in MESH_AXES)
  # Granules are TPU slices when there are several, else processes (GPU/CPU hosts report one slice or none).
  by_process = len({getattr(d, "slice_index", None) for d in devices}) == 1
  try:
    grid = mesh_utils.create_hybrid_device_mesh(
      ici, tuple(dcn[a] for a in MESH_AXES), devices, process_is_granule=by_process
    )
  except (ValueError, AssertionError) as e:
    granules = "processes" if by_process else "slices"
    raise ValueError(
      f"mesh.dcn {dcn}: cannot lay out {len(devices)} devices as ICI {dict(zip(MESH_AXES, ici))} "
      f"within each of the {granules} × DCN {dcn} ({e})"
    ) from None
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def axis_size(mesh, name: str) -> int:
  """Size of mesh axis ``name`` (1 when absent or outside any mesh)."""
  if mesh is None or mesh.empty:
    return 1
  return int(dict(mesh.shape).get(name, 1))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
  """Activates the mesh and the logical rules (for parameter specs and activation constraints)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield mesh


def logical_to_spec(names: Sequence[str | None], rules=None) -> P:
  rules = rules if rules is not None else (core_spmd.get_logical_axis_rules() or LOGICAL_AXIS_RULES)
  return P(*core_spmd.from_sharding_rules(tuple(names), rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op outside a mesh (single-device code paths)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of rank {x.ndim}")
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def param(init, names: Sequence[str | None]):
  """An initializer carrying logical axis names as NNX sharding metadata."""
  return nnx.with_partitioning(init, tuple(names))


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for an NNX state (by its variables' logical names) under the active rules."""
  return nnx.get_named_sharding(abstract_state, mesh)


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-leading inputs: batch over (data, fsdp), everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), LOGICAL_AXIS_RULES))


def sharding_table(shapes: dict[str, Sequence[int]], specs: dict[str, P], mesh: Mesh) -> dict[str, dict]:
  """``path → {shape, spec, shard_shape}`` of parameters on ``mesh`` (for golden files and ``layerflow compile``).

  ``spec`` lists each dimension's mesh axes after dropping axes of size 1 on this mesh (what actually splits);
  ``shard_shape`` is the per-device block.
  """
  out = {}
  for path in sorted(shapes):
    shape = tuple(int(n) for n in shapes[path])
    spec = specs[path]
    effective = []
    for axes in tuple(spec) + (None,) * (len(shape) - len(spec)):
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      kept = [a for a in axes if axis_size(mesh, a) > 1]
      effective.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    shard = NamedSharding(mesh, spec).shard_shape(shape)
    out[path] = {"shape": list(shape), "spec": effective, "shard_shape": [int(n) for n in shard]}
  return out


def multislice_config(config, devices_per_slice: int, num_slices: int):
  """A copy of ``config`` whose mesh spans ``num_slices`` slices: ``config.mesh`` is resolved for one slice (its
  ICI part) and ``data`` is multiplied by ``num_slices`` across the data-centre network (``mesh.dcn.data``), so
  fsdp/tensor/sequence collectives stay inside a slice and only the gradient all-reduce crosses DCN."""
  dcn = dict(config.mesh.dcn)
  if any(int(n) != 1 for n in dcn.values()):
    raise ValueError(f"mesh.dcn {dcn}: already set; give either mesh.dcn or several slices, not both")
  ici = mesh_shape({a: config.mesh[a] for a in MESH_AXES if a in config.mesh}, devices_per_slice)
  out = config.copy_and_resolve_references()
  out.mesh.update({a: n * (num_slices if a == "data" else 1) for a, n in ici.items()})
  out.mesh.dcn = type(config.mesh)({a: num_slices if a == "data" else 1 for a in MESH_AXES})
  return out
