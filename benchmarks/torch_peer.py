"""The PyTorch peer of issue 6: diffusers ``CogVideoXTransformer3DModel`` on the same shape, timed the same way.

train   2B defaults with ``max_text_seq_length = 3 × 226 = 678``; hidden_states [1, 16, 16, 60, 90],
        encoder_hidden_states [1, 678, 4096]; fp32 weights under bf16 autocast, fused AdamW,
        ``enable_gradient_checkpointing()``; the whole step (noise, v-target, forward, loss, backward, optimizer)
        under ``torch.compile``. The first call (compile) is reported, then the median of ``--steps`` steps, each
        ended by ``torch.cuda.synchronize()``.
sample  a diffusers-style loop (as ``CogVideoXPipeline.__call__``): 50 trailing DDIM steps of
        ``CogVideoXDDIMScheduler`` (the 2B scheduler config), CFG on the doubled batch [uncond; cond] with guidance 6,
        the transformer in bf16 weights (``torch_dtype=torch.bfloat16``), eager unless ``--sample-compile``.

Imports no jax. ``python benchmarks/torch_peer.py --modes train,sample`` (``--tiny`` for a CPU check).
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common as bc  # noqa: E402

MODES = ("train", "sample")

# CogVideoX-2b scheduler_config.json (shared/COGVIDEOX_PARITY.md: scaled_linear, v-prediction, SNR shift 3, zero
# terminal SNR, trailing spacing, set_alpha_to_one).
SCHEDULER_2B = dict(
  num_train_timesteps=1000,
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  clip_sample=False,
  set_alpha_to_one=True,
  steps_offset=0,
  prediction_type="v_prediction",
  timestep_spacing="trailing",
  rescale_betas_zero_snr=True,
  snr_shift_scale=3.0,
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--modes", default="train", help=f"comma-separated, in order: {','.join(MODES)}")
  p.add_argument("--shape", default="2b", choices=sorted(bc.SHAPES))
  p.add_argument("--tiny", action="store_true", help="same as --shape tiny (CPU validation)")
  p.add_argument(
    "--compile",
    choices=("inductor", "aot_eager", "none"),
    default="inductor",
    help="torch.compile backend for the train step (none = eager)",
  )
  p.add_argument(
    "--checkpointing",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="enable_gradient_checkpointing() (the peer: without it 2B runs out of memory at 80 GB)",
  )
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
  p.add_argument("--sample-steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=6.0)
  p.add_argument("--sample-compile", action="store_true", help="torch.compile the transformer for sampling")
  p.add_argument(
    "--matmul-tflops", type=float, default=None, help="the JAX run's bf16 matmul, for the peer's MFU"
  )
  p.add_argument("--out-json", default="")
  args = p.parse_args(argv)
  if args.tiny:
    args.shape = "tiny"
  args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in args.modes if m not in MODES]
  if bad or not args.modes:
    p.error(f"--modes: {bad or args.modes} not in {MODES}")
  if args.steps < 1 or args.warmup < 0 or args.sample_steps < 1:
    p.error("--steps and --sample-steps must be >= 1, --warmup >= 0")
  return args


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel  # noqa: E402


def device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
  if dev.type == "cuda":
    torch.cuda.synchronize()


def device_name(dev: torch.device) -> str:
  return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def peak_gib(dev: torch.device) -> float | None:
  return bc.gib(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def build_model(shape: bc.Shape, dev: torch.device) -> CogVideoXTransformer3DModel:
  """The 2B defaults; only the text length differs (three prompts); smaller model fields for ``tiny``."""
  kw: dict[str, Any] = dict(max_text_seq_length=shape.text_tokens)
  if shape.name != "2b":
    kw.update(
      num_attention_heads=shape.num_heads,
      attention_head_dim=shape.head_dim,
      num_layers=shape.num_layers,
      time_embed_dim=shape.time_embed_dim,
      text_embed_dim=shape.text_dim,
      in_channels=shape.channels,
      out_channels=shape.channels,
      sample_height=shape.height,
      sample_width=shape.width,
    )
  torch.manual_seed(0)
  with dev:  # initialise on the device (a 2B CPU init takes minutes)
    return CogVideoXTransformer3DModel(**kw)


def inputs(shape: bc.Shape, dev: torch.device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
  g = torch.Generator(device=dev).manual_seed(0)
  x0 = torch.randn(
    shape.batch,
    shape.latent_frames,
    shape.channels,
    shape.height,
    shape.width,
    generator=g,
    device=dev,
    dtype=dtype,
  )
  enc = torch.randn(shape.batch, shape.text_tokens, shape.text_dim, generator=g, device=dev, dtype=dtype)
  return x0, enc


def base_record(shape: bc.Shape, mode: str, dev: torch.device, args) -> dict[str, Any]:
  import diffusers

  return {
    "mode": mode,
    "shape": shape.name,
    "tokens": shape.tokens,
    "device": device_name(dev),
    "torch_version": torch.__version__,
    "diffusers_version": diffusers.__version__,
    "setup": (
      {
        "compile": args.compile,
        "checkpointing": bool(args.checkpointing),
        "autocast": "bfloat16",
        "weights": "float32",
        "optimizer": "AdamW(fused=True)",
      }
      if mode == "train"
      else {
        "compile": "inductor" if args.sample_compile else "none",
        "weights": "bfloat16",
        "scheduler": "CogVideoXDDIMScheduler (2B config)",
      }
    ),
  }


def add_mfu(rec: dict[str, Any], matmul: float | None) -> None:
  rec["matmul_tflops"] = matmul
  rec["mfu"] = None if not matmul else bc.sig(rec["model_tflops"] / matmul, 3)
  peak = bc.spec_peak(rec["device"])
  rec["mfu_spec"] = None if peak is None else bc.sig(rec["model_tflops"] * 1e12 / peak, 3)


def run_train(args, shape: bc.Shape, dev: torch.device) -> tuple[dict[str, Any], CogVideoXTransformer3DModel]:
  rec = base_record(shape, "train", dev, args)
  t0 = time.perf_counter()
  model = build_model(shape, dev)
  model.train()
  if args.checkpointing:
    model.enable_gradient_checkpointing()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, fused=True)
  alphas = CogVideoXDDIMScheduler(**SCHEDULER_2B).alphas_cumprod.to(dev, torch.float32)
  x0, enc = inputs(shape, dev)
  rec["params"] = sum(p.numel() for p in model.parameters())
  rec["init_s"] = round(time.perf_counter() - t0, 2)

  def train_step(x0: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(x0)
    t = torch.randint(0, alphas.shape[0], (x0.shape[0],), device=x0.device)
    a = alphas[t].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.autocast(dev.type, dtype=torch.bfloat16):
      pred = model(hidden_states=x_t, encoder_hidden_states=enc, timestep=t, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), a.sqrt() * noise - (1 - a).sqrt() * x0)  # v-prediction
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  step = train_step if args.compile == "none" else torch.compile(train_step, backend=args.compile)
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
  t0 = time.perf_counter()
  loss = step(x0, enc)
  sync(dev)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    loss = step(x0, enc)
  sync(dev)
  warm = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    loss = step(x0, enc)
    sync(dev)
    times.append(time.perf_counter() - t)
  step_s = bc.median(times)
  flops = bc.train_flops(shape.num_layers, shape.tokens, shape.hidden, shape.batch)
  rec.update(
    {
      "step_ms": round(step_s * 1e3, 2),
      "step_ms_all": [round(t * 1e3, 2) for t in times],
      "first_step_s": round(first, 2),
      "warmup_s": round(warm, 2),
      "tokens_per_s": round(shape.tokens * shape.batch / step_s, 1),
      "model_flops": flops,
      "model_tflops": bc.sig(flops / step_s / 1e12),
      "loss": float(loss),
      "peak_mem_gib": peak_gib(dev),
    }
  )
  add_mfu(rec, args.matmul_tflops)
  return rec, model  # the optimizer state goes with this frame (main resets dynamo's graphs before sampling)


def run_sample(
  args, shape: bc.Shape, dev: torch.device, model: CogVideoXTransformer3DModel | None
) -> dict[str, Any]:
  rec = base_record(shape, "sample", dev, args)
  t0 = time.perf_counter()
  if model is None:
    model = build_model(shape, dev)
  model = model.to(torch.bfloat16).eval()
  if getattr(model, "gradient_checkpointing", False):
    model.disable_gradient_checkpointing()
  transformer = torch.compile(model) if args.sample_compile else model
  scheduler = CogVideoXDDIMScheduler(**SCHEDULER_2B)
  x0, enc = inputs(shape, dev, torch.bfloat16)
  prompt_embeds = torch.cat([torch.zeros_like(enc), enc])  # [uncond; cond]
  rec["init_s"] = round(time.perf_counter() - t0, 2)
  if dev.type == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)

  def denoise(num_steps: int) -> torch.Tensor:
    """CogVideoXPipeline.__call__'s loop (no dynamic CFG, no rotary embeddings at 2B)."""
    scheduler.set_timesteps(num_steps, device=dev)
    latents = (
      torch.randn(
        x0.shape, generator=torch.Generator(device=dev).manual_seed(1), device=dev, dtype=torch.bfloat16
      )
      * scheduler.init_noise_sigma
    )
    for t in scheduler.timesteps:
      latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
      noise_pred = transformer(
        hidden_states=latent_in,
        encoder_hidden_states=prompt_embeds,
        timestep=t.expand(latent_in.shape[0]),
        return_dict=False,
      )[0].float()
      uncond, cond = noise_pred.chunk(2)
      noise_pred = uncond + args.guidance * (cond - uncond)
      latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0].to(torch.bfloat16)
    return latents

  with torch.no_grad():
    t0 = time.perf_counter()
    denoise(1)  # warm-up: kernels, allocator (and the compile with --sample-compile)
    sync(dev)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = denoise(args.sample_steps)
    sync(dev)
    total = time.perf_counter() - t0
  flops = args.sample_steps * bc.forward_flops(shape.num_layers, shape.tokens, shape.hidden, 2 * shape.batch)
  rec.update(
    {
      "num_steps": args.sample_steps,
      "guidance_scale": args.guidance,
      "sample_s": round(total, 3),
      "step_ms": round(total / args.sample_steps * 1e3, 2),
      "warmup_s": round(warm, 2),
      "model_flops": flops,
      "model_tflops": bc.sig(flops / total / 1e12),
      "finite": bool(torch.isfinite(out).all()),
      "peak_mem_gib": peak_gib(dev),
    }
  )
  add_mfu(rec, args.matmul_tflops)
  return rec


def main(args: argparse.Namespace) -> int:
  dev = device()
  shape = bc.SHAPES[args.shape]
  print(f"torch {torch.__version__} on {device_name(dev)}; shape: {shape.describe()}", flush=True)
  results: list[dict[str, Any]] = []
  model = None
  for mode in args.modes:
    print(f"\n-- peer {mode}: starting", flush=True)
    t0 = time.perf_counter()
    try:
      if mode == "train":
        rec, model = run_train(args, shape, dev)
      else:
        rec = run_sample(args, shape, dev, model)
    except Exception as e:  # noqa: BLE001 — report the failure (e.g. out of memory), keep the other mode
      traceback.print_exc()
      rec = base_record(shape, mode, dev, args) | {"error": f"{type(e).__name__}: {e}"[:2000]}
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n== peer {mode} on {rec['device']}", flush=True)
    for k, v in rec.items():
      if k not in ("mode", "step_ms_all"):
        print(f"  {k:22s} {v}")
    results.append(rec)
    bc.write_results(args.out_json, results)
    torch._dynamo.reset()  # drop compiled graphs (and the memory they hold) before the next mode
    gc.collect()
    if dev.type == "cuda":
      torch.cuda.empty_cache()
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main(parse_args()))
