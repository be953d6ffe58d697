"""Our LoRA adapters ↔ the PEFT files diffusers' ``load_lora_adapter`` / ``load_lora_weights`` read.

One adapter = one ``pytorch_lora_weights.safetensors`` (NumPy only; no torch or peft needed to write it):

* keys ``transformer.transformer_blocks.{N}.{module}.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
  ``[out, r]`` for the adapter's selected blocks (``module``: ``attn1.to_q``, ``attn1.to_k``, ``attn1.to_v``,
  ``attn1.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``). The ``transformer.`` prefix is what diffusers filters
  on: without it nothing would be applied.
* safetensors metadata ``lora_adapter_metadata`` = JSON of ``transformer.``-prefixed ``LoraConfig`` fields
  (``r``, ``lora_alpha``, ``target_modules`` …). diffusers builds the ``LoraConfig`` from it, so PEFT scales
  the update by ``lora_alpha / r`` exactly as our model does (``alpha / rank``); without the metadata
  diffusers would assume ``alpha = r``. ``target_modules`` lists the full module names of the selected blocks
  only, so PEFT injects layers exactly where the adapter has weights.

The alpha multiplier is never folded into the weights, so a file read back (:func:`load_adapter`) gives the
adapter's values bitwise.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from layerflow_jax.export import diffusers_weights as dw

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"


def _spec(model, name: str):
  for s in model.cfg.adapters:
    if s.name == name:
      return s
  raise ValueError(f"model has no adapter {name!r}; adapters: {[s.name for s in model.cfg.adapters]}")


def target_modules(spec) -> list[str]:
  """Full diffusers module names the adapter touches (selected blocks × targets)."""
  return [f"transformer_blocks.{blk}.{dw._LORA_MODULES[t]}" for blk in spec.blocks for t in spec.targets]


def lora_config(spec) -> dict[str, Any]:
  """The ``LoraConfig`` fields (unprefixed) that reproduce the adapter in PEFT: scale ``lora_alpha / r``."""
  return {
    "r": int(spec.rank),
    "lora_alpha": float(spec.alpha),
    "target_modules": target_modules(spec),
    "lora_dropout": 0.0,
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
  }


def adapter_state_dict(model, name: str, *, dtype=None) -> dict[str, np.ndarray]:
  """PEFT state dict of one adapter (``transformer.``-prefixed keys, PyTorch layouts)."""
  _spec(model, name)
  own = f"adapters.{name}."
  out = {}
  for key, value in dw.extras_state_dict(model).items():
    if key.startswith(own):
      arr = value if dtype is None else value.astype(dw._np_dtype(dtype))
      out[f"{PREFIX}.{key[len(own) :]}"] = np.ascontiguousarray(arr)
  return out


def save_adapter(folder: str | pathlib.Path, model, name: str, *, dtype=None) -> pathlib.Path:
  """Writes ``folder/pytorch_lora_weights.safetensors`` for adapter ``name``; returns its path."""
  spec = _spec(model, name)
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  meta = {f"{PREFIX}.{k}": v for k, v in lora_config(spec).items()}
  path = folder / WEIGHT_NAME
  save_file(
    adapter_state_dict(model, name, dtype=dtype),
    str(path),
    metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)},
  )
  return path


def read_adapter(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, unprefixed LoraConfig fields) of a PEFT LoRA file (a file or a folder holding one)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / WEIGHT_NAME
  with safe_open(str(path), framework="numpy") as f:
    sd = {k: f.get_tensor(k) for k in f.keys()}
    meta = f.metadata() or {}
  raw = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
  conf = {k[len(PREFIX) + 1 :]: v for k, v in raw.items() if k.startswith(PREFIX + ".")}
  return sd, conf


def load_adapter(model, path: str | pathlib.Path, name: str) -> None:
  """Loads a PEFT LoRA file into our adapter ``name`` (rank, alpha, targets and blocks must match)."""
  spec = _spec(model, name)
  sd, conf = read_adapter(path)
  want = lora_config(spec)
  wrong = [
    f"{k}: file {conf.get(k)!r}, model {want[k]!r}"
    for k in ("r", "lora_alpha")
    if k in conf and conf[k] != want[k]
  ]
  if "target_modules" in conf and sorted(conf["target_modules"]) != sorted(want["target_modules"]):
    wrong.append(
      f"target_modules: file {sorted(conf['target_modules'])}, model {sorted(want['target_modules'])}"
    )
  if wrong:
    raise ValueError(f"{path}: LoRA file does not fit adapter {name!r}: {'; '.join(wrong)}")
  stripped = {
    f"adapters.{name}.{k[len(PREFIX) + 1 :]}": v for k, v in sd.items() if k.startswith(PREFIX + ".")
  }
  others = [k for k in sd if not k.startswith(PREFIX + ".")]
  own = {k: v for k, v in dw.extras_state_dict(model).items() if k.startswith(f"adapters.{name}.")}
  expected = {k: v.shape for k, v in own.items()}
  dw._check_keys({**stripped, **{k: sd[k] for k in others}}, expected, f"LoRA file {path}")
  updates = {}
  for t in spec.targets:
    module = dw._LORA_MODULES[t]
    for ab, leaf in (("A", "a"), ("B", "b")):
      updates[("adapters", name, f"{t}_{leaf}")] = np.stack(
        [
          dw._to_numpy(stripped[f"adapters.{name}.transformer_blocks.{blk}.{module}.lora_{ab}.weight"]).T
          for blk in spec.blocks
        ]
      )
  dw._assign(model, updates)
