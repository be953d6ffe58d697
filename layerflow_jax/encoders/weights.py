"""PyTorch checkpoints (safetensors) → NNX modules whose attribute names mirror the PyTorch module names.

Because our modules use the PyTorch names (``down_blocks.0.resnets.1.conv1.conv``), a state-dict key maps to an
NNX path by splitting on dots; only the leaf is renamed and re-laid out:

* ``nn.Linear`` weight ``[out, in]`` → ``nnx.Linear`` kernel ``[in, out]``;
* ``nn.ConvNd`` weight ``[O, I, *k]`` → ``nnx.Conv`` kernel ``[*k, I, O]`` (channels-last inputs);
* norm weight → ``scale``; ``nn.Embedding`` weight → ``embedding``; biases unchanged.

Nothing here imports torch: state dicts are ``dict[str, np.ndarray]`` (torch tensors are accepted and converted,
bfloat16 through a bit view).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping, TypeVar

import jax
import jax.numpy as jnp
import ml_dtypes  # also registers bfloat16 for safetensors.numpy
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
M = TypeVar("M", bound=nnx.Module)


def to_numpy(x: Any) -> np.ndarray:
  """np.ndarray from a NumPy / JAX array or a torch tensor (bfloat16 kept as ``ml_dtypes.bfloat16``)."""
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
    t = x.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      import torch  # optional (the torch extra): only here when a torch tensor came in

      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(x)


def safetensors_files(path: str | pathlib.Path) -> list[pathlib.Path]:
  """The ``.safetensors`` files of a checkpoint: a file, a sharded directory (``*.index.json``), a directory."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
  index = sorted(path.glob("*.safetensors.index.json"))
  if index:
    shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
    files = [path / s for s in shards]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
      raise FileNotFoundError(f"{index[0]} names shards that are missing: {absent}")
    return files
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors file in {str(path)!r}")
  return files


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint as NumPy arrays (bfloat16 via ml_dtypes)."""
  out: dict[str, np.ndarray] = {}
  for f in safetensors_files(path):
    out.update(load_file(str(f)))
  return out


def read_config(path: str | pathlib.Path, name: str = "config.json") -> dict:
  """The ``config.json`` of a transformers / diffusers checkpoint directory (or of a file's directory)."""
  path = pathlib.Path(path)
  cfg = (path if path.is_dir() else path.parent) / name
  if not cfg.is_file():
    raise FileNotFoundError(f"{str(cfg)!r} not found: a checkpoint directory needs its {name}")
  return json.loads(cfg.read_text())


def _key_path(key: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _convert(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim > 2:
    return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))
  return array


def torch_to_nnx(
  state_dict: Mapping[str, Any], abstract: Mapping, *, what: str, aliases: Mapping[str, str] | None = None
) -> dict:
  """A nested pure dict (NumPy leaves, our layouts) for ``abstract`` (an NNX pure dict of shapes).

  ``aliases`` maps alternative keys (e.g. a tied embedding's second name) to the key they stand for; an alias is
  used only when its target is absent. Missing, unexpected and mis-shaped tensors are all reported at once.
  """
  aliases = dict(aliases or {})
  sd = {k: v for k, v in state_dict.items() if k not in aliases}
  for alias, target in aliases.items():
    if alias in state_dict and target not in sd:
      sd[target] = state_dict[alias]
  flat_abstract: dict[tuple, Any] = traverse_util.flatten_dict(dict(abstract))  # leaves: abstract arrays
  filled: dict[tuple, np.ndarray] = {}
  unexpected, mismatched = [], []
  for key, value in sd.items():
    path = _key_path(key)
    prefix, leaf = path[:-1], path[-1]
    if leaf == "weight":
      leaf = next((n for n in _WEIGHT_LEAVES if prefix + (n,) in flat_abstract), None)
    if leaf is None or (ours := prefix + (leaf,)) not in flat_abstract:
      unexpected.append(key)
      continue
    arr = _convert(leaf, to_numpy(value))
    want = tuple(flat_abstract[ours].shape)
    if tuple(arr.shape) != want:
      mismatched.append(f"{key}: {tuple(arr.shape)} (after layout conversion) vs ours {want}")
      continue
    filled[ours] = arr
  missing = [".".join(map(str, p)) for p in flat_abstract if p not in filled]
  problems = []
  for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
    if items:
      problems.append(f"{label} ({len(items)}): {items[:8]}{' …' if len(items) > 8 else ''}")
  if problems:
    raise ValueError(
      f"{what}: the checkpoint does not fit the model's configuration — " + "; ".join(problems)
    )
  return traverse_util.unflatten_dict(filled)


def build_module(
  make: Callable[[], M], state_dict: Mapping[str, Any], *, what: str, aliases: Mapping[str, str] | None = None
) -> M:
  """``make()``'s module with its parameters taken from ``state_dict`` (no random initialisation is run).

  Each array is cast to the parameter dtype the module declares (``param_dtype``).
  """
  graphdef, state = nnx.split(nnx.eval_shape(make))
  abstract = nnx.to_pure_dict(state)
  filled = torch_to_nnx(state_dict, abstract, what=what, aliases=aliases)
  flat_abstract: dict[tuple, Any] = traverse_util.flatten_dict(abstract)  # leaves: abstract arrays
  flat = traverse_util.flatten_dict(filled)
  with jax.ensure_compile_time_eval():  # concrete arrays even when first used inside a jit trace
    values = {p: jnp.asarray(flat[p], dtype=flat_abstract[p].dtype) for p in flat}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
  return nnx.merge(graphdef, state)


def _active_mesh():
  """The concrete mesh of ``jax.set_mesh``, also while tracing (where the public getter refuses), or None."""
  try:
    return jax.sharding.get_mesh()
  except ValueError:  # inside a trace: the encoders load on their first (usually jitted) use
    try:
      from jax._src import mesh as mesh_lib  # private: guarded here, as a jax release may move it

      return mesh_lib.get_concrete_mesh()
    except (ImportError, AttributeError):
      return None


_FROZEN: dict = {}  # (key, mesh) → loaded module: encoders built from one config share one copy of the weights


def load_frozen(load: Callable[[], M], key: Any = None) -> M:
  """``load()``'s module, built eagerly even inside a jit trace and replicated over the active mesh.

  Frozen encoders load on first use, which is usually inside the jitted train step or sampler: their arrays are
  made under ``ensure_compile_time_eval`` (see :func:`build_module`), so they are concrete (cacheable, never
  tracers); placing them on the mesh once keeps every step from copying them to each device again. With a
  ``key`` (e.g. the checkpoint path and dtype) the result is cached per mesh, so the trainer's and the sampler's
  encoders share one copy.
  """
  mesh = _active_mesh()
  mesh = mesh if mesh is not None and not mesh.empty and mesh.size > 1 else None
  if key is not None and (key, mesh) in _FROZEN:
    return _FROZEN[(key, mesh)]
  module = load()
  if mesh is not None:
    graphdef, state = nnx.split(module)
    with jax.ensure_compile_time_eval():
      state = jax.device_put(state, NamedSharding(mesh, P()))
    module = nnx.merge(graphdef, state)
  if key is not None:
    _FROZEN[(key, mesh)] = module
  return module


def hoist_closed_over_weights() -> None:
  """Make jit pass closed-over arrays as arguments instead of embedding them in the program.

  The train step and the sampler close over the frozen encoders' weights (``encode`` is a method, not a jit
  argument). Embedded as HLO constants, T5-XXL's ~9.5 GB would exceed the 2 GB protobuf limit and the VAE's
  weights would be re-embedded in every compiled program; JAX's simplified-constants mode hoists them into
  arguments instead (same numerics). Turned on only when a pretrained encoder is configured.
  """
  jax.config.update("jax_use_simplified_jaxpr_constants", True)
