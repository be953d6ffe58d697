"""Config validation, run before anything is built or compiled.

A bad config should fail in a second with one line that says what to change, not after minutes of compilation with
an XLA shape error. Every check here raises :class:`~layerflow_jax.config.ConfigError` whose message names the key,
the value and what was expected, e.g.::

  data.frames=5: not divisible by the temporal compression autoencoder.temporal=2; expected a multiple of 2

Unknown keys and wrong types in ``--config.KEY=VALUE`` overrides are refused earlier, by
:func:`layerflow_jax.config.set_key`; this module checks the values of a whole config (including the free-form
groups such as ``data.mixture`` entries and ``model.adapters``), how they fit together, and how they fit the
devices, the mesh and the work dir. Nothing here builds a model or touches a device. Allowed values come from the
modules that use them (layouts, samplers, remat policies, LoRA targets, mixture keys), so they cannot drift apart.
"""

from __future__ import annotations

import difflib
import math
import pathlib
from typing import Any, Mapping, NoReturn, Sequence

import ml_collections as mlc

from data_pipelines import pipeline
from data_pipelines.spec import BATCH_KEYS
from layerflow_jax import layers, sharding
from layerflow_jax.config import SCHEMA, ConfigError
from layerflow_jax.diffusion.samplers import SAMPLERS
from layerflow_jax.model import attention
from layerflow_jax.model import fp8 as fp8_lib
from layerflow_jax.model import lora as lora_lib
from layerflow_jax.model.dit import REMAT_POLICIES
from layerflow_jax.sharding import MESH_AXES
from layerflow_jax.train.experiment import LR_SCHEDULES

ADAPTER_KEYS = ("rank", "alpha", "targets", "blocks", "switch")

# Types, defaults and number ranges come from the one declaration (configs/default.py SCHEMA).
# (model.dtype, pos_embed, layer_embed … are checked with the same kind of message by DiTConfig.from_config.)
_CHOICES: dict[str, tuple[str, ...]] = {
  "layout": tuple(layers.LAYOUTS),
  "train.lr_schedule": LR_SCHEDULES,
  "train.trainable": ("all", "official_base", "adapters"),  # layerflow_jax.train.partition.select
  "model.remat": tuple(REMAT_POLICIES),
  "sampling.sampler": SAMPLERS,
  "model.attention": ("xla", "cudnn", "chunked", "splash"),  # layerflow_jax.model.attention.attend
  "model.precision": fp8_lib.PRECISIONS,
}


def fail(key: str, value: Any, problem: str, expected: str) -> NoReturn:
  """Raises the one-line error every check uses: ``KEY=VALUE: problem; expected …``."""
  raise ConfigError(f"{key}={value!r}: {problem}; expected {expected}")


def _get(config: mlc.ConfigDict, key: str, default: Any = None) -> Any:
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, (mlc.ConfigDict, Mapping)) or part not in node:
      return default
    node = node[part]
  return node


def _has(config: mlc.ConfigDict, key: str) -> bool:
  marker = object()
  return _get(config, key, marker) is not marker


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- single values


