"""diffusers transformer folders on disk: ``config.json`` + safetensors (one file, or shards with an index).

The layout is the one ``ModelMixin.save_pretrained`` writes and ``from_pretrained`` reads:

* ``config.json`` (``_class_name``, ``_diffusers_version`` and the ``__init__`` arguments);
* ``diffusion_pytorch_model.safetensors``, or shards ``diffusion_pytorch_model-0000K-of-0000N.safetensors`` plus
  ``diffusion_pytorch_model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``) when the
  state dict is larger than ``max_shard_size``.

Everything is NumPy (``safetensors.numpy``; bfloat16 as ``ml_dtypes.bfloat16``), so reading and writing a
folder needs neither torch nor diffusers. The split into shards is huggingface_hub's (the same function
diffusers uses), so our shards are laid out as diffusers' own would be.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
CLASS_NAME = "CogVideoXTransformer3DModel"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# ``CogVideoXTransformer3DModel.__init__`` defaults (diffusers 0.40–0.42): what a config.json that omits a key
# means. These are the 2B values.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
  "num_attention_heads": 30,
  "attention_head_dim": 64,
  "in_channels": 16,
  "out_channels": 16,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "time_embed_dim": 512,
  "ofs_embed_dim": None,
  "text_embed_dim": 4096,
  "num_layers": 30,
  "dropout": 0.0,
  "attention_bias": True,
  "sample_width": 90,
  "sample_height": 60,
  "sample_frames": 49,
  "patch_size": 2,
  "patch_size_t": None,
  "temporal_compression_ratio": 4,
  "max_text_seq_length": 226,
  "activation_fn": "gelu-approximate",
  "timestep_activation_fn": "silu",
  "norm_elementwise_affine": True,
  "norm_eps": 1e-5,
  "spatial_interpolation_scale": 1.875,
  "temporal_interpolation_scale": 1.0,
  "use_rotary_positional_embeddings": False,
  "use_learned_positional_embeddings": False,
  "patch_bias": True,
}

# Features of the diffusers class that our DiT does not have: (key, the value we support, what it would be).
_SUPPORTED: tuple[tuple[str, Any, str], ...] = (
  ("patch_size_t", None, "CogVideoX 1.5 temporal patching"),
  ("ofs_embed_dim", None, "the CogVideoX 1.5 I2V offset embedding"),
  ("use_learned_positional_embeddings", False, "learned positional embeddings (5B I2V)"),
  ("attention_bias", True, "q/k/v projections without bias"),
  ("patch_bias", True, "a patch embedding without bias"),
  ("activation_fn", "gelu-approximate", "another feed-forward activation"),
  ("timestep_activation_fn", "silu", "another time-embedding activation"),
  ("flip_sin_to_cos", True, "a sin-first timestep embedding"),
  ("freq_shift", 0, "a shifted timestep embedding"),
  ("norm_elementwise_affine", True, "LayerNorms without affine parameters"),
)


class FolderError(ValueError):
  """A diffusers folder that cannot be read or converted (the message says what and where)."""


# ----------------------------------------------------------------------------- reading


def read_config(folder: str | pathlib.Path) -> dict:
  """``config.json`` of a diffusers transformer folder, with diffusers' defaults filled in."""
  path = pathlib.Path(folder) / CONFIG_NAME
  if not path.is_file():
    raise FolderError(f"{folder}: no {CONFIG_NAME} (expected a diffusers transformer folder)")
  try:
    conf = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise FolderError(f"{path}: not valid JSON ({e})") from None
  name = conf.get("_class_name", CLASS_NAME)
  if name != CLASS_NAME:
    raise FolderError(f"{path}: _class_name is {name!r}, expected {CLASS_NAME!r}")
  return {**DIFFUSERS_DEFAULTS, **conf}


