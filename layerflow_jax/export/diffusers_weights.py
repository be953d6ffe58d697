"""Weight conversion between our NNX DiT and diffusers' ``CogVideoXTransformer3DModel`` (pure NumPy).

Layouts:

* ``nnx.Linear`` kernel ``[in, out]`` ↔ ``nn.Linear`` weight ``[out, in]`` (bias unchanged);
* ``nnx.Conv`` kernel ``(kh, kw, I, O)`` (NHWC inputs) ↔ ``nn.Conv2d`` weight ``[O, I, kh, kw]``;
* ``nnx.LayerNorm`` ``scale`` ↔ ``weight`` (bias unchanged);
* our blocks are stacked on a leading ``layers`` axis ↔ ``transformer_blocks.N.*``.

The sin-cos table is a non-persistent buffer in diffusers (not in the state dict) and a constant here, so
it is not converted. LayerFlow's extras (the layer embedding, the per-clip embedding, LoRA adapters) have no
place in diffusers' model; :func:`extras_state_dict` returns them under stable names, and
:func:`from_extras_state_dict` loads them back.

Nothing here imports torch at module level: state dicts are ``dict[str, np.ndarray]``; torch tensors are
accepted on input (converted with ``.numpy()``, bfloat16 through a bit view).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

TEMPORAL_COMPRESSION = 4

# (diffusers prefix, our path, kind) — kind: "linear" | "conv" | "norm".
_TOP: tuple[tuple[str, tuple[str, ...], str], ...] = (
  ("patch_embed.proj", ("patch_proj",), "conv"),
  ("patch_embed.text_proj", ("text_proj",), "linear"),
  ("time_embedding.linear_1", ("time_linear_1",), "linear"),
  ("time_embedding.linear_2", ("time_linear_2",), "linear"),
  ("norm_final", ("norm_final", "norm"), "norm"),
  ("norm_out.linear", ("norm_out_linear",), "linear"),
  ("norm_out.norm", ("norm_out", "norm"), "norm"),
  ("proj_out", ("proj_out",), "linear"),
)

# Inside ``transformer_blocks.N`` / ``blocks`` (our paths without the leading "blocks").
_BLOCK: tuple[tuple[str, tuple[str, ...], str], ...] = (
  ("norm1.linear", ("norm1", "linear"), "linear"),
  ("norm1.norm", ("norm1", "norm", "norm"), "norm"),
  ("attn1.norm_q", ("attn1", "norm_q", "norm"), "norm"),
  ("attn1.norm_k", ("attn1", "norm_k", "norm"), "norm"),
  ("attn1.to_q", ("attn1", "to_q"), "linear"),
  ("attn1.to_k", ("attn1", "to_k"), "linear"),
  ("attn1.to_v", ("attn1", "to_v"), "linear"),
  ("attn1.to_out.0", ("attn1", "to_out"), "linear"),
  ("norm2.linear", ("norm2", "linear"), "linear"),
  ("norm2.norm", ("norm2", "norm", "norm"), "norm"),
  ("ff.net.0.proj", ("ff", "proj_in"), "linear"),
  ("ff.net.2", ("ff", "proj_out"), "linear"),
)

# (diffusers suffix, our leaf, to-diffusers transform, from-diffusers transform).
_LEAVES = {
  "linear": (
    ("weight", "kernel", lambda a: np.swapaxes(a, -1, -2), lambda a: np.swapaxes(a, -1, -2)),
    ("bias", "bias", None, None),
  ),
  "conv": (
    (
      "weight",
      "kernel",
      lambda a: np.transpose(a, (3, 2, 0, 1)),  # (kh, kw, I, O) → (O, I, kh, kw)
      lambda a: np.transpose(a, (2, 3, 1, 0)),
    ),  # (O, I, kh, kw) → (kh, kw, I, O)
    ("bias", "bias", None, None),
  ),
  "norm": (("weight", "scale", None, None), ("bias", "bias", None, None)),
}

# LoRA targets of our adapters ↔ diffusers module names inside a block.
_LORA_MODULES = {
  "q": "attn1.to_q",
  "k": "attn1.to_k",
  "v": "attn1.to_v",
  "out": "attn1.to_out.0",
  "ff_in": "ff.net.0.proj",
  "ff_out": "ff.net.2",
}

_EXTRAS = (
  ("layer_embed.linear", ("layer_embed_linear",), "linear"),
  ("layer_embed.norm", ("layer_embed_norm", "norm"), "norm"),
)


# ----------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
  """np.ndarray from a NumPy / JAX array or a torch tensor (bfloat16 kept as ml_dtypes.bfloat16)."""
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
    t = x.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      import torch  # optional (the torch extra): only here when a torch tensor came in

      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  if isinstance(x, nnx.Variable):
    x = x[...]
  return np.asarray(x)


def _flat_params(model_or_state) -> dict[tuple[str, ...], np.ndarray]:
  """Our parameters as ``{path tuple: np.ndarray}`` (model, nnx.State, or a nested dict of arrays)."""
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  else:
    state = model_or_state
  if isinstance(state, nnx.State):
    return {tuple(str(k) for k in path): _to_numpy(v) for path, v in nnx.to_flat_state(state)}
  out: dict[tuple[str, ...], np.ndarray] = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    else:
      out[prefix] = _to_numpy(node)

  walk(state, ())
  return out


def _model_cfg(model_or_state, cfg):
  if cfg is None:
    cfg = getattr(model_or_state, "cfg", None)
  if cfg is None:
    raise ValueError("a DiTConfig is needed (pass cfg=... when converting a bare state)")
  return cfg


def _entries(num_layers: int):
  """Yields (diffusers key, our path, layer index or None, kind, leaf index) for the base model."""
  for prefix, path, kind in _TOP:
    for i, (suffix, leaf, _, _) in enumerate(_LEAVES[kind]):
      yield f"{prefix}.{suffix}", path + (leaf,), None, kind, i
  for n in range(num_layers):
    for prefix, path, kind in _BLOCK:
      for i, (suffix, leaf, _, _) in enumerate(_LEAVES[kind]):
        yield f"transformer_blocks.{n}.{prefix}.{suffix}", ("blocks",) + path + (leaf,), n, kind, i


def _np_dtype(dtype) -> np.dtype:
  if str(dtype) in ("bfloat16", "torch.bfloat16"):
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(str(dtype).replace("torch.", ""))


def _export(arr: np.ndarray, kind: str, i: int) -> np.ndarray:
  fn = _LEAVES[kind][i][2]
  # An owned, writable copy (torch.from_numpy warns on read-only arrays).
  return np.array(fn(arr) if fn is not None else arr, order="C", copy=True)


def _import(arr: np.ndarray, kind: str, i: int) -> np.ndarray:
  fn = _LEAVES[kind][i][3]
  return np.ascontiguousarray(fn(arr) if fn is not None else arr)


# ----------------------------------------------------------------------------- base model


def to_diffusers_state_dict(model_or_state, cfg=None, *, dtype=None) -> dict[str, np.ndarray]:
  """Our base parameters → diffusers ``CogVideoXTransformer3DModel`` state dict (NumPy arrays).

  ``model_or_state``: a ``LayerFlowDiT``, its ``nnx.state(model, nnx.Param)``, or the nested dict of arrays
  (``nnx.to_pure_dict``); ``cfg`` defaults to ``model.cfg``. Arrays keep each parameter's dtype (our LayerNorm
  parameters are float32 even with ``param_dtype`` bfloat16) unless ``dtype`` (e.g. ``"bfloat16"``) is given.
  LayerFlow extras are skipped (see :func:`extras_state_dict`).
  """
  cfg = _model_cfg(model_or_state, cfg)
  flat = _flat_params(model_or_state)
  out: dict[str, np.ndarray] = {}
  missing = []
  for key, path, layer, kind, i in _entries(cfg.num_layers):
    if path not in flat:
      missing.append("/".join(path))
      continue
    arr = flat[path]
    if layer is not None:
      if arr.shape[0] != cfg.num_layers:
        raise ValueError(
          f"{'/'.join(path)}: leading (layers) axis is {arr.shape[0]}, cfg.num_layers is {cfg.num_layers}"
        )
      arr = arr[layer]
    out[key] = _export(arr, kind, i)
    if dtype is not None:
      out[key] = out[key].astype(_np_dtype(dtype))
  if missing:
    raise ValueError(f"the model lacks parameters of the CogVideoX base model: {sorted(set(missing))}")
  return out


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """The diffusers state-dict keys and shapes that a model of ``cfg`` converts to."""
  d, p, t = cfg.hidden, cfg.patch_size, cfg.time_embed_dim
  inner = cfg.mlp_ratio * d
  lin = lambda i, o: ((o, i), (o,))
  top = {
    "patch_embed.proj": ((d, cfg.in_channels, p, p), (d,)),
    "patch_embed.text_proj": lin(cfg.text_embed_dim, d),
    "time_embedding.linear_1": lin(d, t),
    "time_embedding.linear_2": lin(t, t),
    "norm_final": ((d,), (d,)),
    "norm_out.linear": lin(t, 2 * d),
    "norm_out.norm": ((d,), (d,)),
    "proj_out": lin(d, p * p * cfg.out_channels),
  }
  block = {
    "norm1.linear": lin(t, 6 * d),
    "norm1.norm": ((d,), (d,)),
    "attn1.norm_q": ((cfg.head_dim,), (cfg.head_dim,)),
    "attn1.norm_k": ((cfg.head_dim,), (cfg.head_dim,)),
    "attn1.to_q": lin(d, d),
    "attn1.to_k": lin(d, d),
    "attn1.to_v": lin(d, d),
    "attn1.to_out.0": lin(d, d),
    "norm2.linear": lin(t, 6 * d),
    "norm2.norm": ((d,), (d,)),
    "ff.net.0.proj": lin(d, inner),
    "ff.net.2": lin(inner, d),
  }
  out = {}
  for prefix, (w, b) in top.items():
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = w, b
  for n in range(cfg.num_layers):
    for prefix, (w, b) in block.items():
      out[f"transformer_blocks.{n}.{prefix}.weight"] = w
      out[f"transformer_blocks.{n}.{prefix}.bias"] = b
  return out


def _check_keys(given: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
  missing = sorted(k for k in expected if k not in given)
  unexpected = sorted(k for k in given if k not in expected)
  mismatched = sorted(
    f"{k}: got {tuple(given[k].shape)}, expected {tuple(expected[k])}"
    for k in expected
    if k in given and tuple(given[k].shape) != tuple(expected[k])
  )
  if missing or unexpected or mismatched:
    lines = [f"{what} does not fit the model:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {missing}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
    raise ValueError("\n".join(lines))


def _assign(model, updates: Mapping[tuple[str, ...], np.ndarray]) -> None:
  """Writes ``{our path: array}`` into the model's Params (dtype and sharding of the current values kept)."""
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  pure: dict = {}
  for path, arr in updates.items():
    var = flat[path]
    old = var[...]
    if tuple(arr.shape) != tuple(old.shape):
      raise ValueError(
        f"{'/'.join(path)}: converted shape {tuple(arr.shape)} != model shape {tuple(old.shape)}"
      )
    new = np.asarray(arr).astype(old.dtype)
    sharding = getattr(old, "sharding", None)
    new = jax.device_put(new, sharding) if sharding is not None else jnp.asarray(new)
    node = pure
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = new
  nnx.update(model, pure)