def _range_text(kind: type, lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
  if kind is int and lo_in and hi == math.inf:
    return f"an integer >= {int(lo)}"
  return f"{'an integer' if kind is int else 'a number'} in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def check_values(config: mlc.ConfigDict) -> None:
  """Types, ranges and choices of the scalar keys (keys a config does not have are skipped)."""
  for key, setting in SCHEMA.items():
    bounds = setting.bounds()
    if bounds is None or not _has(config, key):
      continue
    v, (lo, hi, lo_in, hi_in) = _get(config, key), bounds
    if not (_is_int(v) if setting.type is int else _is_number(v)):
      fail(key, v, f"is a {type(v).__name__}", "an integer" if setting.type is int else "a number")
    if not math.isfinite(v) or (v < lo if lo_in else v <= lo) or (v > hi if hi_in else v >= hi):
      fail(
        key,
        v,
        "is too small" if setting.type is int and v < lo else "is out of range",
        _range_text(setting.type, lo, hi, lo_in, hi_in),
      )
  for key, choices in _CHOICES.items():
    if _has(config, key) and _get(config, key) not in choices:
      fail(key, _get(config, key), "is not a known choice", f"one of {', '.join(choices)}")
  if _get(config, "train.steps") == 0 and not _get(config, "train.init_from"):
    fail(
      "train.steps",
      0,
      "trains nothing from a fresh initialisation",
      "an integer >= 1, or 0 with train.init_from (an evaluation-only run of that checkpoint)",
    )
  epochs = _get(config, "data.num_epochs")
  if epochs is not None and (not _is_int(epochs) or epochs < 1):
    fail("data.num_epochs", epochs, "is not a positive integer", "None (repeat forever) or an integer >= 1")
  inject = _get(config, "train.inject_nan_steps")
  if not isinstance(inject, (tuple, list)) or not all(_is_int(s) and s >= 1 for s in inject):
    fail(
      "train.inject_nan_steps",
      inject,
      "is not a list of steps",
      "a tuple of step numbers >= 1 (fault injection)",
    )


def _type_ok(setting, value: Any) -> bool:
  kind = setting.type
  if value is None:
    return setting.default is None
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return _is_int(value)
  if kind is float:
    return _is_number(value)
  if kind in (tuple, list):
    return isinstance(value, (tuple, list))
  if kind is dict:
    return isinstance(value, (Mapping, mlc.ConfigDict))
  return isinstance(value, kind)


def check_keys(config: mlc.ConfigDict) -> None:
  """Every key is declared in configs/default.py (SCHEMA) and holds a value of its declared type, and every
  declared key is there (free-form groups such as ``data.mixture`` and ``model.adapters`` are checked by their own
  checks)."""

  def walk(node: mlc.ConfigDict, prefix: str) -> None:
    for k in node:
      key, value = prefix + k, node[k]
      shown = value.to_dict() if isinstance(value, mlc.ConfigDict) else value  # one line
      setting = SCHEMA.get(key)
      if setting is not None:
        if not _type_ok(setting, value):
          fail(
            key,
            shown,
            f"is a {type(value).__name__}",
            f"a {setting.type.__name__} like the default {setting.default!r} ({setting.doc})",
          )
      elif isinstance(value, mlc.ConfigDict) and any(s.startswith(key + ".") for s in SCHEMA):
        walk(value, key + ".")
      else:
        close = difflib.get_close_matches(key, list(SCHEMA), n=1)
        fail(
          key,
          shown,
          "is not a declared setting",
          (f"{close[0]!r} or " if close else "") + "a key declared in configs/default.py (SCHEMA)",
        )

  walk(config, "")
  missing = [k for k in SCHEMA if not _has(config, k)]
  if missing:
    raise ConfigError(
      f"{missing[0]}: missing from the config ({len(missing)} declared key(s) missing: "
      f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); expected every key declared "
      f"in configs/default.py (build configs on default.get_config)"
    )


def check_tasks(config: mlc.ConfigDict) -> None:
  keys = ["diffusion.task_weights"]
  steps = _get(config, "diffusion.curriculum_steps")
  if steps is not None and (not _is_int(steps) or steps < 0):
    fail("diffusion.curriculum_steps", steps, "is not a step count", "an integer >= 0 (0 = no curriculum)")
  if steps:
    keys.append("diffusion.curriculum_weights")
  for group in keys:
    weights = _get(config, group)
    if weights is None:
      continue
    for name, w in dict(weights).items():
      key = f"{group}.{name}"
      if name not in layers.TASK_NAMES:
        fail(key, w, "is not a task", f"weights for some of {', '.join(layers.TASK_NAMES)}")
      if not _is_number(w) or w < 0:
        fail(key, w, "is not a non-negative number", "a weight >= 0")
    if not any(float(w) > 0 for w in dict(weights).values()):
      fail(group, dict(weights), "gives no task a positive weight", "at least one weight > 0")


def check_mixture(config: mlc.ConfigDict) -> None:
  """Entry keys, transforms and weights of ``data.mixture`` (keys and transforms as the data pipeline defines)."""
  keys, transforms = tuple(pipeline.ENTRY_KEYS), tuple(pipeline.TRANSFORMS)
  mixture = _get(config, "data.mixture") or []
  if not isinstance(mixture, (list, tuple)):
    fail("data.mixture", mixture, "is not a list", "a list of dicts with keys among " + ", ".join(keys))
  for i, entry in enumerate(mixture):
    key = f"data.mixture[{i}]"
    if not isinstance(entry, (Mapping, mlc.ConfigDict)):
      fail(key, entry, "is not a dict", "a dict with keys among " + ", ".join(keys))
    for k in entry:
      if k not in keys:
        fail(f"{key}.{k}", entry[k], "is not a mixture key", "keys among " + ", ".join(keys))
    t = entry.get("transform", "video")
    if t not in transforms:
      fail(f"{key}.transform", t, "is not a known transform", "one of " + ", ".join(transforms))
    w = entry.get("weight", 1.0)
    if not _is_number(w) or w < 0:
      fail(f"{key}.weight", w, "is not a non-negative number", "a weight >= 0")
  if mixture and not any(float(e.get("weight", 1.0)) > 0 for e in mixture):
    fail("data.mixture", [e.get("weight", 1.0) for e in mixture], "has no positive weight", "some weight > 0")