def model_fields(conf: Mapping[str, Any]) -> dict:
  """Our ``config.model`` fields for a diffusers config (2B sin-cos or 5B RoPE, or any size between).

  Refuses (one error listing them all) the features of ``CogVideoXTransformer3DModel`` our DiT lacks.
  ``in_channels``/``out_channels``/``text_embed_dim`` are not model fields here: they come from the
  autoencoder and the text encoder (see :func:`layerflow_jax.export.convert.import_config`).
  """
  conf = {**DIFFUSERS_DEFAULTS, **conf}
  bad = [f"{key}={conf[key]!r} ({what})" for key, want, what in _SUPPORTED if conf[key] != want]
  if conf["in_channels"] != conf["out_channels"]:
    bad.append(
      f"in_channels={conf['in_channels']} != out_channels={conf['out_channels']} (our DiT predicts "
      "the latent it is given)"
    )
  if bad:
    raise FolderError(f"unsupported CogVideoXTransformer3DModel config: {'; '.join(bad)}")
  return dict(
    num_layers=int(conf["num_layers"]),
    num_heads=int(conf["num_attention_heads"]),
    head_dim=int(conf["attention_head_dim"]),
    time_embed_dim=int(conf["time_embed_dim"]),
    pos_embed="rope" if conf["use_rotary_positional_embeddings"] else "sincos",
    patch_size=int(conf["patch_size"]),
    mlp_ratio=4,
    norm_eps=float(conf["norm_eps"]),
    qk_norm_eps=1e-6,
    spatial_interpolation_scale=float(conf["spatial_interpolation_scale"]),
    temporal_interpolation_scale=float(conf["temporal_interpolation_scale"]),
  )


def weight_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a folder: the shards named by the index, or the single weights file."""
  folder = pathlib.Path(folder)
  index = folder / INDEX_NAME
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise FolderError(f"{index}: no weight_map")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
      raise FolderError(f"{index}: shard files missing: {missing}")
    return [folder / f for f in files]
  single = folder / WEIGHTS_NAME
  if single.is_file():
    return [single]
  raise FolderError(f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} (only safetensors weights are read)")


def read_state_dict(folder: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a diffusers folder as NumPy arrays (sharded or not); the index is checked against the shards."""
  folder = pathlib.Path(folder)
  out: dict[str, np.ndarray] = {}
  where: dict[str, str] = {}
  for file in weight_files(folder):
    with safe_open(str(file), framework="numpy") as f:
      for key in f.keys():
        if key in out:
          raise FolderError(f"{folder}: tensor {key!r} is in both {where[key]} and {file.name}")
        out[key] = f.get_tensor(key)
        where[key] = file.name
  index = folder / INDEX_NAME
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    wrong = sorted(k for k in set(weight_map) | set(where) if weight_map.get(k) != where.get(k))
    if wrong:
      raise FolderError(f"{index}: weight_map disagrees with the shards for {wrong}")
  return out


# ----------------------------------------------------------------------------- writing


def write_folder(
  folder: str | pathlib.Path,
  config: Mapping[str, Any],
  state_dict: Mapping[str, np.ndarray],
  *,
  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[pathlib.Path]:
  """Writes ``config.json`` and the weights (sharded with an index above ``max_shard_size``); returns the files.

  Stale weight files of an earlier export in the same folder are removed first, so ``from_pretrained`` can
  never pick up a single file next to a newer index (or the reverse).
  """
  from huggingface_hub import split_state_dict_into_shards_factory  # optional (the torch extra)

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for old in [
    folder / WEIGHTS_NAME,
    folder / INDEX_NAME,
    *folder.glob("diffusion_pytorch_model-*.safetensors"),
  ]:
    if old.is_file():
      old.unlink()
  conf = dict(config)
  conf.setdefault("_class_name", CLASS_NAME)
  try:
    import diffusers  # only for the version stamp diffusers itself writes

    conf.setdefault("_diffusers_version", diffusers.__version__)
  except ImportError:
    pass
  (folder / CONFIG_NAME).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
  split = split_state_dict_into_shards_factory(
    dict(state_dict),
    get_storage_size=lambda a: int(a.nbytes),
    filename_pattern=SHARD_PATTERN,
    max_shard_size=max_shard_size,
  )
  written = [folder / CONFIG_NAME]
  for filename, keys in split.filename_to_tensors.items():
    save_file(
      {k: np.ascontiguousarray(state_dict[k]) for k in keys},
      str(folder / filename),
      metadata={"format": "pt"},
    )
    written.append(folder / filename)
  if split.is_sharded:
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    written.append(folder / INDEX_NAME)
  return written
