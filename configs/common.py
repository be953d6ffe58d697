"""Pieces shared by the config files: argument parsing and the model size table."""

from __future__ import annotations

import ml_collections as mlc

# CogVideoX sizes (2b/5b exact) and small ones for tests, the demo and single-GPU experiments.
MODEL_SIZES = {
    #        layers heads head_dim time_dim  pos      text_dim
    "tiny": dict(num_layers=2, num_heads=4, head_dim=32, time_embed_dim=128, pos_embed="sincos"),
    "small": dict(num_layers=8, num_heads=8, head_dim=64, time_embed_dim=256, pos_embed="sincos"),
    "2b": dict(num_layers=30, num_heads=30, head_dim=64, time_embed_dim=512, pos_embed="sincos"),
    "5b": dict(num_layers=42, num_heads=48, head_dim=64, time_embed_dim=512, pos_embed="rope"),
}


def model_config(size: str) -> mlc.ConfigDict:
  if size not in MODEL_SIZES:
    raise ValueError(f"model size {size!r} unknown; expected one of {sorted(MODEL_SIZES)}")
  m = mlc.ConfigDict()
  m.size = size
  m.update(MODEL_SIZES[size])
  m.patch_size = 2
  m.mlp_ratio = 4
  m.norm_eps = 1e-5
  m.qk_norm_eps = 1e-6
  m.spatial_interpolation_scale = 1.875
  m.temporal_interpolation_scale = 1.0
  m.layer_embed = "text"  # "none" | "text" (official) | "text+video"
  m.num_prompts = 3  # prompts per example ("0, fg", "1, bg", "2, blend"; the official decomposition models: 2)
  # pos_embed "learned" (official SAT table incl. text rows): the latent frames it covers (0 = the packed frames)
  m.pos_table_frames = 0
  m.lead_frames = 0  # latent frames before the first sub-clip (official fg2bg/bg2fg RGBA: 1 duplicated frame)
  m.final_norm_eps = 0.0  # eps of the final adaLN LayerNorm; 0 = norm_eps (diffusers); official SAT: 1e-6
  m.clip_positions = "video"  # "video" (official: positions run over the packed time axis) | "clip"
  m.given_embed = False  # a learned vector on the video tokens of given clips (not official; helps multi-task)
  m.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); parameters stay float32
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat = "none"  # "none" | "full" | "save_attention" | "dots" | "dots_attention"
  m.attention = "xla"  # "xla" | "cudnn" (jax.nn.dot_product_attention) | "chunked" (exact, 1024 queries at a time)
  #                     | "splash" (Pallas TPU flash kernel; pad_tokens_to a multiple of 128)
  m.fused_qkv = False  # one matmul for q, k, v where no LoRA targets them (same values; faster on GPUs)
  m.pad_tokens_to = 0  # pad [text; video] to a multiple of this in each block, padding masked (aligned GPU GEMMs)
  # LoRA adapters: name → {rank, alpha, targets ("q,k,v,out[,ff_in,ff_out]"), blocks ("all"|"every:K"|[i, …])}
  m.adapters = mlc.ConfigDict()
  return m


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict over typed defaults (unknown keys refused)."""
  out = mlc.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; expected one of {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.strip().lower() in ("", "1", "true", "yes", "on")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value.strip()
  return out