# ----------------------------------------------------------------------------- shapes


def _codec_factors(config: mlc.ConfigDict) -> tuple[int, int] | None:
  """(spatial, temporal) compression of ``config.autoencoder`` when it states them (the pixel codec does)."""
  ae = _get(config, "autoencoder")
  if ae is None or "spatial" not in ae or "temporal" not in ae or ae.get("kind", "pixel") != "pixel":
    return None  # other codecs (the CogVideoX VAE) check clip shapes themselves (Codec.latent_shape)
  for k in ("spatial", "temporal"):
    if not _is_int(ae[k]) or ae[k] < 1:
      fail(f"autoencoder.{k}", ae[k], "is not a positive integer", "a compression factor >= 1")
  return int(ae["spatial"]), int(ae["temporal"])


def check_shapes(config: mlc.ConfigDict) -> None:
  """Clip frames and image size against the codec compression and the patch size."""
  factors = _codec_factors(config)
  if factors is None or not _has(config, "data.frames"):
    return
  spatial, temporal = factors
  d = config.data
  if d.frames % temporal:
    fail(
      "data.frames",
      d.frames,
      f"not divisible by the temporal compression autoencoder.temporal={temporal}",
      f"a multiple of {temporal}",
    )
  patch = int(_get(config, "model.patch_size"))
  for key in ("height", "width"):
    v = d[key]
    if v % spatial:
      fail(
        f"data.{key}",
        v,
        f"not divisible by the spatial compression autoencoder.spatial={spatial}",
        f"a multiple of {spatial}",
      )
    if (v // spatial) % patch:
      fail(
        f"data.{key}",
        v,
        f"its latent size {v // spatial} (÷ autoencoder.spatial={spatial}) is not divisible "
        f"by model.patch_size={patch}",
        f"a multiple of {spatial * patch}",
      )


def joint_tokens(config: mlc.ConfigDict) -> int | None:
  """Tokens of the joint [text; video] sequence (3 prompts × text_encoder.max_length + video tokens), when the
  codec states its compression in the config (the pixel codec; None for the CogVideoX VAE, whose factors live in
  its config.json)."""
  factors = _codec_factors(config)
  if factors is None or not all(_has(config, k) for k in ("data.frames", "data.height", "data.width")):
    return None
  spatial, temporal = factors
  patch = int(_get(config, "model.patch_size"))
  d = config.data
  clips = layers.get_layout(_get(config, "layout")).num_clips
  video = clips * (d.frames // temporal) * (d.height // spatial // patch) * (d.width // spatial // patch)
  return 3 * int(_get(config, "text_encoder.max_length")) + video


def check_splash(config: mlc.ConfigDict, sequence: int) -> None:
  """``model.attention='splash'`` tiles the joint sequence in blocks of 128 tokens: without sequence parallelism
  (where each shard pads to the tiles itself) ``model.pad_tokens_to`` must make the length a multiple of 128."""
  if _get(config, "model.attention") != "splash" or sequence != 1:  # (-1: unknown before the devices are)
    return
  tile, pad = attention.SPLASH_TILE, int(_get(config, "model.pad_tokens_to"))
  tokens = joint_tokens(config)
  if tokens is None:
    if pad % tile:
      fail(
        "model.pad_tokens_to",
        pad,
        f"with model.attention='splash' the joint sequence must tile into blocks "
        f"of {tile} tokens, and its length is not known before the codec loads",
        f"a multiple of {tile} (e.g. 512)",
      )
    return
  padded = -(-tokens // pad) * pad if pad else tokens
  if padded % tile:
    fail(
      "model.pad_tokens_to",
      pad,
      f"the joint sequence of {tokens} tokens"
      + (f" padded to {padded}" if pad else "")
      + f" does not tile into model.attention='splash' blocks of {tile} tokens",
      f"a multiple of {tile} (e.g. 512), or model.attention other than 'splash'",
    )


# ----------------------------------------------------------------------------- adapters


def _adapter_names(config: mlc.ConfigDict) -> list[str]:
  return sorted(dict(_get(config, "model.adapters") or {}))


def check_adapters(config: mlc.ConfigDict) -> None:
  """Each adapter's keys, rank, targets and blocks; and every place that names an adapter."""
  adapters = _get(config, "model.adapters") or {}
  n = int(_get(config, "model.num_layers"))
  for name in sorted(adapters):
    a = adapters[name]
    key = f"model.adapters.{name}"
    for k in a:
      if k not in ADAPTER_KEYS:
        fail(f"{key}.{k}", a[k], "is not an adapter key", "keys among " + ", ".join(ADAPTER_KEYS))
    for k in ("rank", "targets", "blocks"):
      if k not in a:
        fail(key, dict(a), f"has no {k!r}", "an adapter with rank, targets and blocks")
    if not _is_int(a["rank"]) or a["rank"] < 1:
      fail(f"{key}.rank", a["rank"], "is not a positive integer", "a rank >= 1")
    targets = a["targets"]
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    bad = [t for t in names if t not in lora_lib.TARGETS]
    if bad or not names:
      fail(
        f"{key}.targets",
        targets,
        f"names no such layer {bad}" if bad else "is empty",
        "a comma-separated subset of " + ",".join(lora_lib.TARGETS),
      )
    try:
      blocks = lora_lib.parse_blocks(a["blocks"], n, f"{key}.blocks")
    except (ValueError, TypeError):
      fail(
        f"{key}.blocks",
        a["blocks"],
        f"does not select blocks of model.num_layers={n}",
        f"'all', 'every:K', 'every:K:OFFSET' or distinct indices in [0, {n})",
      )
    if not blocks:
      fail(
        f"{key}.blocks", a["blocks"], f"selects none of the {n} blocks", "a selection of at least one block"
      )

  present = _adapter_names(config)
  for key in ("train.trainable_adapters", "sampling.remove_adapters"):
    for name in tuple(_get(config, key, ()) or ()):
      if name not in present:
        fail(
          key,
          tuple(_get(config, key)),
          f"names adapter {name!r}, which model.adapters does not define",
          f"names among {present}",
        )
  for name, batch_key in dict(_get(config, "train.adapter_scale_keys") or {}).items():
    if name not in present:
      fail(
        f"train.adapter_scale_keys.{name}",
        batch_key,
        f"adapter {name!r} is not in model.adapters",
        f"adapter names among {present}",
      )
    if batch_key not in BATCH_KEYS:
      fail(
        f"train.adapter_scale_keys.{name}", batch_key, "is not a batch key", f"one of {', '.join(BATCH_KEYS)}"
      )
  for name in dict(_get(config, "sampling.adapter_scales") or {}):
    if name not in present:
      fail(
        f"sampling.adapter_scales.{name}",
        _get(config, f"sampling.adapter_scales.{name}"),
        f"adapter {name!r} is not in model.adapters",
        f"adapter names among {present}",
      )
  if _get(config, "train.trainable") == "adapters" and not present:
    fail(
      "train.trainable",
      "adapters",
      "but model.adapters is empty",
      "'all'/'official_base', or define adapters",
    )


# ----------------------------------------------------------------------------- devices and batch


def check_mesh(config: mlc.ConfigDict, num_devices: int) -> dict[str, int]:
  """The mesh axes resolved against ``num_devices`` (one axis may be -1)."""
  mesh = dict(_get(config, "mesh") or {})
  dcn = mesh.pop("dcn", None)  # hybrid ICI/DCN factors, checked below once the axis sizes are known
  for k, v in mesh.items():
    if k not in MESH_AXES:
      fail(f"mesh.{k}", v, "is not a mesh axis", "axes among " + ", ".join(MESH_AXES))
    if not _is_int(v) or v == 0 or v < -1:
      fail(f"mesh.{k}", v, "is not a valid axis size", "a positive integer or -1 (the rest of the devices)")
  shape = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
  wild = [a for a, n in shape.items() if n == -1]
  if len(wild) > 1:
    fail("mesh", mesh, f"axes {wild} are all -1", "at most one axis of -1")
  fixed = math.prod(n for n in shape.values() if n != -1)
  if wild:
    if num_devices % fixed:
      fail(
        "mesh",
        mesh,
        f"the fixed axes need {fixed} devices, which does not divide the {num_devices} devices",
        f"fixed axes whose product divides {num_devices}",
      )
    shape[wild[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    fail(
      "mesh",
      mesh,
      f"uses {math.prod(shape.values())} devices but {num_devices} are available",
      f"axis sizes whose product is {num_devices} (or one axis of -1)",
    )
  if dcn:
    try:
      sharding.dcn_shape({"dcn": dcn}, shape)
    except ValueError as e:
      fail("mesh.dcn", dict(dcn), str(e), "per-axis DCN factors that divide the mesh axis sizes")
  return shape


def check_batch(config: mlc.ConfigDict, mesh_shape: Mapping[str, int], process_count: int = 1) -> None:
  b = int(config.data.batch_size)
  dp = int(mesh_shape["data"]) * int(mesh_shape["fsdp"])
  if b % dp:
    # (kept in this word order: "data.batch_size B is not divisible by the data-parallel size N")
    raise ConfigError(
      f"data.batch_size {b} is not divisible by the data-parallel size {dp} "
      f"(mesh data={mesh_shape['data']} × fsdp={mesh_shape['fsdp']}); expected a multiple of {dp}"
    )
  if b % process_count:
    fail(
      "data.batch_size",
      b,
      f"not divisible by the {process_count} processes",
      f"a multiple of {process_count}",
    )
  k = int(_get(config, "train.grad_accum"))
  per_process = b // process_count
  if per_process % k:
    fail(
      "train.grad_accum",
      k,
      f"does not divide the per-process batch {per_process}",
      f"a divisor of {per_process}",
    )


def check_param_sharding(
  shapes: Mapping[str, Sequence[int]], specs: Mapping[str, Any], mesh_shape: Mapping[str, int]
) -> None:
  """Every parameter dimension must split evenly over the mesh axes the rules table maps it to (jit refuses an
  uneven split only at compile time, naming no config key)."""
  for path, shape in shapes.items():
    spec = tuple(specs.get(path, ()))
    for dim, axes in enumerate(spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      split = math.prod(int(mesh_shape[a]) for a in axes)
      if split > 1 and int(shape[dim]) % split:
        key = "mesh." + axes[0] if len(axes) == 1 else "mesh"
        value = mesh_shape[axes[0]] if len(axes) == 1 else {a: mesh_shape[a] for a in axes}
        fail(
          key,
          value,
          f"parameter {path} has size {shape[dim]} on dimension {dim}, which is split over "
          f"{'×'.join(axes)}={split}",
          f"mesh sizes that divide {shape[dim]} (or a model size divisible by {split})",
        )


# ----------------------------------------------------------------------------- chaining


def check_init_from(config: mlc.ConfigDict) -> None:
  """``train.init_from`` (a previous stage) must be a work dir holding at least one finished checkpoint."""
  src = _get(config, "train.init_from")
  if not src:
    return
  path = pathlib.Path(src)
  ck = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = [p for p in ck.iterdir() if p.is_dir() and p.name.isdigit()] if ck.is_dir() else []
  if not steps:
    fail(
      "train.init_from",
      src,
      "holds no finished checkpoint" if path.exists() else "does not exist",
      "the work dir of a finished earlier stage (with checkpoints/<step>/)",
    )


# ----------------------------------------------------------------------------- backend; ineffective settings

# attention implementation → the backends (``jax.default_backend()``) that have it.
ATTENTION_BACKENDS = {"cudnn": ("gpu", "cuda")}


def check_backend(config: mlc.ConfigDict, platform: str) -> None:
  """The chosen attention must exist on this backend (cuDNN attention only compiles on NVIDIA GPUs)."""
  impl = _get(config, "model.attention")
  allowed = ATTENTION_BACKENDS.get(impl)
  if allowed is not None and platform not in allowed:
    fail(
      "model.attention",
      impl,
      f"needs an NVIDIA GPU but this backend is {platform!r}",
      "'xla' or 'chunked' here (--config.model.attention=xla)",
    )


def check_precision(
  config: mlc.ConfigDict, platform: str, compute_capability: str | None, *, training: bool
) -> None:
  """FP8 ``model.precision`` needs Hopper's FP8 tensor cores (compute capability 9.x; ``compute_capability`` is
  ``jax.devices()[0].compute_capability``, None off CUDA), bfloat16 compute and, for attention, cuDNN; jax's cuDNN
  FP8 attention has no backward pass at this project's head dims, so training refuses it."""
  precision = _get(config, "model.precision", "bf16")
  if precision == "bf16":
    return
  if (
    platform not in ("gpu", "cuda") or not compute_capability or not str(compute_capability).startswith("9.")
  ):
    where = f"compute capability {compute_capability}" if compute_capability else f"backend {platform!r}"
    fail(
      "model.precision",
      precision,
      f"FP8 runs on Hopper GPUs (compute capability 9.x), this device is {where}",
      "'bf16' here (--config.model.precision=bf16)",
    )
  if _get(config, "model.dtype") != "bfloat16":
    fail(
      "model.precision",
      precision,
      f"FP8 scales bfloat16 tensors, model.dtype is {_get(config, 'model.dtype')!r}",
      "model.dtype='bfloat16' with it",
    )
  if not fp8_lib.attention_fp8(precision):
    return
  if _get(config, "model.attention") != "cudnn":
    fail(
      "model.precision",
      precision,
      f"FP8 attention is cuDNN's, model.attention is {_get(config, 'model.attention')!r}",
      "model.attention='cudnn' with it",
    )
  head_dim = _get(config, "model.head_dim")
  if training:
    fail(
      "model.precision",
      precision,
      f"jax's cuDNN FP8 attention trains only at head_dim 128 with no padding mask "
      f"(this model: head_dim {head_dim}); FP8 attention serves sampling and evaluation",
      "'bf16' or 'fp8_gemm' for training",
    )
  if not _is_int(head_dim) or head_dim > 256 or head_dim % 16:
    fail(
      "model.head_dim",
      head_dim,
      "cuDNN FP8 attention needs a head dim that is a multiple of 16, at most 256",
      "model.precision 'bf16' or 'fp8_gemm' for this model",
    )


def ineffective_settings(config: mlc.ConfigDict) -> list[str]:
  """One-line warnings for settings that cannot take effect in this run (the run itself is valid)."""
  out = []
  steps = _get(config, "train.steps")
  if _is_int(steps) and steps > 0:  # train.steps=0 (an evaluation-only run) trains nothing to warn about
    curriculum = _get(config, "diffusion.curriculum_steps") or 0
    if _is_int(curriculum) and curriculum >= steps:
      out.append(
        f"diffusion.curriculum_steps={curriculum} >= train.steps={steps}: the curriculum never "
        f"ends, so diffusion.task_weights never take effect (every step uses "
        f"diffusion.curriculum_weights)"
      )
    warmup = _get(config, "train.warmup_steps") or 0
    if _is_int(warmup) and warmup >= steps:
      out.append(
        f"train.warmup_steps={warmup} >= train.steps={steps}: the warm-up never ends, so the "
        f"learning rate never reaches train.lr={_get(config, 'train.lr')}"
      )
  heads, head_dim = _get(config, "model.num_heads"), _get(config, "model.head_dim")
  if _is_int(heads) and _is_int(head_dim):
    width = heads * head_dim  # the smallest side of every LoRA target (q, k, v, out: width²; ff: width × mlp)
    for name, a in sorted(dict(_get(config, "model.adapters") or {}).items()):
      rank = a.get("rank") if isinstance(a, (Mapping, mlc.ConfigDict)) else None
      if _is_int(rank) and rank > width:
        out.append(
          f"model.adapters.{name}.rank={rank} > the layer width {width} (model.num_heads × "
          f"model.head_dim): a rank above {width} adds parameters but no capacity"
        )
  return out


# ----------------------------------------------------------------------------- all


def validate(
  config: mlc.ConfigDict,
  *,
  num_devices: int | None = None,
  process_count: int = 1,
  mesh_shape: Mapping[str, int] | None = None,
  check_chain: bool = True,
) -> dict[str, int] | None:
  """Runs every check; returns the resolved mesh shape (None when neither devices nor a mesh are given).

  ``check_chain=False`` skips ``train.init_from`` (a resumed run no longer needs its source; ``train-stages``
  checks later stages before their source exists).
  """
  check_values(config)
  check_keys(config)
  check_tasks(config)
  check_mixture(config)
  check_shapes(config)
  check_adapters(config)
  shape = (
    dict(mesh_shape)
    if mesh_shape is not None
    else (check_mesh(config, num_devices) if num_devices is not None else None)
  )
  if shape is not None:
    check_batch(config, shape, process_count)
    if int(_get(config, "model.pad_tokens_to")) and shape.get("sequence", 1) > 1:
      fail(
        "model.pad_tokens_to",
        _get(config, "model.pad_tokens_to"),
        f"pads the joint sequence, which sequence parallelism (mesh sequence={shape['sequence']}) cannot split",
        "0 with mesh.sequence > 1",
      )
  check_splash(config, int(shape.get("sequence", 1)) if shape is not None else _get(config, "mesh.sequence"))
  if check_chain:
    check_init_from(config)
  return shape
