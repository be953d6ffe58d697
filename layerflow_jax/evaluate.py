"""Layer metrics of a model on held-out clips, per task (``layerflow evaluate``, the demo table, training evals).

For each task the model samples the clips that task does not give, and is scored against the ground truth:

* decompose (blend given): alpha IoU (threshold 0.5) and MAE against the true matte, fg / bg PSNR;
* every task: composite-consistency error ‖blend − (α·fg + (1−α)·bg)‖ / ‖blend‖ of the sampled layers, and
  temporal consistency: the generated clips' frame-to-frame change over the ground truth's (1 = moves as much;
  ≪ 1 frozen; ≫ 1 flicker);
* fg2bg / bg2fg: PSNR of the generated blend (and of the generated layer) against the true one;
* generate / bg2fg (the foreground is generated): for single-sprite synthetic prompts, whether the colour and the
  shape named in the foreground prompt are measured back from the generated foreground. The same classifier's
  accuracy on the ground-truth foregrounds is reported beside it (``*_gt``): the ceiling for the model.

With ``eval.multistage`` (:func:`multistage_metrics`), the metrics of the multi-stage mechanism, each on held-out
clips of its own source (``eval.image_data``: high-quality layered images; ``eval.video_data``: videos):

* ``images/edge_alpha_mae``: decomposition's alpha error in the edge band (pixels within 1 px of the true
  matte's 0.5 contour, or with a fractional true alpha);
* ``images/semi_rate``: of the semi-transparent sprites (true alpha < 0.9 everywhere), the share whose decomposed
  matte has their opacity (90th percentile over the sprite within 0.15 of the truth's, and alpha MAE over the sprite
  below 0.15); ``images/semi_alpha_mae``;
* ``images/attr_rate``: of the generated foregrounds whose prompt names an images-only colour
  (``synthetic.IMAGE_ONLY_COLORS``), the share measured back in that colour (``attr_rate_gt``: the ceiling);
* ``video/motion_ratio``: generated clips' frame change over the ground-truth videos' (sampled as configured:
  stage 3 removes the motion LoRA);
* ``video/motion_on``, ``video/motion_off``, ``video/motion_on_off``: frame change with the motion LoRA on
  (scale 1) and removed, and their ratio (models with a motion adapter).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from data_pipelines import pipeline, synthetic
from layerflow_jax import layers, media, metrics
from layerflow_jax.sampling import LayeredSampler

# (metric key, label, higher is better) for tables; keys are "task/metric".
TABLE_METRICS = (
  ("decompose/alpha_iou", "decompose: alpha IoU", True),
  ("decompose/alpha_mae", "decompose: alpha MAE", False),
  ("decompose/fg_psnr", "decompose: fg PSNR dB", True),
  ("decompose/bg_psnr", "decompose: bg PSNR dB", True),
  ("generate/composite_error", "generate: composite-consistency error", False),
  ("generate/temporal_ratio", "generate: frame change / ground truth's", None),
  ("generate/color_accuracy", "generate: fg colour named in prompt", True),
  ("generate/shape_accuracy", "generate: fg shape named in prompt", True),
  ("fg2bg/blend_psnr", "fg→bg: blend PSNR dB", True),
  ("bg2fg/blend_psnr", "bg→fg: blend PSNR dB", True),
  ("bg2fg/color_accuracy", "bg→fg: fg colour named in prompt", True),
  ("images/edge_alpha_mae", "images: decompose alpha MAE in the edge band", False),
  ("images/semi_rate", "images: semi-transparency reproduced", True),
  ("images/attr_rate", "images: images-only colour generated", True),
  ("video/motion_ratio", "video: generated frame change / ground truth's", None),
  ("video/motion_on_off", "video: frame change, motion LoRA on / removed", False),
)


def eval_batches(
  config, split: str = "validation", *, num_batches: int | None = None, batch_size: int | None = None
) -> list[dict]:
  """Fixed, unshuffled batches of ``split`` in the model-input contract plus the foreground prompts
  (``fg_prompt``: list of str) for the attribute check."""
  decoded = pipeline.layer_dataset(config, split, shuffle=False)
  inputs = pipeline.to_model_inputs(decoded, config)
  bs = int(batch_size or config.data.batch_size)
  n = len(inputs) if num_batches is None else min(len(inputs), int(num_batches) * bs)
  if n == 0:
    raise ValueError(f"split {split!r} of {config.data.name} has no examples to evaluate")
  out = []
  for start in range(0, n, bs):
    idx = range(start, min(start + bs, n))
    ex: list[dict] = []
    prompts: list[dict] = []
    for i in idx:
      e, d = inputs[i], decoded[i]
      assert e is not None and d is not None  # grain gives None only for filtered-out elements: none here
      ex.append(e)
      prompts.append(d)
    keys = ("video", "tokens", "clip_valid", "motion_scale")
    batch: dict[str, Any] = {k: np.stack([e[k] for e in ex]) for k in ex[0] if k in keys}
    batch["fg_prompt"] = [d["fg_prompt"] for d in prompts]
    out.append(batch)
  return out


def _moving_layers(sample: dict, task: str) -> dict:
  """The layers the task generated (given ones are copies of the truth, so they say nothing)."""
  given = set(layers.TASKS[task])
  return {k: v for k, v in sample.items() if k not in given}


def evaluate(
  sampler: LayeredSampler,
  batches: Iterable[dict],
  *,
  tasks: Sequence[str] = layers.TASK_NAMES,
  seed: int = 0,
  num_steps: int | None = None,
  guidance_scale: float | None = None,
) -> tuple[dict, dict]:
  """(metrics averaged over clips, {task: the first batch's samples as split layers} for previews)."""
  for task in tasks:
    layers.check_task(task)
  sums: dict[str, list[float]] = {}
  previews: dict[str, list[dict]] = {}
  has_alpha = sampler.layout.has_alpha

  def add(key: str, value) -> None:
    if value is not None and np.isfinite(value):
      sums.setdefault(key, []).append(float(value))

  for bi, batch in enumerate(batches):
    truth = sampler.split_layers(batch["video"])
    valid = np.asarray(batch.get("clip_valid", np.ones((len(truth), sampler.layout.num_clips))), bool)
    prompts = batch.get("fg_prompt") or [""] * len(truth)
    for task in tasks:
      out = sampler.sample(
        batch["tokens"],
        task,
        given_video=batch["video"],
        seed=seed + bi,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
      )
      gen = sampler.split_layers(out)
      previews.setdefault(task, gen)
      for i, (g, t) in enumerate(zip(gen, truth)):
        bg_ok = bool(valid[i, sampler.layout.index(layers.BG)])
        alpha_g = g.get("alpha", np.ones_like(g["fg"][..., :1]))
        add(f"{task}/composite_error", metrics.composite_error(g["fg"], alpha_g, g["bg"], g["blend"]))
        moving = _moving_layers(g, task)
        # One ratio per clip over all generated colour layers: a static ground-truth layer (a still sprite)
        # would make a per-layer ratio explode.
        keys = [k for k in moving if k != "alpha" and (k != layers.BG or bg_ok)]
        if keys:
          gen_change = sum(metrics.temporal_change(moving[k]) for k in keys)
          true_change = sum(metrics.temporal_change(t[k]) for k in keys)
          add(f"{task}/temporal_ratio", (gen_change + 1e-3) / (true_change + 1e-3))
        if task == "decompose" and has_alpha:
          add(f"{task}/alpha_iou", metrics.alpha_iou(g["alpha"], t["alpha"]))
          add(f"{task}/alpha_mae", metrics.alpha_mae(g["alpha"], t["alpha"]))
        if task in ("decompose", "bg2fg"):
          add(f"{task}/fg_psnr", metrics.psnr(g["fg"], t["fg"]))
        if task in ("decompose", "fg2bg") and bg_ok:
          add(f"{task}/bg_psnr", metrics.psnr(g["bg"], t["bg"]))
        if task in ("fg2bg", "bg2fg"):
          add(f"{task}/blend_psnr", metrics.psnr(g["blend"], t["blend"]))
        if task in ("generate", "bg2fg") and has_alpha:
          color, shape = metrics.prompt_attributes(prompts[i])
          if color is not None:
            add(f"{task}/color_accuracy", float(metrics.dominant_color(g["fg"], g["alpha"]) == color))
            add(f"{task}/color_accuracy_gt", float(metrics.dominant_color(t["fg"], t["alpha"]) == color))
            add(f"{task}/shape_accuracy", float(metrics.dominant_shape(g["alpha"]) == shape))
            add(f"{task}/shape_accuracy_gt", float(metrics.dominant_shape(t["alpha"]) == shape))
  result: dict[str, float | None] = {k: float(np.mean(v)) for k, v in sorted(sums.items())}
  result["num_clips"] = int(sum(len(b["video"]) for b in batches)) if isinstance(batches, list) else None
  return result, previews


def markdown_table(columns: dict[str, dict], keys=TABLE_METRICS) -> str:
  """One row per metric in ``keys`` that any column has, one column per named result dict."""
  names = list(columns)
  lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for key, label, better in keys:
    if not any(key in c for c in columns.values()):
      continue
    arrow = "" if better is None else (" ↑" if better else " ↓")
    cells = [f"{columns[n][key]:.4f}" if key in columns[n] else "–" for n in names]
    lines.append(f"| {label}{arrow} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def contact_sheet(path, previews: dict[str, list[dict]], *, clips: int = 2) -> str:
  """One PNG: a row per (task, clip) with the middle frame of fg over a checkerboard, alpha, bg and blend."""
  rows, labels = [], None
  for samples in previews.values():
    for s in samples[:clips]:
      columns = media.preview_columns(s, recomposite=False)
      t = columns[0][1].shape[0] // 2
      rows.append([clip[t] for _, clip in columns])
      labels = labels or [name for name, _ in columns]
  scale = max(1, 96 // max(min(rows[0][0].shape[:2]), 1))
  return media.save_grid_png(path, rows, scale=scale, labels=labels)


def write_report(out_dir, result: dict, previews: dict, *, title: str = "evaluation") -> dict:
  """metrics.json, metrics.md and contact_sheet.png under ``out_dir``; returns their paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {
    "json": out / "metrics.json",
    "markdown": out / "metrics.md",
    "contact_sheet": out / "contact_sheet.png",
  }
  paths["json"].write_text(json.dumps(result, indent=2))
  rows = [f"| {k} | {v:.4f} |" for k, v in result.items() if isinstance(v, float)]
  paths["markdown"].write_text(
    f"# {title}\n\n"
    + markdown_table({"value": result})
    + "\n\n## all metrics\n\n| metric | value |\n|---|---:|\n"
    + "\n".join(rows)
    + "\n"
  )
  contact_sheet(paths["contact_sheet"], previews)
  return {k: str(v) for k, v in paths.items()}


def relative_change(clip) -> float:
  """A clip's frame-to-frame change over its spatial contrast (mean |x − per-frame spatial mean|): motion that a
  brighter or more contrasted clip does not inflate (0 = still; the synthetic videos' truth is ~0.2–0.4)."""
  x = np.asarray(clip, np.float64)
  spatial = np.abs(x - x.mean(axis=(-3, -2), keepdims=True)).mean()
  return float(metrics.temporal_change(x) / max(spatial, 1e-6))


def frame_changes(
  sampler: LayeredSampler,
  batches: Iterable[dict],
  *,
  task: str = "generate",
  seed: int = 0,
  num_steps: int | None = None,
  guidance_scale: float | None = None,
) -> dict:
  """{"absolute": mean frame change, "relative": mean of :func:`relative_change`} of one set of samples."""
  absolute, relative = [], []
  for bi, batch in enumerate(batches):
    out = sampler.sample(
      batch["tokens"],
      task,
      given_video=batch["video"],
      seed=seed + bi,
      num_steps=num_steps,
      guidance_scale=guidance_scale,
    )
    for g in sampler.split_layers(out):
      for k, v in _moving_layers(g, task).items():
        if k != "alpha":
          absolute.append(metrics.temporal_change(v))
          relative.append(relative_change(v))
  return {"absolute": float(np.mean(absolute)), "relative": float(np.mean(relative))}


def motion_adapter_effect(config, params: dict, batches: Sequence[dict], **kwargs) -> dict:
  """Frame change of samples with the motion adapter on (scale 1) and removed, same seeds: a trained motion LoRA
  (stage 2, static clips) should make samples move less when on.

  ``on`` / ``off``: mean frame change (pixel units); ``on_relative`` / ``off_relative``: each clip's change over its
  spatial contrast. The absolute change also grows with a clip's contrast: a stage-2 LoRA that also brightens the
  background of an underfit base model "moves" more in pixel units while the clips move less (issue 22)."""
  on = LayeredSampler(config, params, keep_adapters=("motion",))
  on.adapter_scales["motion"] = 1.0
  config_off = config.copy_and_resolve_references()
  config_off.sampling.remove_adapters = tuple(config.sampling.remove_adapters) + ("motion",)
  off = LayeredSampler(config_off, params)
  a, b = frame_changes(on, batches, **kwargs), frame_changes(off, batches, **kwargs)
  return {
    "on": a["absolute"],
    "off": b["absolute"],
    "on_relative": a["relative"],
    "off_relative": b["relative"],
  }


# ----------------------------------------------------------------------------- the multi-stage mechanism


def edge_band(true_alpha: np.ndarray, radius: int = 1) -> np.ndarray:
  """bool [..., H, W]: pixels within ``radius`` of the 0.5 contour of ``true_alpha`` [..., H, W] in [0, 1],
  plus every pixel with a fractional true alpha (0.02 < α < 0.98)."""
  m = true_alpha >= 0.5
  return (synthetic.morph(m, radius) & ~synthetic.morph(m, -radius)) | (
    (true_alpha > 0.02) & (true_alpha < 0.98)
  )


def matte_scores(gen_alpha: np.ndarray, true_alpha: np.ndarray) -> dict:
  """One clip's mattes [T, H, W(, 1)] → ``edge_alpha_mae`` and, for a semi-transparent sprite (true α < 0.9
  everywhere, some > 0.1), ``semi_reproduced`` (0/1) and ``semi_alpha_mae`` over the sprite."""
  g = np.asarray(gen_alpha, np.float32).reshape(np.shape(true_alpha)[:3])
  t = np.asarray(true_alpha, np.float32).reshape(g.shape)
  band = edge_band(t)
  out = {"edge_alpha_mae": float(np.abs(g - t)[band].mean()) if band.any() else None}
  support = t > 0.1
  if support.any() and t.max() < 0.9:
    level_g, level_t = np.percentile(g[support], 90), np.percentile(t[support], 90)
    mae = float(np.abs(g - t)[support].mean())
    # Its opacity, and pixel by pixel: a noisy matte can hit the level by chance, not the error.
    out["semi_reproduced"] = float(abs(level_g - level_t) < 0.15 and mae < 0.15)
    out["semi_alpha_mae"] = mae
  return out


def _source_batches(config, name: str, num_batches: int | None) -> tuple:
  c = pipeline.source_config(config, name)
  c.data.mixture = []
  return c, eval_batches(c, "validation", num_batches=num_batches)


def multistage_metrics(
  config,
  params: dict,
  *,
  num_batches: int | None = None,
  seed: int = 0,
  num_steps: int | None = None,
  guidance_scale: float | None = None,
) -> dict:
  """The metrics of the multi-stage mechanism (module docstring) on held-out clips of ``config.eval.image_data``
  and ``config.eval.video_data``, sampled as ``config`` samples (its ``sampling.remove_adapters``)."""
  kw: dict[str, Any] = dict(num_steps=num_steps, guidance_scale=guidance_scale)
  palette = {**metrics.PALETTE, **synthetic.IMAGE_ONLY_COLORS}
  sums: dict[str, list[float]] = {}

  def add(key, value):
    if value is not None and np.isfinite(value):
      sums.setdefault(key, []).append(float(value))

  sampler = LayeredSampler(config, params)
  _, images = _source_batches(config, config.eval.image_data, num_batches)
  for bi, batch in enumerate(images):
    truth = sampler.split_layers(batch["video"])
    if sampler.layout.has_alpha:
      dec = sampler.split_layers(
        sampler.sample(batch["tokens"], "decompose", given_video=batch["video"], seed=seed + bi, **kw)
      )
      for g, t in zip(dec, truth):
        m = matte_scores(g["alpha"], t["alpha"])
        add("images/edge_alpha_mae", m["edge_alpha_mae"])
        add("images/semi_rate", m.get("semi_reproduced"))
        add("images/semi_alpha_mae", m.get("semi_alpha_mae"))
      gen = sampler.split_layers(
        sampler.sample(batch["tokens"], "generate", given_video=batch["video"], seed=seed + bi, **kw)
      )
      for g, t, prompt in zip(gen, truth, batch["fg_prompt"]):
        named = [c for c in synthetic.IMAGE_ONLY_COLORS if c in prompt.lower().split()]
        if named:
          add("images/attr_rate", float(metrics.dominant_color(g["fg"], g["alpha"], palette) == named[0]))
          add("images/attr_rate_gt", float(metrics.dominant_color(t["fg"], t["alpha"], palette) == named[0]))
  vconfig, videos = _source_batches(config, config.eval.video_data, num_batches)
  for bi, batch in enumerate(videos):
    truth = sampler.split_layers(batch["video"])
    gen = sampler.split_layers(
      sampler.sample(batch["tokens"], "generate", given_video=batch["video"], seed=seed + bi, **kw)
    )
    for g, t in zip(gen, truth):
      keys = [k for k in g if k != "alpha"]
      add(
        "video/motion_ratio",
        (sum(metrics.temporal_change(g[k]) for k in keys) + 1e-3)
        / (sum(metrics.temporal_change(t[k]) for k in keys) + 1e-3),
      )
  result = {k: float(np.mean(v)) for k, v in sorted(sums.items())}
  if "motion" in config.model.adapters:
    effect = motion_adapter_effect(vconfig, params, videos, seed=seed, **kw)
    result.update(
      {
        "video/motion_on": effect["on"],
        "video/motion_off": effect["off"],
        "video/motion_on_off": effect["on"] / max(effect["off"], 1e-9),
        "video/motion_on_off_relative": effect["on_relative"] / max(effect["off_relative"], 1e-9),
      }
    )
  return result
