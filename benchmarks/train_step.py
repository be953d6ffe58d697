"""The JAX side of issue 6: the project's real model and train step (and sampler) on the 2B LayerFlow shape.

What is measured is what training runs: ``Experiment`` from a named config, ``train.step.train_step`` compiled by
``compile_train_step`` (donated state, AdamW with clipping and the non-finite guard, task draw, masked v-loss) —
fed precomputed latents and text embeddings (a ``data.cached`` batch of ``data_pipelines.spec.batch_spec``, so the
codec and text encoder are bypassed; see ``build_config``).

Modes (``--modes``, comma-separated, run in order in this one process):
  train   full training step (every parameter trains) — configs/default.py:size=2b
  lora    the stage-3 step: content LoRA rank 256 on q/k/v/out of every 6th block trains, the rest frozen —
          configs/stages.py:stage=stage3_content_lora,size=2b
  sample  50-step DDIM (trailing) with classifier-free guidance on the doubled batch, one jitted ``lax.scan``

Timing: ahead-of-time lower + compile (reported), the first step, ``--warmup`` more steps, then the median of
``--steps`` steps, each ended by ``block_until_ready``. Model FLOPs follow the issue (benchmarks/common.py); MFU is
against a bf16 matmul measured here, in this process.

Levers: ``--attention xla|cudnn``, ``--remat none|full|dots|save_attention|dots_attention``, ``--dtype``,
``--fused-qkv``, ``--pad-tokens-to N`` (0 = off), ``--no-scan``, ``--precision bf16|fp8_attention|fp8_gemm|fp8``
(``model.precision``; validate refuses what a mode cannot run: FP8 attention in train/lora), ``--xla-preset`` /
``--xla-flags`` (set before jax starts), ``--override KEY=VALUE``.

  python benchmarks/train_step.py --modes train,lora,sample            # the 2B shape (GPU)
  python benchmarks/train_step.py --tiny --modes train,lora,sample     # CPU check of the whole path
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common as bc  # noqa: E402  (stdlib-only module)

MODES = ("train", "lora", "sample")
REMATS = ("none", "full", "dots", "save_attention", "dots_attention")
XLA_PRESETS = {
  "none": "",
  # Overlap of async work with compute (on one GPU: mostly copies); the JAX-Toolbox default.
  "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
  # + cuBLAS for every GEMM (no Triton GEMM), async work on the highest-priority stream.
  "tuned": (
    "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false "
    "--xla_gpu_enable_highest_priority_async_stream=true"
  ),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--modes", default="train", help=f"comma-separated, in order: {','.join(MODES)}")
  p.add_argument("--shape", default="2b", choices=sorted(bc.SHAPES))
  p.add_argument("--tiny", action="store_true", help="same as --shape tiny (CPU validation)")
  p.add_argument(
    "--config", default="", help="train/sample config (default configs/default.py:size=<shape size>)"
  )
  p.add_argument(
    "--lora-config",
    default="",
    help="LoRA config (default configs/stages.py:stage=stage3_content_lora,size=<shape size>)",
  )
  p.add_argument(
    "--override",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="config override for every mode, as --config.KEY=VALUE in the CLI (repeatable)",
  )
  p.add_argument(
    "--attention",
    choices=("xla", "cudnn"),
    default=None,
    help="jax.nn.dot_product_attention implementation (default: cudnn on GPU, xla elsewhere)",
  )
  p.add_argument("--remat", choices=REMATS, default="dots_attention")
  p.add_argument(
    "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype (params fp32)"
  )
  p.add_argument("--fused-qkv", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument(
    "--scan", action=argparse.BooleanOptionalAction, default=True, help="lax.scan over the blocks"
  )
  p.add_argument(
    "--precision",
    default="bf16",
    help="model.precision: bf16 | fp8_attention | fp8_gemm | fp8 (layerflow_jax/model/fp8.py)",
  )
  p.add_argument(
    "--pad-tokens-to",
    type=int,
    default=64,
    help="model.pad_tokens_to: pad the joint sequence to a multiple of this (padding keys masked)",
  )
  p.add_argument("--xla-preset", choices=sorted(XLA_PRESETS), default="lhs")
  p.add_argument("--xla-flags", default="", help="extra XLA flags (appended to the preset)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported; >= 5 for the issue)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  p.add_argument("--sample-steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=6.0)
  p.add_argument("--sample-repeats", type=int, default=1, help="timed sampling runs (median)")
  p.add_argument(
    "--matmul-size", type=int, default=0, help="bf16 matmul M=N=2K for the MFU reference (0: auto)"
  )
  p.add_argument("--profile", default="", help="write a jax.profiler trace of 2 more steps per mode here")
  p.add_argument("--dump-hlo", default="", help="XLA dump directory (--xla_dump_to, HLO as text)")
  p.add_argument("--mem-fraction", default="0.94", help="XLA_PYTHON_CLIENT_MEM_FRACTION unless already set")
  p.add_argument(
    "--compile-cache", default="", help="JAX persistent compilation cache dir (off: honest compile)"
  )
  p.add_argument("--out-json", default="", help="write the results (a JSON list) here after every mode")
  args = p.parse_args(argv)
  if args.tiny:
    args.shape = "tiny"
  args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in args.modes if m not in MODES]
  if bad or not args.modes:
    p.error(f"--modes: {bad or args.modes} not in {MODES}")
  if args.steps < 1 or args.warmup < 0 or args.sample_steps < 1 or args.sample_repeats < 1:
    p.error("--steps, --sample-steps and --sample-repeats must be >= 1, --warmup >= 0")
  return args


def xla_flags(args: argparse.Namespace) -> str:
  flags = [XLA_PRESETS[args.xla_preset], args.xla_flags]
  if args.dump_hlo:
    flags.append(f"--xla_dump_to={args.dump_hlo} --xla_dump_hlo_as_text")
  return " ".join(f for f in flags if f).strip()


def apply_env(args: argparse.Namespace) -> None:
  """XLA reads XLA_FLAGS (and the allocator its fraction) when jax starts, so this runs before the import."""
  flags = xla_flags(args)
  if flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


if __name__ == "__main__":
  _ARGS = parse_args()
  apply_env(_ARGS)

import re  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from layerflow_jax import sharding as shd  # noqa: E402
from layerflow_jax.config import apply_overrides, load_config  # noqa: E402
from layerflow_jax.diffusion import samplers  # noqa: E402
from layerflow_jax.model import dit  # noqa: E402
from layerflow_jax.train import partition  # noqa: E402
from layerflow_jax.train import step as step_lib  # noqa: E402
from layerflow_jax.train.experiment import Experiment  # noqa: E402

# ----------------------------------------------------------------------------- setup


def build_config(args: argparse.Namespace, shape: bc.Shape, mode: str):
  """The named config with the benchmark's shape, batch and levers written in (``--override`` applied last)."""
  if mode == "lora":
    spec = args.lora_config or f"configs/stages.py:stage=stage3_content_lora,size={shape.config_size}"
  else:
    spec = args.config or f"configs/default.py:size={shape.config_size}"
  path, sep, arg = spec.partition(":")
  if not os.path.exists(path) and (bc.ROOT / path).exists():  # run from elsewhere than the repository root
    path = str(bc.ROOT / path)
  config = load_config(path + sep + arg)
  config.data.frames = shape.frames_per_clip * 4  # the latent codec below maps these onto the latent grid
  config.data.height, config.data.width = shape.height * 8, shape.width * 8
  config.data.batch_size = shape.batch
  # Cached batches (latents and text embeddings of the shape's sizes): the latent codec gives the grid and the
  # channels, the text encoder's settings the embeddings; the model is built for both (DiTConfig.from_config).
  config.data.cached = True
  config.autoencoder.update(dict(kind="latent", spatial=8, temporal=4, latent_channels=shape.channels))
  config.text_encoder.update(dict(max_length=shape.text_len, dim=shape.text_dim))
  m = config.model
  m.dtype = args.dtype
  m.attention = args.attention
  m.remat = args.remat
  m.scan_layers = bool(args.scan)
  m.fused_qkv = bool(args.fused_qkv)
  m.pad_tokens_to = int(args.pad_tokens_to)
  m.precision = args.precision
  config.train.grad_accum = 1
  apply_overrides(config, args.override)
  want = (shape.num_layers, shape.num_heads, shape.head_dim, shape.time_embed_dim)
  have = (m.num_layers, m.num_heads, m.head_dim, m.time_embed_dim)
  if want != have:
    raise ValueError(
      f"config {spec}: model (layers, heads, head_dim, time_dim) = {have}, but shape "
      f"{shape.name!r} (and the torch peer) use {want}"
    )
  return spec, config


