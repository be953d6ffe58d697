"""Layer metrics of a model on held-out clips, per task (the demo table; ``layerflow evaluate``).

* decompose (blend given): alpha IoU (threshold 0.5) and MAE against the true matte, fg / bg PSNR;
* generate (prompts only): composite-consistency error ‖blend − (α·fg + (1−α)·bg)‖ / ‖blend‖;
* fg2bg / bg2fg: PSNR of the generated blend against the true blend, and composite error.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from layerflow_jax import layers, metrics
from layerflow_jax.sampling import LayeredSampler


def _truth(sampler: LayeredSampler, video: np.ndarray) -> list[dict]:
  return sampler.split_layers(video)


def evaluate(sampler: LayeredSampler, batches: Iterable[dict], *, tasks: Sequence[str] = layers.TASK_NAMES,
             seed: int = 0, num_steps: int | None = None) -> tuple[dict, dict]:
  """(metrics averaged over clips, the last batch's samples per task for previews)."""
  sums: dict[str, list[float]] = {}
  previews = {}
  has_alpha = sampler.layout.has_alpha
  for bi, batch in enumerate(batches):
    truth = _truth(sampler, batch["video"])
    for task in tasks:
      out = sampler.sample(batch["tokens"], task, given_video=batch["video"], seed=seed + bi, num_steps=num_steps)
      gen = sampler.split_layers(out)
      previews[task] = gen
      for g, t in zip(gen, truth):
        alpha_g = g.get("alpha", np.ones_like(g["fg"][..., :1]))
        row = {"composite_error": metrics.composite_error(g["fg"], alpha_g, g["bg"], g["blend"])}
        if task == "decompose" and has_alpha:
          row["alpha_iou"] = metrics.alpha_iou(g["alpha"], t["alpha"])
          row["alpha_mae"] = metrics.alpha_mae(g["alpha"], t["alpha"])
        if task in ("decompose", "bg2fg"):
          row["fg_psnr"] = metrics.psnr(g["fg"], t["fg"])
        if task in ("decompose", "fg2bg"):
          row["bg_psnr"] = metrics.psnr(g["bg"], t["bg"])
        if task in ("fg2bg", "bg2fg"):
          row["blend_psnr"] = metrics.psnr(g["blend"], t["blend"])
        for k, v in row.items():
          sums.setdefault(f"{task}/{k}", []).append(float(v))
  return {k: float(np.mean(v)) for k, v in sums.items()}, previews