def from_diffusers_state_dict(model, state_dict: Mapping[str, Any]) -> None:
  """Loads a diffusers ``CogVideoXTransformer3DModel`` state dict into ``model`` in place.

  Every base parameter is overwritten (``transformer_blocks.N.*`` stacked into the ``layers`` axis); LayerFlow
  extras are left untouched. Values may be NumPy / JAX arrays or torch tensors; they are cast to the model's
  parameter dtype. Refuses (``ValueError`` listing them all) missing keys, unexpected keys and shape
  mismatches; nothing is written then.
  """
  cfg = model.cfg
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  _check_keys(sd, expected_shapes(cfg), "the diffusers state dict")
  per_layer: dict[tuple[str, ...], list] = {}
  updates: dict[tuple[str, ...], np.ndarray] = {}
  for key, path, layer, kind, i in _entries(cfg.num_layers):
    arr = _import(sd[key], kind, i)
    if layer is None:
      updates[path] = arr
    else:
      per_layer.setdefault(path, [None] * cfg.num_layers)[layer] = arr
  for path, arrs in per_layer.items():
    updates[path] = np.stack(arrs, axis=0)
  _assign(model, updates)


# ----------------------------------------------------------------------------- LayerFlow extras


def extras_state_dict(model) -> dict[str, np.ndarray]:
  """LayerFlow's parameters that diffusers' model has no place for, in PyTorch layouts and stable names.

  * ``layer_embed.linear.{weight [D, 1], bias [D]}``, ``layer_embed.norm.{weight, bias}`` (layer_embed text*);
  * ``clip_embed.weight`` ``[num_clips, D]`` (layer_embed ``text+video``);
  * ``pos_embedding.weight`` ``[text rows + video rows, D]`` (pos_embed ``learned``: the official SAT table);
  * per adapter and selected block:
    ``adapters.{name}.transformer_blocks.{N}.{module}.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
    ``[out, r]`` (PEFT layout; ``module`` as in diffusers, e.g. ``attn1.to_q``). The alpha / rank multiplier
    is not folded in (it lives in the adapter's config).
  """
  flat = _flat_params(model)
  out: dict[str, np.ndarray] = {}
  for prefix, path, kind in _EXTRAS:
    for i, (suffix, leaf, _, _) in enumerate(_LEAVES[kind]):
      if path + (leaf,) in flat:
        out[f"{prefix}.{suffix}"] = _export(flat[path + (leaf,)], kind, i)
  if ("clip_embed",) in flat:
    out["clip_embed.weight"] = np.array(flat[("clip_embed",)], order="C", copy=True)
  if ("pos_table",) in flat:
    out["pos_embedding.weight"] = np.array(flat[("pos_table",)], order="C", copy=True)
  for spec in getattr(model.cfg, "adapters", ()):
    for t in spec.targets:
      a = flat[("adapters", spec.name, f"{t}_a")]  # [n, in, r]
      b = flat[("adapters", spec.name, f"{t}_b")]  # [n, r, out]
      for j, blk in enumerate(spec.blocks):
        base = f"adapters.{spec.name}.transformer_blocks.{blk}.{_LORA_MODULES[t]}"
        out[f"{base}.lora_A.weight"] = np.array(a[j].T, order="C", copy=True)
        out[f"{base}.lora_B.weight"] = np.array(b[j].T, order="C", copy=True)
  return out