def make_batch(exp: Experiment, seed: int = 0) -> dict:
  """Random latents and text embeddings of the batch spec (all clips valid, motion LoRA off: stage 3's video
  clips; the compute is the same), sharded as training shards them."""
  spec = exp.batch_spec
  keys = dict(zip(("latents", "text"), jax.random.split(jax.random.key(seed))))
  make = {
    "latents": lambda s: jax.random.normal(keys["latents"], s.shape, s.dtype),
    "text": lambda s: jax.random.normal(keys["text"], s.shape, s.dtype),
    "clip_valid": lambda s: jnp.ones(s.shape, s.dtype),
    "motion_scale": lambda s: jnp.zeros(s.shape, s.dtype),
  }
  return {k: jax.device_put(make[k](s), s.sharding) for k, s in spec.items()}


def matmul_tflops(size: int, reps: int = 10) -> tuple[float, str]:
  """Achieved bf16 GEMM throughput [M=N=2·size, K=size] on this device (the MFU reference)."""
  m, k = 2 * size, size
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (m, k), jnp.bfloat16)
  b = jax.random.normal(kb, (k, m), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * m * m * k / bc.median(times) / 1e12, f"{m}x{k}x{m}"


def memory(compiled) -> dict[str, Any]:
  """Device allocator peak (process-wide, GPU only) and the executable's own peak from XLA's buffer assignment."""
  stats = jax.devices()[0].memory_stats() or {}
  ma = compiled.memory_analysis()
  exe = getattr(ma, "peak_memory_in_bytes", 0) or (
    ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
  )
  return {
    "peak_mem_gib": bc.gib(stats.get("peak_bytes_in_use")),
    "exe_mem_gib": bc.gib(exe),
    "temp_mem_gib": bc.gib(ma.temp_size_in_bytes),
  }


def attention_kernels(compiled) -> dict[str, int]:
  """Fused-attention custom calls in the optimized HLO by target (fwd / bwd): shows what remat recomputes."""
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001 — diagnostics only
    return {}
  found: dict[str, int] = {}
  for target in re.findall(r'custom_call_target="([^"]*fmha[^"]*)"', text):
    found[target] = found.get(target, 0) + 1
  return found


def levers(args: argparse.Namespace, config=None) -> dict[str, Any]:
  """The settings measured: from the final config (after ``--override``) where there is one."""
  m = config.model if config is not None else None
  pick = lambda key, flag: m.get(key) if m is not None else flag  # noqa: E731
  return {
    "attention": pick("attention", args.attention),
    "remat": pick("remat", args.remat),
    "dtype": pick("dtype", args.dtype),
    "fused_qkv": bool(pick("fused_qkv", args.fused_qkv)),
    "scan_layers": bool(pick("scan_layers", args.scan)),
    "pad_tokens_to": int(pick("pad_tokens_to", args.pad_tokens_to)),
    "precision": pick("precision", args.precision),
    "xla_flags": xla_flags(args),
    "overrides": list(args.override),
  }


def base_record(args, shape: bc.Shape, mode: str, spec: str, config=None) -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
    "mode": mode,
    "config": spec,
    "shape": shape.name,
    "shape_desc": shape.describe(),
    "tokens": shape.tokens,
    "device": dev.device_kind,
    "platform": dev.platform,
    "jax_version": jax.__version__,
    "levers": levers(args, config),
  }


