"""LayerFlow base config: every stage, size and variant is a few lines over this file.

Usage (argument = comma-separated ``key=value`` variants, big_vision style)::

  layerflow train --config configs/default.py:size=tiny --workdir runs/tiny
  layerflow train --config configs/default.py:size=2b,layout=rgba --config.train.steps=1000 --workdir runs/2b
  layerflow train --config configs/default.py:size=2b,encoders=cogvideox,pretrained=/ckpt/CogVideoX-2b …
  layerflow train --config configs/default.py:size=2b,gpu=1 …   # the measured GPU levers (benchmarks/RESULTS.md)
  layerflow train --config configs/default.py:size=2b,tpu=1 …   # the TPU levers (compiler estimates, tpu_aot.py)
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  args = common.parse_arg(arg, size="tiny", layout="rgba", runlocal=False, encoders="builtin", pretrained="",
                          gpu=False, tpu=False)
  c = mlc.ConfigDict()
  c.seed = 0
  c.layout = args.layout  # "rgba": [fg, alpha, bg, blend]; "rgb": [fg, bg, blend]

  # ---------------------------------------------------------------- data
  c.data = mlc.ConfigDict()
  c.data.name = "layerflow_synthetic"  # TFDS builder
  c.data.data_dir = "data/tfds"  # TFDS data_dir (relative to the current directory)
  c.data.frames = 8  # frames per sub-clip
  c.data.height = 16
  c.data.width = 16
  c.data.num_train = 512
  c.data.num_validation = 32
  c.data.builder_seed = 0
  c.data.batch_size = 8  # global batch
  c.data.shuffle_seed = 0
  c.data.worker_count = 0  # Grain worker processes (0 = in-process)
  c.data.num_epochs = None  # None = repeat forever
  # Stage mixtures (data_pipelines/mixture.py): [{name, weight, transform: video|static, motion_scale,
  # background: "" | a dataset whose clips get this entry's foreground by copy-paste, split}].
  c.data.mixture = []
  # Imported data (data_pipelines/layerflow_{folder,images,videos}.py): source folders, sampling, bad records.
  c.data.manual_dirs = mlc.ConfigDict(dict(layerflow_folder="", layerflow_images="", layerflow_videos=""))
  c.data.frame_window = 0  # source frames the evenly spaced frames span at import (0 = the whole video)
  c.data.background_frames = 0  # frames stored per plain video (0 = data.frames; more → random windows)
  c.data.resize = "crop"  # "crop" (centre crop to the aspect ratio) | "stretch"
  c.data.max_bad_fraction = 0.05  # skipped (corrupt/malformed) records allowed before the import stops
  # Augmentation (training mixtures): temporal stride, random crop (min area; 1 = off), copy-paste, prompts.
  c.data.max_frame_stride = 1
  c.data.random_crop = 1.0
  c.data.copy_paste = mlc.ConfigDict(dict(scale_min=0.5, scale_max=1.0, flip=0.5, prompt="{fg} over {bg}"))
  c.data.prompt_dropout = 0.0  # per-layer prompt → "" (diffusion.prompt_dropout drops whole embeddings)
  # Latent cache (`layerflow data cache`): train on stored latents + text embeddings instead of pixels.
  c.data.cached = False
  c.data.cache_dir = "data/latents"
  c.data.cache_dtype = "float32"  # "float32" | "float16"

  # ---------------------------------------------------------------- encoders
  # The pixel codec is lossless (space-to-depth), so a token carries 3·spatial²·temporal·patch² values; keep that
  # at or below the model width (24 channels × 2×2 patch = 96 ≤ 128 for tiny), or the model cannot even
  # reproduce its input at low noise.
  # `encoders=cogvideox,pretrained=DIR` selects CogVideoX's T5-v1.1-XXL and 3D causal VAE from a diffusers pipeline
  # directory (DIR/text_encoder, DIR/tokenizer, DIR/vae); path / tokenizer / dtype / attention_mask / tiling are
  # read by those kinds only. The VAE takes 1 + 8k or 8k frames per clip and sizes divisible by 8.
  c.text_encoder = mlc.ConfigDict(dict(kind="byte", max_length=32, dim=64, seed=0, path="", tokenizer="",
                                       dtype="float32", attention_mask=False))
  c.autoencoder = mlc.ConfigDict(dict(kind="pixel", spatial=2, temporal=2, scaling_factor=1.0, path="",
                                      dtype="float32", tiling=True, tile_height=0, tile_width=0))
  c.autoencoder.latent_channels = 16  # kind "latent" (latents only, no pixel codec) reads it
  # Encode the packed stack in one pass (no per-clip split, no frame batching or tiling: the official SAT code),
  # and with it draw the posterior instead of its mode (sampling's given clips).
  c.autoencoder.packed_pass = False
  c.autoencoder.sample_posterior = False
  if args.encoders == "cogvideox":
    root = args.pretrained.rstrip("/")
    c.text_encoder.update(kind="t5", max_length=226, dim=4096, dtype="bfloat16",
                          path=f"{root}/text_encoder" if root else "",
                          tokenizer=f"{root}/tokenizer" if root else "")
    c.autoencoder.update(kind="cogvideox", dtype="bfloat16", path=f"{root}/vae" if root else "")
  elif args.encoders != "builtin":
    raise ValueError(f"config argument encoders={args.encoders!r} unknown; expected 'builtin' or 'cogvideox'")

  # ---------------------------------------------------------------- model
  c.model = common.model_config(args.size)
  c.model.precision = "bf16"  # "bf16" (no FP8) | "fp8_attention" | "fp8_gemm" | "fp8": FP8 on Hopper (model/fp8.py)
  if args.gpu:  # what benchmarks/train_step.py measured fastest on one H200 (same values, bf16 compute)
    c.model.update(dict(dtype="bfloat16", attention="cudnn", remat="dots_attention", fused_qkv=True,
                        pad_tokens_to=64))
  if args.gpu and args.tpu:
    raise ValueError("config arguments gpu=1 and tpu=1 exclude each other")
  if args.tpu:  # splash attention on a joint sequence padded to its 512-token blocks, bf16 compute; the remat and
    # mesh with which benchmarks/tpu_aot.py compiled 2B to fit v5p-8 and v6e-8 (compiler estimates, not measurements)
    c.model.update(dict(dtype="bfloat16", attention="splash", pad_tokens_to=512, remat="save_attention"))

  # ---------------------------------------------------------------- diffusion
  c.diffusion = mlc.ConfigDict()
  c.diffusion.num_train_timesteps = 1000
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.snr_shift = 3.0
  c.diffusion.zero_terminal_snr = True
  # Each example's task is drawn from these weights (the demo trains one model for all four tasks).
  c.diffusion.task_weights = mlc.ConfigDict(dict(generate=1.0, decompose=1.0, fg2bg=1.0, bg2fg=1.0))
  # A task curriculum: the first `curriculum_steps` steps draw tasks from `curriculum_weights` (0 = off).
  c.diffusion.curriculum_steps = 0
  c.diffusion.curriculum_weights = mlc.ConfigDict(dict(generate=1.0, decompose=1.0, fg2bg=1.0, bg2fg=1.0))
  # Training timesteps t = floor(N · u^(1/p)): 1 = uniform (the paper), > 1 weighted towards high noise.
  c.diffusion.timestep_power = 1.0
  c.diffusion.prompt_dropout = 0.1  # p of replacing an example's prompts by the zero embedding
  # task → the packed latent frame indices it gives, instead of its whole clips (official RGB decomposition:
  # the last 2 latent frames of the blend clip)
  c.diffusion.given_latent_frames = mlc.ConfigDict()

  # ---------------------------------------------------------------- sampling
  c.sampling = mlc.ConfigDict()
  c.sampling.sampler = "ddim"  # "ddim" (trailing) | "dpmpp_2m" | "sat_dpmpp_2m" (the official SAT sampler)
  c.sampling.num_steps = 50
  c.sampling.guidance_scale = 6.0
  c.sampling.dynamic_cfg = False
  c.sampling.dynamic_cfg_steps = 0  # N of the dynamic curve ((N - t) / N)^5: 0 = num_train_timesteps; official: 50
  c.sampling.eta = 0.0
  c.sampling.remove_adapters = ()  # adapters removed before sampling (stage 3: the motion LoRA)
  c.sampling.adapter_scales = mlc.ConfigDict()  # fixed scales for the adapters kept

  # ---------------------------------------------------------------- evaluation
  # multistage: also the metrics of the multi-stage mechanism (layerflow_jax/evaluate.py: multistage_metrics) on
  # the held-out clips of image_data (high-quality layered images) and video_data (videos).
  c.eval = mlc.ConfigDict(dict(num_batches=2, multistage=False, image_data="layerflow_synthetic_images",
                               video_data="layerflow_synthetic_copypaste"))

  # ---------------------------------------------------------------- training
  c.train = mlc.ConfigDict()
  c.train.steps = 1000
  c.train.lr = 1e-4
  c.train.warmup_steps = 50
  c.train.lr_schedule = "cosine"  # "cosine" | "constant"
  c.train.min_lr_ratio = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.weight_decay = 1e-4
  c.train.grad_clip = 1.0
  c.train.grad_accum = 1
  c.train.ema_decay = 0.0  # 0 = no EMA; otherwise sampling uses the EMA parameters
  c.train.trainable = "all"  # "all" | "official_base" | "adapters"
  c.train.trainable_adapters = ()  # with trainable="adapters": which ones (empty = all)
  c.train.adapter_scale_keys = mlc.ConfigDict()  # adapter → batch key of its per-sample scale
  c.train.max_consecutive_nonfinite = 20  # non-finite steps in a row (each skipped) before the run stops
  c.train.inject_nan_steps = ()  # fault injection (tests): these steps' batches become NaN
  c.train.log_every = 10
  c.train.eval_every = 0  # 0 = only at the end
  c.train.sample_every = 0
  c.train.checkpoint_every = 100  # steps (0 = off)
  c.train.checkpoint_every_seconds = 0.0  # and/or at least this long after the previous checkpoint (0 = off)
  c.train.keep_checkpoints = 2
  c.train.init_from = ""  # a checkpoint dir to start the parameters from (fresh optimizer)
  # A resume whose config differs from the checkpoint's (beyond steps, logging and checkpoint cadence) is
  # refused, listing the keys; True lets it go on (with a warning naming them).
  c.train.allow_config_change = False

  # ---------------------------------------------------------------- mesh
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
  # Multi-slice TPU / multi-host: how many of each axis's devices lie across the data-centre network (the rest
  # within a slice / host); e.g. 2 slices of 64: data=-1, fsdp=64, dcn.data=2 (layerflow_jax/sharding.py).
  c.mesh.dcn = mlc.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1))
  if args.tpu:  # ZeRO-3 over the slice's ICI; several slices: --config.mesh.data=S --config.mesh.dcn.data=S
    c.mesh.update(dict(data=1, fsdp=-1))

  if args.runlocal:
    c.train.steps = 4
    c.data.num_train, c.data.num_validation, c.data.batch_size = 16, 4, 2
  return c
