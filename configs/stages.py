"""LayerFlow's three training stages as variants of one base config (``configs/default.py``).

  stage1_base          layered video (low-quality in the paper); official trainable subset for 2b/5b
  stage2_motion_lora   a motion LoRA (rank 8, lr 1e-3) alone, on static clips (one frame repeated)
  stage3_content_lora  a content LoRA (rank 256, lr 5e-3) on static clips (motion scale 1) mixed with
                       video clips (motion scale 0); the motion LoRA frozen; sampling removes it

Run one stage:   layerflow train --config configs/stages.py:stage=stage2_motion_lora,size=2b --workdir W
                 (with --config.train.init_from=<stage-1 work dir>)
Run all three:   layerflow train-stages --config configs/stages.py:size=tiny --workdir runs/stages
Demo variant:    configs/stages.py:demo   (tiny, CPU-sized steps, smaller ranks; used by `make demo`)

Arguments: every argument of ``configs/default.py`` (``size=2b,gpu=1``, ``tpu=1``, ``encoders=cogvideox`` …),
``motion_placement=tuned|official`` (the motion LoRA's placement and stage-2 recipe, below),
``quality_gap=True`` (the paper's data sources: stage 1 on low-quality layered video, stage 2 on frozen copy-paste
clips, stage 3 on high-quality layered images + copy-paste videos; data_pipelines/synthetic.py KINDS; the
evaluation adds eval.multistage's metrics).
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common, default

STAGES = ("stage1_base", "stage2_motion_lora", "stage3_content_lora")


def _adapter(rank: int, num_layers: int) -> dict:
  # Official placement: fused QKV (separate q, k, v) and attention out, in the trainable (every 6th) blocks.
  return dict(rank=rank, alpha=1.0, targets="q,k,v,out", blocks="every:6" if num_layers >= 6 else "all")


# The motion LoRA and its stage-2 recipe. "official": the paper's placement (rank 8 on q, k, v, out of every 6th
# block, lora_alpha 1 → update scale 1/8), lr 1e-3. "tuned" (the default): the same targets and rank in every
# block with alpha = rank (scale 1). Measured on one H200 (issue 22, `small`, stage 1 2,500 steps of
# learn_gpu.py, stage 2 1,000 steps, 16 validation prompts, 50 DDIM steps): frame change with the LoRA on / removed
# 0.92 official, 0.71 tuned; the generate task alone with timesteps weighted to high noise
# (diffusion.timestep_power=3) gave 0.78. Neither reaches the 0.25.
MOTION = {
  "official": dict(adapter=dict(alpha=1.0, targets="q,k,v,out", blocks="every:6"), lr=1e-3),
  "tuned": dict(adapter=dict(alpha=8.0, targets="q,k,v,out", blocks="all"), lr=1e-3),
}
SYNTH = "layerflow_synthetic"
# Every argument of configs/default.py (size, layout, gpu, tpu, encoders, …, forwarded to it) and the stages' own.
ARGS = dict(
  default.ARGS,
  stage="stage1_base",
  demo=False,
  motion_rank=8,
  content_rank=256,
  image_weight=0.5,
  motion_placement="tuned",
  quality_gap=False,
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = common.parse_arg(arg, **ARGS)
  if a.stage not in STAGES:
    raise ValueError(f"stage {a.stage!r} unknown; expected one of {STAGES}")
  if a.motion_placement not in MOTION:
    raise ValueError(f"motion_placement {a.motion_placement!r} unknown; expected one of {sorted(MOTION)}")
  c = default.get_config(common.pack_arg(a, default.ARGS))
  c.stage = a.stage
  c.stages = STAGES
  n = c.model.num_layers
  c.model.adapters = mlc.ConfigDict()
  c.train.trainable_adapters = ()
  c.train.adapter_scale_keys = mlc.ConfigDict()
  c.sampling.remove_adapters = ()
  c.sampling.adapter_scales = mlc.ConfigDict()
  c.data.mixture = [dict(name=c.data.name, weight=1.0, transform="video", motion_scale=0.0)]
  # Pretrained sizes train the official subset; small ones train from scratch, so everything trains.
  c.train.trainable = "official_base" if a.size in ("2b", "5b") else "all"
  c.train.lr = 1e-4

  motion = MOTION[a.motion_placement]
  if a.stage in ("stage2_motion_lora", "stage3_content_lora"):
    c.model.adapters.motion = _adapter(a.motion_rank, n)
    c.model.adapters.motion.update(motion["adapter"])
    if c.model.adapters.motion.blocks == "every:6" and n < 6:
      c.model.adapters.motion.blocks = "all"
    c.train.adapter_scale_keys.motion = "motion_scale"
    c.train.trainable = "adapters"
  if a.stage == "stage2_motion_lora":
    c.train.init_from = "stage1_base"
    c.train.trainable_adapters = ("motion",)
    c.train.lr = motion["lr"]
    # Frozen videos: one frame of a copy-paste clip (a matted foreground pasted on another clip's background)
    # repeated over the clip.
    c.data.mixture = [
      dict(name=c.data.name, weight=1.0, transform="static", background=c.data.name, motion_scale=1.0)
    ]
  if a.stage == "stage3_content_lora":
    c.train.init_from = "stage2_motion_lora"
    c.model.adapters.content = _adapter(a.content_rank, n)
    c.train.trainable_adapters = ("content",)
    c.train.lr = 5e-3
    # Layered images repeated into static clips (motion LoRA on) mixed with copy-paste videos (motion LoRA off).
    # With real data: name="layerflow_images" for the first entry, "layerflow_folder" with
    # background="layerflow_videos" for the second (data_pipelines/pipeline.py).
    c.data.mixture = [
      dict(name=c.data.name, weight=a.image_weight, transform="static", motion_scale=1.0),
      dict(
        name=c.data.name,
        weight=1.0 - a.image_weight,
        transform="video",
        background=c.data.name,
        motion_scale=0.0,
      ),
    ]
    c.sampling.remove_adapters = ("motion",)  # inference drops the motion LoRA

  if a.quality_gap:  # the paper's sources (synthetic kinds); validation on held-out copy-paste videos
    c.data.name = f"{SYNTH}_copypaste"
    c.eval.multistage = True
    if a.stage == "stage1_base":
      c.data.mixture = [dict(name=f"{SYNTH}_lowq", weight=1.0, transform="video", motion_scale=0.0)]
    if a.stage == "stage2_motion_lora":
      c.data.mixture = [dict(name=f"{SYNTH}_copypaste", weight=1.0, transform="static", motion_scale=1.0)]
    if a.stage == "stage3_content_lora":
      c.data.mixture = [
        dict(name=f"{SYNTH}_images", weight=a.image_weight, transform="static", motion_scale=1.0),
        dict(name=f"{SYNTH}_copypaste", weight=1.0 - a.image_weight, transform="video", motion_scale=0.0),
      ]

  if a.demo:  # `make demo`: a 2-core CPU finishes all three stages in a few minutes
    c.data.num_train, c.data.num_validation, c.data.batch_size = 512, 16, 8
    # Two blocks: unrolled. Scanned, XLA's CPU backward zero-fills stacked residual buffers every step (a
    # [layers, B, heads, N, N] copy of the attention weights among them): 240 vs 169 ms a step on an AVX2-only
    # 2-core run (benchmarks/cpu_step.py). Batch 8 stays: at batch 6 or 4 (same steps) alpha IoU fell to 0.18/0.06.
    c.model.scan_layers = False
    # 10 DDIM steps: on the demo's stage-3 model every row still beats the untrained one (alpha IoU 0.318 vs 0.311
    # at 20 steps), and sampling both models takes 33 s instead of 55 s on an AVX2-only 2-core run.
    c.sampling.num_steps = 10
    # Guidance 3, not the default 6: a model this small oversaturates at 6. On the demo's stage-3 model (16
    # validation clips, 20 steps) g 6 → 3 took generate colour 0.125 → 0.125, shape 0.125 → 0.25 and bg→fg colour
    # 0.0625 → 0.125; the untrained model stays at 0 / 0.125 / 0. Stage-1 models on 64 clips: alpha IoU 0.280 → 0.299.
    c.sampling.guidance_scale = 3.0
    c.train.log_every = 20
    c.train.checkpoint_every = 600
    c.train.warmup_steps = 20
    steps = {"stage1_base": 1800, "stage2_motion_lora": 80, "stage3_content_lora": 80}
    c.train.steps = steps[a.stage]
    if a.stage == "stage1_base":
      c.train.lr = 2e-3
      # Decomposition first: trained on all tasks at once, a model this small never learns to read the blend for
      # the alpha clip; trained on decomposition alone it does after ~1,200 steps. Then all four tasks.
      c.diffusion.curriculum_steps = 1400
      c.diffusion.curriculum_weights = mlc.ConfigDict(dict(generate=0.0, decompose=1.0, fg2bg=0.0, bg2fg=0.0))
    if a.stage != "stage1_base":
      c.model.adapters.motion.rank = min(a.motion_rank, 8)
      # alpha 1 (scale 1/8), as the demo table was measured with: on this CPU the tuned alpha 8 moved the
      # samples more, not less (frame change on / removed 1.145 vs 1.063 at alpha 1; issue 22).
      c.model.adapters.motion.alpha = 1.0
    if a.stage == "stage3_content_lora":
      c.model.adapters.content.rank = min(a.content_rank, 32)
  return c
