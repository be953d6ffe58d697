"""The paper's ablations as sweeps over the stage configs (``configs/stages.py``): ``get_sweep(arg)`` lists the runs.

  sweep=layer_embed   stage 1: layer embedding none / text (official) / text+video     model.layer_embed
  sweep=data          stage 1: video-only training vs joint layered image+video        arg.data
  sweep=motion_lora   stage 3: motion LoRA on (switched per sample) / off (none)       arg.motion_lora
  sweep=content_rank  stage 3: content LoRA rank 64 / 256                              model.adapters.content.rank
  sweep=mixture       stage 3: share of static image clips vs copy-paste video clips   arg.image_weight
  sweep=multistage    the paper's multi-stage ablation, on the quality-gap data          arg.variant
                        stage1     stage 1 only (low-quality layered video)
                        no_motion  stage 1 → content LoRA on images + videos, no motion LoRA
                        remove     the three stages, motion LoRA removed at inference (the method)
                        keep       the three stages, motion LoRA kept (scale 1) at inference
                      stage1 / remove / keep evaluate the shared stage checkpoints (train.steps=0): the stages
                      train once; every row reports eval.multistage's metrics.

Stage-3 runs start from stage 2 (or stage 1 when the motion LoRA is off); the sweep runner trains those earlier
stages once in ``DIR/_shared`` and starts every run from them.

  layerflow sweep --config configs/ablations.py:sweep=layer_embed,demo --workdir runs/abl_embed --parallel 2
  layerflow sweep --config configs/ablations.py:sweep=mixture,size=2b --workdir runs/abl_mix --slurm \
      --sbatch=--gres=gpu:8
  layerflow sweep-report runs/abl_embed

One run by hand: ``layerflow train --config configs/ablations.py:sweep=data,data=joint,demo --workdir W``.
Every argument of ``configs/stages.py`` (and so of ``configs/default.py``: ``size=2b,gpu=1`` …) is forwarded to it.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common, stages
from layerflow_jax import sweep as hyper

# sweep name → (stage its runs train, the runs)
SWEEPS = {
  "layer_embed": ("stage1_base", lambda: hyper.axis("model.layer_embed", ["none", "text", "text+video"])),
  "data": ("stage1_base", lambda: hyper.axis("arg.data", ["video", "joint"])),
  "motion_lora": ("stage3_content_lora", lambda: hyper.axis("arg.motion_lora", [True, False])),
  "content_rank": ("stage3_content_lora", lambda: hyper.axis("model.adapters.content.rank", [64, 256])),
  "mixture": ("stage3_content_lora", lambda: hyper.axis("arg.image_weight", [0.25, 0.5, 0.75])),
  "multistage": ("", lambda: hyper.axis("arg.variant", list(VARIANTS))),
}
DATA = ("video", "joint")
# multistage row → (the stage its config is, the checkpoint it evaluates: "" = it trains)
VARIANTS = {
  "stage1": ("stage1_base", "stage1_base"),
  "no_motion": ("stage3_content_lora", ""),
  "remove": ("stage3_content_lora", "stage3_content_lora"),
  "keep": ("stage3_content_lora", "stage3_content_lora"),
}


# Every argument of configs/stages.py (and so of configs/default.py), forwarded to it, and the sweeps' own; stage=""
# is the stage the sweep's runs train.
ARGS = dict(stages.ARGS, sweep="layer_embed", stage="", data="video", motion_lora=True, variant="remove")


def _args(arg: str | None) -> mlc.ConfigDict:
  a = common.parse_arg(arg, **ARGS)
  if a.sweep not in SWEEPS:
    raise ValueError(f"sweep {a.sweep!r} unknown; expected one of {sorted(SWEEPS)}")
  if a.variant not in VARIANTS:
    raise ValueError(f"variant {a.variant!r} unknown; expected one of {sorted(VARIANTS)}")
  if a.data not in DATA:
    raise ValueError(f"data {a.data!r} unknown; expected one of {DATA}")
  if not 0.0 < a.image_weight < 1.0:
    raise ValueError(
      f"image_weight {a.image_weight} must lie strictly between 0 and 1 (both sources are mixed)"
    )
  return a


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = _args(arg)
  multistage = a.sweep == "multistage"
  stage = a.stage or (VARIANTS[a.variant][0] if multistage else SWEEPS[a.sweep][0])
  forwarded = dict(a, stage=stage, quality_gap=a.quality_gap or multistage)
  c = stages.get_config(common.pack_arg(forwarded, stages.ARGS))
  name = c.data.name
  if stage == "stage1_base" and a.data == "joint":
    # The paper's "joint training" baseline: layered images (static clips) and videos in one stage, no LoRA.
    c.data.mixture = [
      dict(name=name, weight=1.0 - a.image_weight, transform="video", motion_scale=0.0),
      dict(name=name, weight=a.image_weight, transform="static", motion_scale=0.0),
    ]
  if stage == "stage3_content_lora" and not a.motion_lora:
    # No motion LoRA at all: the content LoRA trains on the same mixture straight from stage 1.
    del c.model.adapters["motion"]
    c.train.adapter_scale_keys = mlc.ConfigDict()
    c.train.init_from = "stage1_base"
    c.sampling.remove_adapters = ()
  if multistage:
    if stage == "stage3_content_lora" and a.variant == "no_motion":
      # Images trained as if they were video: no motion LoRA, no per-sample switch.
      del c.model.adapters["motion"]
      c.train.adapter_scale_keys = mlc.ConfigDict()
      c.train.init_from = "stage1_base"
      c.sampling.remove_adapters = ()
    evaluates = VARIANTS[a.variant][1]
    if not a.stage and evaluates:  # the row itself (not an earlier stage it starts from): evaluation only
      c.train.init_from = evaluates
      c.train.steps = 0
      if a.variant == "keep":
        c.sampling.remove_adapters = ()
        c.sampling.adapter_scales.motion = 1.0
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  return SWEEPS[_args(arg).sweep][1]()