def print_record(rec: dict[str, Any]) -> None:
  print(f"\n== {rec['mode']} ({rec['config']}) on {rec['device']}", flush=True)
  skip = {"mode", "config", "levers", "step_ms_all", "shape_desc"}
  for k, v in rec.items():
    if k not in skip:
      print(f"  {k:22s} {v}")
  print(f"  {'levers':22s} {rec['levers']}", flush=True)


# ----------------------------------------------------------------------------- modes


def check_precision(config, training: bool) -> None:
  """What ``validate`` refuses for ``model.precision`` on this device (e.g. FP8 attention in a train step)."""
  from layerflow_jax import validate

  dev = jax.devices()[0]
  validate.check_precision(config, dev.platform, getattr(dev, "compute_capability", None), training=training)


def run_train(args, shape: bc.Shape, mode: str, matmul: float | None) -> dict[str, Any]:
  spec, config = build_config(args, shape, mode)
  check_precision(config, training=True)
  mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  exp = Experiment(config, mesh)
  rec = base_record(args, shape, mode, spec, config)
  t0 = time.perf_counter()
  with shd.use_mesh(mesh):
    state = exp.init_state()
    jax.block_until_ready(state)
  rec["init_s"] = round(time.perf_counter() - t0, 2)
  rec["params"] = int(sum(np.prod(v.shape) for v in exp.abstract_params.values()))
  rec["trainable_params"] = int(partition.count(state.trainable))
  batch = make_batch(exp)
  fn = step_lib.compile_train_step(exp, exp.state_shardings(state), None)

  with shd.use_mesh(mesh):
    t0 = time.perf_counter()
    lowered = fn.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    t4 = time.perf_counter()
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
    if args.profile:
      with jax.profiler.trace(os.path.join(args.profile, mode), create_perfetto_trace=True):
        for _ in range(2):
          state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
      rec["profile"] = profile_breakdown(os.path.join(args.profile, mode), steps=2)

  step_s = bc.median(times)
  cfg = exp.model_cfg
  if mode == "lora":
    names = {p.split(".")[1] for p in exp.selection if p.startswith("adapters.")}
    trained = [s for s in cfg.adapters if s.name in names]
    first = min(min(s.blocks) for s in trained)
    flops = bc.lora_flops(cfg.num_layers, first, shape.tokens, cfg.hidden, shape.batch)
    rec["flops_formula"] = f"lora_flops (frozen base; blocks < {first} forward only)"
    rec["adapters"] = {
      s.name: {"rank": s.rank, "blocks": list(s.blocks), "targets": list(s.targets)} for s in cfg.adapters
    }
    rec["trained_adapters"] = [s.name for s in trained]
  else:
    flops = bc.train_flops(cfg.num_layers, shape.tokens, cfg.hidden, shape.batch)
    rec["flops_formula"] = "30 x (72 N d^2 + 12 N^2 d)" if shape.name == "2b" else "L x (72 N d^2 + 12 N^2 d)"
  loss = float(metrics["loss"])
  rec.update(
    {
      "step_ms": round(step_s * 1e3, 2),
      "step_ms_all": [round(t * 1e3, 2) for t in times],
      "tokens_per_s": round(shape.tokens * shape.batch / step_s, 1),
      "lower_s": round(t1 - t0, 2),
      "compile_s": round(t2 - t0, 2),
      "first_step_s": round(t3 - t0, 2),
      "warmup_s": round(t4 - t3, 2),
      "model_flops": flops,
      "model_tflops": bc.sig(flops / step_s / 1e12),
      "loss": loss,
      "loss_finite": bool(np.isfinite(loss)),
      "skipped_nonfinite": int(metrics["skipped_nonfinite"]),
    }
  )
  _add_mfu(rec, matmul)
  rec.update(memory(compiled))
  rec["attention_kernels"] = attention_kernels(compiled)
  return rec


