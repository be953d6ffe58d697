"""Checkpoints ↔ diffusers folders: ``import_diffusers`` (diffusers → Orbax work dir) and ``export_*`` (→ diffusers).

Import: a ``CogVideoXTransformer3DModel`` folder becomes a work dir ``OUT/checkpoints/0`` in the trainer's
format (state + meta with the config), so ``layerflow sample --checkpoint OUT``, ``trainer.load_params(OUT)`` and
a stage's ``train.init_from=OUT`` read it like any training run. The config is a base config (default
``configs/default.py``) with the model fields taken from ``config.json``; LayerFlow's extras (layer embeddings,
adapters the base config declares) start at their init.

Export: a work dir becomes ``OUT/`` =

* ``config.json`` + ``diffusion_pytorch_model.safetensors`` (sharded with an index above ``max_shard_size``):
  the base transformer, loadable with ``CogVideoXTransformer3DModel.from_pretrained(OUT)``; with
  ``merge_lora`` the adapters kept at sampling are folded in (at their sampling scale);
* ``<adapter>/pytorch_lora_weights.safetensors`` per adapter not merged (PEFT format, see
  :mod:`~layerflow_jax.export.peft_lora`);
* ``layerflow_extras.safetensors``: layer embedder and clip embeddings, with JSON metadata (key ``layerflow``)
  describing the layout, tasks, prompts, adapters (which are used at inference, at what scale) and sampling;
  :mod:`~layerflow_jax.export.torch_extras` attaches them to the diffusers model;
* ``scheduler/scheduler_config.json``: the CogVideoX scheduler matching ``config.diffusion`` / ``config.sampling``.

The sizes written to ``config.json`` are the layered ones: ``sample_frames`` covers all sub-clips,
``max_text_seq_length`` all prompts (diffusers adds its sin-cos table over exactly that joint sequence).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from configs import common
from layerflow_jax import codec as codec_lib
from layerflow_jax import layers
from layerflow_jax.config import apply_overrides
from layerflow_jax.export import diffusers_folder as folder_lib
from layerflow_jax.export import diffusers_weights as dw
from layerflow_jax.export import peft_lora
from layerflow_jax.model import dit
from layerflow_jax.model import lora as lora_lib
from layerflow_jax.train import checkpoint as ckpt_lib
from layerflow_jax.train import partition, trainer
from layerflow_jax.train.experiment import Experiment

EXTRAS_NAME = "layerflow_extras.safetensors"
EXTRAS_METADATA_KEY = "layerflow"
SCHEDULER_DIR = "scheduler"
FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
  """A checkpoint / config / folder that cannot be converted (one line saying what does not fit)."""


def _short(items: Sequence[str], n: int = 6) -> str:
  items = list(items)
  return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------- import


def _pixel_factors(config: mlc.ConfigDict, channels: int) -> tuple[int, int] | None:
  """(spatial, temporal) of a pixel codec with ``channels`` = 3·spatial²·temporal that fits the data sizes."""
  d = config.data
  first = int(config.autoencoder.spatial)
  for s in dict.fromkeys((first, 1, 2, 4, 8)):
    t, rem = divmod(channels, 3 * s * s)
    if rem or t < 1:
      continue
    if d.frames % t or d.height % s or d.width % s:
      continue
    if (d.height // s) % int(config.model.patch_size) or (d.width // s) % int(config.model.patch_size):
      continue
    return s, t
  return None


COGVIDEOX_SCALING_FACTOR = 1.15258426


def default_autoencoder(
  ae: mlc.ConfigDict, channels: int, vae_dir: str | pathlib.Path | None
) -> mlc.ConfigDict:
  """An autoencoder setting with ``channels`` latent channels for a CogVideoX transformer: the CogVideoX VAE of
  ``vae_dir`` when it holds a ``config.json`` with that many latent channels, else the latents-only codec (8×
  spatial, 4× temporal), which loads, trains on cached latents and exports, and refuses pixel work."""
  out = mlc.ConfigDict(ae.to_dict())
  conf = pathlib.Path(vae_dir) / "config.json" if vae_dir else None
  if (
    conf is not None
    and conf.is_file()
    and int(json.loads(conf.read_text()).get("latent_channels", -1)) == channels
  ):
    out.update(kind="cogvideox", path=str(conf.parent), dtype="bfloat16")
  else:
    out.update(
      kind="latent",
      spatial=8,
      temporal=4,
      latent_channels=int(channels),
      scaling_factor=COGVIDEOX_SCALING_FACTOR,
      path="",
    )
  return out


def import_config(
  conf: Mapping[str, Any], base: mlc.ConfigDict, src: str | pathlib.Path | None = None
) -> mlc.ConfigDict:
  """``base`` with the model of a diffusers ``config.json`` (a copy; ``base`` is not changed).

  The text encoder's width must equal ``text_embed_dim`` and the autoencoder's latent channels
  ``in_channels``: the built-in byte encoder and pixel codec are resized to fit. When the pixel codec cannot fit
  (CogVideoX's 16 channels), the autoencoder becomes the CogVideoX VAE of the pipeline folder holding ``src``
  (``src/../vae``) or else the latents-only codec (:func:`default_autoencoder`), with the data sizes of the
  transformer's sample size; any other encoder that does not fit is refused, naming the config key to set.
  """
  conf = {**folder_lib.DIFFUSERS_DEFAULTS, **conf}
  config = mlc.ConfigDict(base.to_dict())
  fields = folder_lib.model_fields(conf)
  m = config.model
  for key, value in fields.items():
    m[key] = value
  sizes = common.MODEL_SIZES
  m.size = next(
    (name for name, s in sizes.items() if all(fields.get(k) == v for k, v in s.items())), "imported"
  )
  text_dim, channels = int(conf["text_embed_dim"]), int(conf["in_channels"])
  problems = []
  if int(config.text_encoder.dim) != text_dim:
    if config.text_encoder.kind == "byte" and text_dim % 2 == 0:
      config.text_encoder.dim = text_dim
    else:
      problems.append(
        f"text_embed_dim {text_dim} != text_encoder.dim {config.text_encoder.dim} "
        f"(set --config.text_encoder.dim or use an encoder of width {text_dim})"
      )
  if codec_lib.make_codec(config.autoencoder).latent_channels != channels:
    factors = _pixel_factors(config, channels) if config.autoencoder.kind == "pixel" else None
    if factors is not None:
      config.autoencoder.spatial, config.autoencoder.temporal = factors
    elif config.autoencoder.kind == "pixel":
      vae = pathlib.Path(src).absolute().parent / "vae" if src is not None else None
      config.autoencoder = default_autoencoder(config.autoencoder, channels, vae)
      p = int(config.model.patch_size)
      config.data.update(
        frames=16, height=int(conf["sample_height"]) * 8, width=int(conf["sample_width"]) * 8
      )
      if (config.data.height // 8) % p or (config.data.width // 8) % p:
        problems.append(
          f"sample size {conf['sample_height']}x{conf['sample_width']} is not divisible by the patch size {p}"
        )
    else:
      problems.append(
        f"in_channels {channels} != the autoencoder's latent channels "
        f"{codec_lib.make_codec(config.autoencoder).latent_channels} (the pixel codec has "
        "3·spatial²·temporal channels; pass an autoencoder with this many latent channels via "
        "--config.autoencoder.*)"
      )
  if problems:
    raise ExportError("; ".join(problems))
  return config


def import_diffusers(src: str | pathlib.Path, out: str | pathlib.Path, base: mlc.ConfigDict) -> dict:
  """Writes ``out/checkpoints/0`` from a diffusers transformer folder; returns a summary.

  Refuses (listing every key) weights that do not fit the config's model: missing, unexpected, wrong shape.
  """
  src, out = pathlib.Path(src), pathlib.Path(out)
  conf = folder_lib.read_config(src)
  config = import_config(conf, base, src)
  if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
    raise ExportError(f"{out} already holds checkpoints; import into a new directory")
  sd = folder_lib.read_state_dict(src)
  exp = Experiment(config)
  model = dit.create_model(exp.model_cfg, seed=int(config.seed))
  dw.from_diffusers_state_dict(model, sd)
  # Host arrays: init_state places them on the mesh itself (device-committed arrays would clash with it).
  params = jax.device_get(partition.flatten(nnx.state(model).to_pure_dict()))
  state = exp.init_state(params=params)
  source = {k: v for k, v in conf.items() if not k.startswith("_")}
  ck = ckpt_lib.Checkpointer(out)
  try:
    ck.save(
      0,
      state,
      meta={
        "config": ckpt_lib.config_to_meta(config),
        "step": 0,
        "imported_from": str(src.absolute()),
        "diffusers_config": source,
      },
    )
  finally:
    ck.close()
  extras = sorted(
    k
    for k in params
    if k.split(".")[0] in ("layer_embed_linear", "layer_embed_norm", "clip_embed", "adapters")
  )
  return {
    "out": str(out),
    "model": dict(config.model.to_dict(), adapters=sorted(config.model.adapters.keys())),
    "tensors": len(sd),
    "extras_at_init": extras,
  }


# ----------------------------------------------------------------------------- export


def check_params(exp: Experiment, params: Mapping[str, Any]) -> None:
  """One-line refusal when the parameters are not those of the config's model."""
  want = exp.abstract_params
  missing = sorted(set(want) - set(params))
  extra = sorted(set(params) - set(want))
  shapes = [
    f"{k} {tuple(np.shape(params[k]))} vs {tuple(want[k].shape)}"
    for k in sorted(want)
    if k in params and tuple(np.shape(params[k])) != tuple(want[k].shape)
  ]
  parts = []
  if missing:
    parts.append(f"missing {_short(missing)}")
  if extra:
    parts.append(f"not in the config's model {_short(extra)}")
  if shapes:
    parts.append(f"shape (checkpoint vs config) {_short(shapes)}")
  if parts:
    raise ExportError("the checkpoint does not match its config: " + "; ".join(parts))


def scheduler_config(config: mlc.ConfigDict) -> dict:
  """``scheduler_config.json`` of the diffusers CogVideoX scheduler equivalent to our schedule and sampler."""
  d = config.diffusion
  # sat_dpmpp_2m: diffusers has the same solver over the full-table schedule (coefficients within 0.1 %)
  name = {
    "ddim": "CogVideoXDDIMScheduler",
    "dpmpp_2m": "CogVideoXDPMScheduler",
    "sat_dpmpp_2m": "CogVideoXDPMScheduler",
  }[str(config.sampling.sampler)]
  return {
    "_class_name": name,
    "num_train_timesteps": int(d.num_train_timesteps),
    "beta_start": float(d.beta_start),
    "beta_end": float(d.beta_end),
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": bool(d.zero_terminal_snr),
    "snr_shift_scale": float(d.snr_shift),
  }


def _layout_info(exp: Experiment) -> dict:
  config, layout = exp.config, exp.layout
  t, h, w, c = exp.latent_shape
  return {
    "layout": layout.name,
    "clips": list(layout.clips),
    "num_clips": layout.num_clips,
    "tasks": {
      task: [clip for clip, g in zip(layout.clips, layers.given_clips(task, layout)) if g]
      for task in layers.TASK_NAMES
    },
    "given_latent_frames": {
      task: np.flatnonzero(row).tolist() for task, row in zip(layers.TASK_NAMES, exp.given_frame_table)
    },
    "task_weights": {k: float(v) for k, v in config.diffusion.task_weights.items()},
    "prompts": list(layers.PROMPTS[: exp.model_cfg.num_prompts]),
    "prompt_prefix": "{index}, ",
    "prompt_length": int(exp.text_encoder.max_length),
    "unconditional_text": "zeros",
    "latent_frames_per_clip": t,
    "latent_height": h,
    "latent_width": w,
    "latent_channels": c,
    "frames_per_clip": int(config.data.frames),
    "height": int(config.data.height),
    "width": int(config.data.width),
    "text_encoder": config.text_encoder.to_dict(),
    "autoencoder": config.autoencoder.to_dict(),
  }


def export_params(
  params: Mapping[str, Any],
  config: mlc.ConfigDict,
  out: str | pathlib.Path,
  *,
  merge_lora: bool = False,
  dtype: str | None = None,
  max_shard_size: int | str = folder_lib.DEFAULT_MAX_SHARD_SIZE,
  source: str = "",
) -> dict:
  """Writes the diffusers folder, the PEFT adapters and the extras of ``params`` (a flat dict) under ``config``."""
  if dtype is not None and dtype not in DTYPES:
    raise ExportError(f"dtype {dtype!r} unknown; expected one of {DTYPES}")
  exp = Experiment(config)
  check_params(exp, params)
  out = pathlib.Path(out)
  model = exp.model({k: jnp.asarray(v) for k, v in params.items()})
  cfg = model.cfg
  clash = [s.name for s in cfg.adapters if s.name in (SCHEDULER_DIR,) or "/" in s.name]
  if clash:
    raise ExportError(f"adapter names {clash} cannot be used as export sub-directories")
  # Options with no diffusers counterpart (and not yet reproduced by torch_extras) are refused, not dropped.
  if cfg.given_embed or cfg.clip_positions != "video":
    raise ExportError(
      f"model.given_embed={cfg.given_embed}, model.clip_positions={cfg.clip_positions!r}: "
      "export supports given_embed=False and clip_positions='video' (the official model)"
    )
  removed = set(config.sampling.remove_adapters)
  scales = dict(config.sampling.adapter_scales)
  adapters = []
  for spec in list(cfg.adapters):
    inference = spec.name not in removed
    entry = {
      "name": spec.name,
      "rank": spec.rank,
      "alpha": spec.alpha,
      "targets": list(spec.targets),
      "blocks": list(spec.blocks),
      "inference": inference,
      "scale": float(scales.get(spec.name, 1.0)),
      "merged": False,
      "file": None,
    }
    if merge_lora and inference:
      lora_lib.merge(model, spec.name, scale=entry["scale"])
      entry["merged"] = True
    adapters.append(entry)

  t, h, w, _ = exp.latent_shape
  conf = dw.diffusers_config(
    model.cfg,
    sample_frames=cfg.lead_frames + exp.layout.num_clips * t,
    sample_height=h,
    sample_width=w,
    max_text_seq_length=cfg.num_prompts * int(exp.text_encoder.max_length),
  )
  written = folder_lib.write_folder(
    out, conf, dw.to_diffusers_state_dict(model, dtype=dtype), max_shard_size=max_shard_size
  )
  for entry in adapters:
    if not entry["merged"]:
      path = peft_lora.save_adapter(out / entry["name"], model, entry["name"], dtype=dtype)
      entry["file"] = str(path.relative_to(out))
      written.append(path)

  extras = {k: v for k, v in dw.extras_state_dict(model).items() if not k.startswith("adapters.")}
  if dtype is not None:
    extras = {k: v.astype(dw._np_dtype(dtype)) for k, v in extras.items()}
  info = {
    "format_version": FORMAT_VERSION,
    "layer_embed": cfg.layer_embed,
    "hidden": cfg.hidden,
    "norm_eps": cfg.norm_eps,
    "num_prompts": cfg.num_prompts,
    "pos_embed": cfg.pos_embed,
    "final_norm_eps": cfg.final_norm_eps,
    "lead_frames": cfg.lead_frames,
    "pos_text_tokens": cfg.pos_text_tokens,
    "pos_table_rows": cfg.pos_text_tokens + int(np.prod(cfg.pos_grid)) if cfg.pos_embed == "learned" else 0,
    "patch_size": cfg.patch_size,
    **_layout_info(exp),
    "adapters": adapters,
    "sampling": {
      k: config.sampling[k] for k in ("sampler", "num_steps", "guidance_scale", "dynamic_cfg", "eta")
    },
    "diffusion": {
      k: config.diffusion[k]
      for k in ("num_train_timesteps", "beta_start", "beta_end", "snr_shift", "zero_terminal_snr")
    },
    "dtype": dtype or "as trained",
    "source": source,
  }
  save_file(
    {k: np.ascontiguousarray(v) for k, v in extras.items()},
    str(out / EXTRAS_NAME),
    metadata={"format": "pt", EXTRAS_METADATA_KEY: json.dumps(info, sort_keys=True)},
  )
  written.append(out / EXTRAS_NAME)
  (out / SCHEDULER_DIR).mkdir(exist_ok=True)
  sched = out / SCHEDULER_DIR / "scheduler_config.json"
  sched.write_text(json.dumps(scheduler_config(config), indent=2, sort_keys=True) + "\n")
  written.append(sched)
  return {
    "out": str(out),
    "files": [str(p.relative_to(out)) for p in written],
    "adapters": adapters,
    "tensors": len(dw.expected_shapes(model.cfg)),
    "sharded": (out / folder_lib.INDEX_NAME).is_file(),
  }


def export_checkpoint(
  checkpoint: str | pathlib.Path, out: str | pathlib.Path, *, overrides: Sequence[str] = (), **kwargs
) -> dict:
  """``export_params`` of the newest readable checkpoint in a work dir (EMA parameters when the run kept
  them); the summary's ``checkpoint`` says which step that was (an older one when the newest is damaged)."""
  params, config, used = trainer.load_checkpoint(checkpoint)
  apply_overrides(config, overrides)
  params = jax.device_get(params)
  source = str(pathlib.Path(used["directory"]) / str(used["step"]))
  summary = export_params(params, config, out, source=source, **kwargs)
  return {**summary, "checkpoint": used}