def from_extras_state_dict(model, state_dict: Mapping[str, Any]) -> None:
  """Inverse of :func:`extras_state_dict` (same refusals as :func:`from_diffusers_state_dict`)."""
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  mine = extras_state_dict(model)
  _check_keys(sd, {k: v.shape for k, v in mine.items()}, "the extras state dict")
  flat = _flat_params(model)
  updates: dict[tuple[str, ...], np.ndarray] = {}
  for prefix, path, kind in _EXTRAS:
    for i, (suffix, leaf, _, _) in enumerate(_LEAVES[kind]):
      if path + (leaf,) in flat:
        updates[path + (leaf,)] = _import(sd[f"{prefix}.{suffix}"], kind, i)
  if ("clip_embed",) in flat:
    updates[("clip_embed",)] = sd["clip_embed.weight"]
  if ("pos_table",) in flat:
    updates[("pos_table",)] = sd["pos_embedding.weight"]
  for spec in getattr(model.cfg, "adapters", ()):
    for t in spec.targets:
      base = lambda blk, spec=spec, t=t: f"adapters.{spec.name}.transformer_blocks.{blk}.{_LORA_MODULES[t]}"
      for ab, leaf in (("A", "a"), ("B", "b")):
        updates[("adapters", spec.name, f"{t}_{leaf}")] = np.stack(
          [sd[f"{base(blk)}.lora_{ab}.weight"].T for blk in spec.blocks]
        )
  _assign(model, updates)