def run_sample(args, shape: bc.Shape, matmul: float | None) -> dict[str, Any]:
  spec, config = build_config(args, shape, "sample")
  check_precision(config, training=False)
  mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  exp = Experiment(config, mesh)
  rec = base_record(args, shape, "sample", spec, config)
  dtype = jnp.dtype(args.dtype)

  def init_params():
    with nnx.use_eager_sharding(False):
      model = dit.LayerFlowDiT(exp.model_cfg, rngs=nnx.Rngs(0))
    flat = partition.flatten(nnx.state(model).to_pure_dict())
    # Weights in the compute dtype, as a diffusers pipeline loads them (torch_dtype=bfloat16).
    return {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in flat.items()}

  num_steps, g = args.sample_steps, args.guidance

  def sample(params, text, x_T):
    model = exp.model(params)
    b = x_T.shape[0]
    both_text = jnp.concatenate([text, jnp.zeros_like(text)], axis=0)  # [cond; uncond] as LayeredSampler

    def velocity(x, t):
      v = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_text)
      return v[:b], v[b:]

    return samplers.sample(
      velocity, x_T, sched=exp.schedule, num_steps=num_steps, sampler="ddim", guidance_scale=g
    )

  batch = make_batch(exp)
  x_T = jax.random.normal(jax.random.key(2), batch["latents"].shape, jnp.float32)
  with shd.use_mesh(mesh):
    t0 = time.perf_counter()
    params = jax.jit(init_params)()
    jax.block_until_ready(params)
    rec["init_s"] = round(time.perf_counter() - t0, 2)
    fn = jax.jit(sample)
    t0 = time.perf_counter()
    compiled = fn.lower(params, batch["text"], x_T).compile()
    t1 = time.perf_counter()
    times = []
    for _ in range(args.sample_repeats):
      t = time.perf_counter()
      out = compiled(params, batch["text"], x_T)
      out.block_until_ready()
      times.append(time.perf_counter() - t)
    if args.profile:
      with jax.profiler.trace(os.path.join(args.profile, "sample"), create_perfetto_trace=True):
        compiled(params, batch["text"], x_T).block_until_ready()
      rec["profile"] = profile_breakdown(os.path.join(args.profile, "sample"), steps=num_steps)
  total = bc.median(times)
  cfg = exp.model_cfg
  flops = num_steps * bc.forward_flops(cfg.num_layers, shape.tokens, cfg.hidden, 2 * shape.batch)
  rec.update(
    {
      "num_steps": num_steps,
      "guidance_scale": g,
      "sample_s": round(total, 3),
      "sample_s_all": [round(t, 3) for t in times],
      "step_ms": round(total / num_steps * 1e3, 2),
      "compile_s": round(t1 - t0, 2),
      "model_flops": flops,
      "model_tflops": bc.sig(flops / total / 1e12),
      "finite": bool(np.all(np.isfinite(np.asarray(out)))),
    }
  )
  _add_mfu(rec, matmul)
  rec.update(memory(compiled))
  rec["attention_kernels"] = attention_kernels(compiled)
  return rec


