"""LayerFlow base config: every setting is declared here once (:data:`SCHEMA`: default, doc, allowed range), and
every stage, size and variant is a few lines over this file.

Usage (argument = comma-separated ``key=value`` variants, big_vision style)::

  layerflow train --config configs/default.py:size=tiny --workdir runs/tiny
  layerflow train --config configs/default.py:size=2b,layout=rgba --config.train.steps=1000 --workdir runs/2b
  layerflow train --config configs/default.py:size=2b,encoders=cogvideox,pretrained=/ckpt/CogVideoX-2b …
  layerflow train --config configs/default.py:size=2b,gpu=1 …   # the measured GPU levers (benchmarks/RESULTS.md)
  layerflow train --config configs/default.py:size=2b,tpu=1 …   # the TPU levers (compiler estimates, tpu_aot.py)

Validation (:mod:`layerflow_jax.validate`), ``--config.KEY=VALUE`` overrides and checkpoint configs of older runs
(missing keys take these defaults) all read :data:`SCHEMA`; a key it does not declare is refused.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common

S = common.Setting
_TINY = common.MODEL_SIZES["tiny"]  # the default size's row of the size table
_TASKS = dict(generate=1.0, decompose=1.0, fg2bg=1.0, bg2fg=1.0)

SCHEMA: dict[str, common.Setting] = {
  "seed": S(
    0, "seed of the parameter initialisation and of the training noise, timesteps and tasks", "[0, inf)"
  ),
  "layout": S("rgba", 'clips of an example: "rgba" [fg, alpha, bg, blend]; "rgb" [fg, bg, blend]'),
  "stage": S("", "name of the stage this config trains (configs/stages.py; recorded with the checkpoint)"),
  "stages": S((), "the stages of a stages config in training order (`layerflow train-stages`)"),
  # ---------------------------------------------------------------- data
  "data.name": S("layerflow_synthetic", "TFDS builder of the training and validation clips"),
  "data.data_dir": S("data/tfds", "TFDS data_dir (relative to the current directory)"),
  "data.frames": S(8, "frames per sub-clip", "[1, inf)"),
  "data.height": S(16, "clip height in pixels", "[1, inf)"),
  "data.width": S(16, "clip width in pixels", "[1, inf)"),
  "data.num_train": S(512, "training examples the synthetic builders generate", "[1, inf)"),
  "data.num_validation": S(32, "validation examples (held out at import for imported data)", "[0, inf)"),
  "data.builder_seed": S(0, "seed of the synthetic dataset builders"),
  "data.batch_size": S(8, "global batch (all processes together)", "[1, inf)"),
  "data.shuffle_seed": S(0, "seed of the training shuffle"),
  "data.worker_count": S(0, "Grain worker processes (0 = in-process)", "[0, inf)"),
  "data.read_threads": S(2, "Grain threads reading records (grain.ReadOptions.num_threads)", "[0, inf)"),
  "data.prefetch_batches": S(
    4, "Grain read-ahead buffer (grain.ReadOptions.prefetch_buffer_size)", "[0, inf)"
  ),
  "data.num_epochs": S(None, "passes over the training data (None = repeat forever)", kind=int),
  "data.mixture": S(
    [],
    "stage mixtures (data_pipelines/pipeline.py; empty = one entry of data.name): [{name, weight, transform: video|static, "
    "motion_scale, background: '' | a dataset pasted under this entry's foreground, split}]",
  ),
  "data.manual_dirs.layerflow_folder": S("", "source folder of `layerflow data import` for layerflow_folder"),
  "data.manual_dirs.layerflow_images": S("", "source folder of `layerflow data import` for layerflow_images"),
  "data.manual_dirs.layerflow_videos": S("", "source folder of `layerflow data import` for layerflow_videos"),
  "data.frame_window": S(0, "source frames the evenly spaced frames span at import (0 = the whole video)"),
  "data.background_frames": S(0, "frames stored per plain video (0 = data.frames; more → random windows)"),
  "data.resize": S("crop", 'import resize: "crop" (centre crop to the aspect ratio) | "stretch"'),
  "data.max_bad_fraction": S(0.05, "skipped (corrupt/malformed) records allowed before an import stops"),
  "data.max_frame_stride": S(1, "augmentation: largest temporal stride of a training sub-clip"),
  "data.random_crop": S(1.0, "augmentation: smallest area of a random crop (1 = off)"),
  "data.copy_paste.scale_min": S(0.5, "copy-paste: smallest scale of the pasted foreground"),
  "data.copy_paste.scale_max": S(1.0, "copy-paste: largest scale of the pasted foreground"),
  "data.copy_paste.flip": S(0.5, "copy-paste: probability of a horizontal flip of the foreground"),
  "data.copy_paste.prompt": S("{fg} over {bg}", "copy-paste: blend prompt template"),
  "data.prompt_dropout": S(0.0, 'per-layer prompt → "" (diffusion.prompt_dropout drops whole embeddings)'),
  "data.cached": S(
    False, "train on stored latents + text embeddings (`layerflow data cache`) instead of pixels"
  ),
  "data.cache_dir": S("data/latents", "where `layerflow data cache` stores latents"),
  "data.cache_dtype": S("float32", 'dtype of the cached latents: "float32" | "float16"'),
  # ---------------------------------------------------------------- encoders
  # The pixel codec is lossless (space-to-depth), so a token carries 3·spatial²·temporal·patch² values; keep that
  # at or below the model width (24 channels × 2×2 patch = 96 ≤ 128 for tiny), or the model cannot even
  # reproduce its input at low noise. `encoders=cogvideox,pretrained=DIR` selects CogVideoX's T5-v1.1-XXL and 3D
  # causal VAE from a diffusers pipeline directory (DIR/text_encoder, DIR/tokenizer, DIR/vae); path / tokenizer /
  # dtype / attention_mask / tiling are read by those kinds only. The VAE takes 1 + 8k or 8k frames per clip and
  # sizes divisible by 8.
  "text_encoder.kind": S("byte", '"byte" (built-in, untrained) | "t5" (T5-v1.1 from text_encoder.path)'),
  "text_encoder.max_length": S(32, "tokens per prompt", "[1, inf)"),
  "text_encoder.dim": S(64, "text embedding width", "[1, inf)"),
  "text_encoder.seed": S(0, "seed of the byte encoder's embedding table"),
  "text_encoder.path": S("", "T5 weights folder (kind t5)"),
  "text_encoder.tokenizer": S("", "T5 tokenizer folder (kind t5)"),
  "text_encoder.dtype": S("float32", "T5 compute dtype"),
  "text_encoder.attention_mask": S(False, "mask T5's padding tokens (CogVideoX does not)"),
  "autoencoder.kind": S(
    "pixel", '"pixel" (lossless space-to-depth) | "cogvideox" (3D causal VAE) | "latent"'
  ),
  "autoencoder.spatial": S(2, "pixel codec: spatial compression"),
  "autoencoder.temporal": S(2, "pixel codec: temporal compression"),
  "autoencoder.scaling_factor": S(1.0, "latents are multiplied by this after encoding"),
  "autoencoder.path": S("", "CogVideoX VAE folder (kind cogvideox)"),
  "autoencoder.dtype": S("float32", "VAE compute dtype"),
  "autoencoder.tiling": S(True, "VAE: encode/decode in spatial tiles"),
  "autoencoder.tile_height": S(0, "VAE tile height in pixels (0 = the VAE's own)"),
  "autoencoder.tile_width": S(0, "VAE tile width in pixels (0 = the VAE's own)"),
  "autoencoder.latent_channels": S(16, 'latent channels of kind "latent" (latents only, no pixel codec)'),
  "autoencoder.packed_pass": S(
    False,
    "encode the packed stack in one pass (no per-clip split, frame batching or "
    "tiling: the official SAT code)",
  ),
  "autoencoder.sample_posterior": S(
    False, "draw the VAE posterior instead of its mode (also sampling's given clips)"
  ),
  # ---------------------------------------------------------------- model (sizes: common.MODEL_SIZES)
  "model.size": S("tiny", "row of common.MODEL_SIZES the size fields come from (or 'imported')"),
  "model.num_layers": S(_TINY["num_layers"], "transformer blocks", "[1, inf)"),
  "model.num_heads": S(_TINY["num_heads"], "attention heads", "[1, inf)"),
  "model.head_dim": S(_TINY["head_dim"], "width of one head", "[1, inf)"),
  "model.time_embed_dim": S(_TINY["time_embed_dim"], "timestep embedding width", "[1, inf)"),
  "model.pos_embed": S(_TINY["pos_embed"], '"sincos" | "rope" | "none" | "learned" (the official SAT table)'),
  "model.patch_size": S(2, "spatial patch of a token", "[1, inf)"),
  "model.mlp_ratio": S(4, "feed-forward width over the model width", "[1, inf)"),
  "model.norm_eps": S(1e-5, "LayerNorm eps"),
  "model.qk_norm_eps": S(1e-6, "q/k LayerNorm eps"),
  "model.spatial_interpolation_scale": S(1.875, "sin-cos / RoPE spatial position scale"),
  "model.temporal_interpolation_scale": S(1.0, "sin-cos / RoPE temporal position scale"),
  "model.layer_embed": S("text", '"none" | "text" (official) | "text+video"'),
  "model.num_prompts": S(3, 'prompts per example ("0, fg", "1, bg", "2, blend"; official decomposition: 2)'),
  "model.pos_table_frames": S(0, 'latent frames the "learned" table covers (0 = the packed frames)'),
  "model.lead_frames": S(0, "latent frames before the first sub-clip (official fg2bg/bg2fg RGBA: 1)"),
  "model.final_norm_eps": S(
    0.0, "eps of the final adaLN LayerNorm; 0 = norm_eps (diffusers); official: 1e-6"
  ),
  "model.clip_positions": S("video", '"video" (official: positions run over the packed time axis) | "clip"'),
  "model.given_embed": S(False, "a learned vector on the video tokens of given clips (not official)"),
  "model.dtype": S(
    "float32", 'compute dtype ("bfloat16" on accelerators); parameters stay model.param_dtype'
  ),
  "model.param_dtype": S("float32", "parameter dtype"),
  "model.scan_layers": S(True, "scan the blocks (one compiled block) instead of unrolling them"),
  "model.remat": S("none", '"none" | "full" | "save_attention" | "dots" | "dots_attention"'),
  "model.attention": S(
    "xla",
    '"xla" | "cudnn" | "chunked" (exact, 1024 queries at a time) | "splash" (Pallas '
    "TPU; pad_tokens_to a multiple of 128)",
  ),
  "model.precision": S(
    "bf16",
    '"bf16" (no FP8) | "fp8_attention" | "fp8_gemm" | "fp8": FP8 on Hopper '
    "(model/fp8.py; validate says what each needs)",
  ),
  "model.fused_qkv": S(
    False, "one matmul for q, k, v where no LoRA targets them (same values; faster on GPUs)"
  ),
  "model.pad_tokens_to": S(
    0, "pad [text; video] to a multiple of this in each block, padding masked", "[0, inf)"
  ),
  "model.adapters": S(
    {},
    'LoRA adapters: name → {rank, alpha, targets ("q,k,v,out[,ff_in,ff_out]"), blocks '
    '("all" | "every:K" | [i, …]), switch}',
  ),
  # ---------------------------------------------------------------- diffusion
  "diffusion.num_train_timesteps": S(1000, "timesteps of the training schedule", "[2, inf)"),
  "diffusion.beta_start": S(0.00085, "first beta of the scaled-linear schedule"),
  "diffusion.beta_end": S(0.012, "last beta of the scaled-linear schedule"),
  "diffusion.snr_shift": S(3.0, "SNR shift of the schedule (CogVideoX: 3)", "(0, inf)"),
  "diffusion.zero_terminal_snr": S(True, "rescale the schedule to zero terminal SNR"),
  "diffusion.task_weights": S(
    dict(_TASKS), "task → weight of drawing it for an example (all four: one model)"
  ),
  "diffusion.curriculum_steps": S(0, "the first N steps draw tasks from curriculum_weights (0 = off)"),
  "diffusion.curriculum_weights": S(dict(_TASKS), "task → weight during the curriculum"),
  "diffusion.timestep_power": S(
    1.0, "t = floor(N · u^(1/p)): 1 = uniform (the paper), > 1 towards high noise", "(0, inf)"
  ),
  "diffusion.prompt_dropout": S(
    0.1, "probability of replacing an example's prompts by the zero embedding", "[0, 1]"
  ),
  "diffusion.given_latent_frames": S(
    {},
    "task → the packed latent frames it gives instead of its whole clips "
    "(official RGB decomposition: the blend's last 2)",
  ),
  # ---------------------------------------------------------------- sampling
  "sampling.sampler": S("ddim", '"ddim" (trailing) | "dpmpp_2m" | "sat_dpmpp_2m" (the official SAT sampler)'),
  "sampling.num_steps": S(50, "sampling steps", "[1, inf)"),
  "sampling.guidance_scale": S(6.0, "classifier-free guidance scale", "[0, inf)"),
  "sampling.dynamic_cfg": S(False, "CogVideoX's dynamic guidance curve"),
  "sampling.dynamic_cfg_steps": S(
    0, "N of the dynamic curve ((N - t) / N)^5: 0 = num_train_timesteps; official: 50"
  ),
  "sampling.eta": S(0.0, "DDIM eta (0 = deterministic)"),
  "sampling.remove_adapters": S((), "adapters removed before sampling (stage 3: the motion LoRA)"),
  "sampling.adapter_scales": S({}, "adapter → fixed scale while sampling (adapters kept)"),
  # ---------------------------------------------------------------- evaluation
  "eval.num_batches": S(2, "validation batches of the training-time loss evaluation", "[0, inf)"),
  "eval.multistage": S(False, "also the multi-stage mechanism's metrics (layerflow_jax/evaluate.py)"),
  "eval.image_data": S(
    "layerflow_synthetic_images", "held-out high-quality layered images of eval.multistage"
  ),
  "eval.video_data": S("layerflow_synthetic_copypaste", "held-out videos of eval.multistage"),
  # ---------------------------------------------------------------- training
  "train.steps": S(1000, "optimizer steps (0: evaluate train.init_from as it is)", "[0, inf)"),
  "train.lr": S(1e-4, "peak learning rate", "(0, inf)"),
  "train.warmup_steps": S(50, "linear warm-up steps", "[0, inf)"),
  "train.lr_schedule": S("cosine", '"cosine" | "constant" (after the warm-up)'),
  "train.min_lr_ratio": S(0.1, "final learning rate over train.lr (cosine)", "[0, 1]"),
  "train.b1": S(0.9, "AdamW beta 1", "[0, 1)"),
  "train.b2": S(0.95, "AdamW beta 2", "[0, 1)"),
  "train.weight_decay": S(1e-4, "AdamW weight decay", "[0, inf)"),
  "train.grad_clip": S(1.0, "global gradient-norm clip (0 = off)", "[0, inf)"),
  "train.grad_accum": S(1, "micro-batches per step (each a 1/K slice of the per-process batch)", "[1, inf)"),
  "train.ema_decay": S(0.0, "EMA of the parameters (0 = none; otherwise sampling uses the EMA)", "[0, 1)"),
  "train.trainable": S("all", '"all" | "official_base" | "adapters"'),
  "train.trainable_adapters": S((), 'with trainable="adapters": which ones (empty = all)'),
  "train.adapter_scale_keys": S({}, "adapter → batch key of its per-sample scale"),
  "train.max_consecutive_nonfinite": S(
    20, "non-finite steps in a row (each skipped) before the run stops", "[1, inf)"
  ),
  "train.inject_nan_steps": S((), "fault injection (tests): these steps' batches become NaN"),
  "train.log_every": S(10, "steps between metric rows", "[1, inf)"),
  "train.eval_every": S(0, "steps between validation losses (0 = only at the start and the end)", "[0, inf)"),
  "train.sample_every": S(
    0,
    "steps between sample previews of every trained task in TensorBoard and workdir/samples/step_N (0 = off)",
    "[0, inf)",
  ),
  "train.checkpoint_every": S(100, "steps between checkpoints (0 = off)", "[0, inf)"),
  "train.checkpoint_every_seconds": S(
    0.0, "and/or at least this long after the previous one (0 = off)", "[0, inf)"
  ),
  "train.keep_checkpoints": S(2, "newest checkpoints kept", "[1, inf)"),
  "train.init_from": S("", "a checkpoint dir to start the parameters from (fresh optimizer)"),
  "train.allow_config_change": S(
    False,
    "resume although the config differs from the checkpoint's beyond steps, "
    "logging and cadence (warns, naming the keys)",
  ),
  # ---------------------------------------------------------------- mesh
  # Multi-slice TPU / multi-host: mesh.dcn.* say how many of each axis's devices lie across the data-centre
  # network (the rest within a slice / host); e.g. 2 slices of 64: data=-1, fsdp=64, dcn.data=2.
  "mesh.data": S(-1, "data-parallel devices (-1 = the rest)"),
  "mesh.fsdp": S(1, "parameter-sharded data-parallel devices (-1 = the rest)"),
  "mesh.tensor": S(1, "tensor-parallel devices (-1 = the rest)"),
  "mesh.sequence": S(1, "sequence-parallel devices (-1 = the rest)"),
  "mesh.dcn.data": S(1, "of mesh.data, the factor across the data-centre network"),
  "mesh.dcn.fsdp": S(1, "of mesh.fsdp, the factor across the data-centre network"),
  "mesh.dcn.tensor": S(1, "of mesh.tensor, the factor across the data-centre network"),
  "mesh.dcn.sequence": S(1, "of mesh.sequence, the factor across the data-centre network"),
}

# The config arguments (``configs/default.py:size=2b,gpu=1``); variants over this file accept all of them.
ARGS = dict(
  size="tiny", layout="rgba", runlocal=False, encoders="builtin", pretrained="", gpu=False, tpu=False
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  args = common.parse_arg(arg, **ARGS)
  c = common.build(SCHEMA)
  c.layout = args.layout
  if args.encoders == "cogvideox":
    root = args.pretrained.rstrip("/")
    c.text_encoder.update(
      kind="t5",
      max_length=226,
      dim=4096,
      dtype="bfloat16",
      path=f"{root}/text_encoder" if root else "",
      tokenizer=f"{root}/tokenizer" if root else "",
    )
    c.autoencoder.update(kind="cogvideox", dtype="bfloat16", path=f"{root}/vae" if root else "")
  elif args.encoders != "builtin":
    raise ValueError(f"config argument encoders={args.encoders!r} unknown; expected 'builtin' or 'cogvideox'")

  c.model.update(common.model_size(args.size))
  if args.gpu:  # what benchmarks/train_step.py measured fastest on one H200 (same values, bf16 compute)
    c.model.update(
      dict(dtype="bfloat16", attention="cudnn", remat="dots_attention", fused_qkv=True, pad_tokens_to=64)
    )
  if args.gpu and args.tpu:
    raise ValueError("config arguments gpu=1 and tpu=1 exclude each other")
  if (
    args.tpu
  ):  # splash attention on a joint sequence padded to its 512-token blocks, bf16 compute; the remat and
    # mesh with which benchmarks/tpu_aot.py compiled 2B to fit v5p-8 and v6e-8 (compiler estimates, not measurements)
    c.model.update(dict(dtype="bfloat16", attention="splash", pad_tokens_to=512, remat="save_attention"))
    # ZeRO-3 over the slice's ICI; several slices: --config.mesh.data=S --config.mesh.dcn.data=S
    c.mesh.update(dict(data=1, fsdp=-1))

  if args.runlocal:
    c.train.steps = 4
    c.data.num_train, c.data.num_validation, c.data.batch_size = 16, 4, 2
  return c