# ----------------------------------------------------------------------------- config.json


def diffusers_config(
  cfg, sample_frames: int, sample_height: int, sample_width: int, max_text_seq_length: int
) -> dict:
  """``config.json`` of the equivalent ``CogVideoXTransformer3DModel``.

  All sizes are in our model's (latent) units, like its input ``[B, F, h, w, c]``: ``sample_frames`` is the
  number of LATENT frames F and is written as diffusers' pixel-frame count ``(F − 1) · 4 + 1`` (diffusers maps
  it back to F); ``sample_height`` / ``sample_width`` are latent sizes, as in diffusers (60 × 90 for
  480 × 720).
  ``max_text_seq_length`` must equal the text length used with the sin-cos table (diffusers adds the table to
  the joint sequence). LayerFlow extras (layer embeddings, adapters) are not described: they are not in this
  model.
  """
  if cfg.pos_embed not in ("sincos", "rope", "learned"):  # learned: the table goes to the extras (their hook)
    raise ValueError(f"pos_embed {cfg.pos_embed!r} has no CogVideoXTransformer3DModel equivalent")
  if cfg.mlp_ratio != 4:
    raise ValueError(f"mlp_ratio {cfg.mlp_ratio}: diffusers' CogVideoX block has a 4x feed-forward")
  if abs(cfg.qk_norm_eps - 1e-6) > 1e-12:
    raise ValueError(f"qk_norm_eps {cfg.qk_norm_eps}: diffusers' CogVideoX attention uses 1e-6")
  if sample_frames < 1 or sample_height % cfg.patch_size or sample_width % cfg.patch_size:
    raise ValueError(
      f"sample size {sample_frames}x{sample_height}x{sample_width} does not fit patch size {cfg.patch_size}"
    )
  return {
    "_class_name": "CogVideoXTransformer3DModel",
    "num_attention_heads": cfg.num_heads,
    "attention_head_dim": cfg.head_dim,
    "in_channels": cfg.in_channels,
    "out_channels": cfg.out_channels,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": cfg.time_embed_dim,
    "ofs_embed_dim": None,
    "text_embed_dim": cfg.text_embed_dim,
    "num_layers": cfg.num_layers,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": int(sample_width),
    "sample_height": int(sample_height),
    "sample_frames": (int(sample_frames) - 1) * TEMPORAL_COMPRESSION + 1,
    "patch_size": cfg.patch_size,
    "patch_size_t": None,
    "temporal_compression_ratio": TEMPORAL_COMPRESSION,
    "max_text_seq_length": int(max_text_seq_length),
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": cfg.norm_eps,
    "spatial_interpolation_scale": cfg.spatial_interpolation_scale,
    "temporal_interpolation_scale": cfg.temporal_interpolation_scale,
    "use_rotary_positional_embeddings": cfg.pos_embed == "rope",
    "use_learned_positional_embeddings": False,
    "patch_bias": True,
  }