def profile_breakdown(trace_dir: str, steps: int) -> dict[str, Any]:
  """The trace's kernel time per category (benchmarks/profile_summary.py), printed and returned for the record."""
  from benchmarks import profile_summary

  try:
    s = profile_summary.summarize(
      profile_summary.load_events(profile_summary.find_trace(pathlib.Path(trace_dir))), steps
    )
  except (OSError, ValueError) as e:  # e.g. a CPU trace has no device streams
    return {"error": f"{type(e).__name__}: {e}"}
  print(profile_summary.format_table(s), flush=True)
  return s


def _add_mfu(rec: dict[str, Any], matmul: float | None) -> None:
  rec["matmul_tflops"] = bc.sig(matmul)
  rec["mfu"] = None if not matmul else bc.sig(rec["model_tflops"] / matmul, 3)
  peak = bc.spec_peak(rec["device"])
  rec["mfu_spec"] = None if peak is None else bc.sig(rec["model_tflops"] * 1e12 / peak, 3)


def main(args: argparse.Namespace) -> int:
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
  on_gpu = jax.devices()[0].platform == "gpu"
  if args.attention is None:
    args.attention = "cudnn" if on_gpu else "xla"
  shape = bc.SHAPES[args.shape]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; shape: {shape.describe()}", flush=True)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  size = args.matmul_size or (8192 if on_gpu else 256)
  matmul, mshape = matmul_tflops(size)
  print(f"bf16 matmul {mshape}: {bc.sig(matmul)} TFLOP/s", flush=True)
  results = []
  for mode in args.modes:
    print(f"\n-- {mode}: starting", flush=True)
    t0 = time.perf_counter()
    try:
      rec = run_sample(args, shape, matmul) if mode == "sample" else run_train(args, shape, mode, matmul)
    except Exception as e:  # noqa: BLE001 — one failing mode (e.g. out of memory) must not hide the others
      traceback.print_exc()
      rec = base_record(args, shape, mode, args.config or "") | {"error": f"{type(e).__name__}: {e}"[:2000]}
    rec["matmul_shape"] = mshape
    if results and rec.get("peak_mem_gib") is not None:
      rec["peak_mem_note"] = "process-wide peak, includes the modes run before this one (see exe_mem_gib)"
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    print_record(rec)
    results.append(rec)
    bc.write_results(args.out_json, results)
    jax.clear_caches()
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main(_ARGS))
