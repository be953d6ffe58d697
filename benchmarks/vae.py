"""CogVideoX VAE: encode and decode of 49 frames at 480 × 720 (bf16), ours (JAX) vs diffusers (PyTorch).

Both sides run the same default-config ``AutoencoderKLCogVideoX`` (CogVideoX-2B sizes, random weights: speed and
memory do not depend on the values), ours with the weights imported from the diffusers module. Encode = the
posterior mode of a [1, 49, 480, 720, 3] clip; decode = the 13 latent frames back to pixels. Each is timed after
compilation and ``--warmup`` untimed runs (median and min of ``--repeats``); peak device memory is reported per
side (diffusers: per operation; JAX: the process's high-water mark so far — tiled runs go first), and the
agreement of our outputs with diffusers' (max relative error; bf16 with random weights, so ~1e-2 is expected;
the float32 parity tests in ``tests/test_encoders.py`` check correctness at 1e-4).

  python benchmarks/vae.py                         # GPU; tiled as diffusers' enable_tiling (240 × 360 tiles)
  python benchmarks/vae.py --tiling off            # whole frames (one JSON line per run)
  python benchmarks/vae.py --small                 # CPU smoke run: a small VAE on 9 frames of 96 × 80

Prints a table and appends one line ``{"date", "device", "kind": "vae", …}`` to ``benchmarks/results.jsonl``.
Needs jax, flax, torch and diffusers in one environment. JAX's GPU preallocation is turned off so both
frameworks fit on the one device; diffusers runs first and frees its memory before JAX starts.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

# A small VAE for the CPU smoke run: 4 blocks (8× spatial, 4× temporal) of 32 channels, one resnet each.
# Its sample size 96 × 80 keeps diffusers' tiling arithmetic aligned as at 480 × 720 (tiles 48 × 40, strides 40 and
# 32 pixels = whole latents), so tiled outputs keep the clip's size.
SMALL_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_height=96, sample_width=80)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=49)
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=720)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument(
    "--tiling",
    choices=("on", "off", "both"),
    default="on",
    help="spatial tiling as diffusers' enable_tiling() (240×360 tiles at the default config)",
  )
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--small", action="store_true", help="a small VAE on 9 frames of 96×80 (CPU validation)")
  p.add_argument("--skip-torch", action="store_true", help="time ours only (no diffusers column)")
  p.add_argument("--results", default=str(common.RESULTS_FILE), help="JSONL file to append to ('' = none)")
  args = p.parse_args(argv)
  if args.small:
    args.frames, args.height, args.width = 9, 96, 80
  return args


def _timed(fn, sync, warmup: int, repeats: int) -> tuple[float, list[float], object]:
  """(first call seconds — compile for JAX, allocator warm-up for torch —, repeat times, the last output)."""
  t0 = time.perf_counter()
  out = fn()
  sync(out)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    times.append(time.perf_counter() - t0)
  return first, times, out


def _rel_err(ours, theirs):
  import numpy as np

  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def run_torch(model, x_np, *, dtype: str, tiled: bool, warmup: int, repeats: int) -> dict:
  """diffusers: the posterior mode of ``x`` and the decode of those latents (outputs kept as float32 NumPy)."""
  import torch

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  model = model.to(dev, tdtype)
  model.enable_tiling() if tiled else model.disable_tiling()
  x = torch.from_numpy(x_np.transpose(0, 4, 1, 2, 3).copy()).to(dev, tdtype)
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  out = {}
  with torch.no_grad():
    for op in ("encode", "decode"):
      if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
      if op == "encode":
        fn = lambda: model.encode(x).latent_dist.mode()
      else:
        z = out["encode"]["value_t"]
        fn = lambda z=z: model.decode(z).sample
      first, times, value = _timed(fn, sync, warmup, repeats)
      out[op] = dict(
        first_s=first,
        times=times,
        value_t=value,
        value=value.float().cpu().numpy().transpose(0, 2, 3, 4, 1),
        peak=torch.cuda.max_memory_allocated() if dev == "cuda" else None,
      )
  for op in out:
    del out[op]["value_t"]
  model.to("cpu")
  if dev == "cuda":
    torch.cuda.empty_cache()
  return out


def run_jax(cfg, state_dict, x_np, z_np, *, dtype: str, tiled: bool, warmup: int, repeats: int) -> dict:
  """Ours: the same two operations, jitted with the weights as an argument (not baked into the program)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from layerflow_jax.encoders import vae

  jdtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
  model = vae.from_state_dict(cfg, state_dict, dtype=jdtype, param_dtype=jdtype)
  graphdef, state = nnx.split(model)
  tiling = vae.Tiling.default(cfg) if tiled else None
  encode = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v, tiling))
  decode = jax.jit(lambda s, v: nnx.merge(graphdef, s).decode(v, tiling))
  x = jnp.asarray(x_np, jdtype)
  z = jnp.asarray(z_np, jdtype)
  device = jax.devices()[0]
  sync = lambda y: y.block_until_ready()
  out = {}
  for op, fn in (("encode", lambda: encode(state, x)), ("decode", lambda: decode(state, z))):
    first, times, value = _timed(fn, sync, warmup, repeats)
    stats = device.memory_stats() or {}
    out[op] = dict(
      first_s=first,
      times=times,
      value=jax.device_get(value.astype(jnp.float32)),
      peak=stats.get("peak_bytes_in_use"),
    )
  return out


def main(argv=None) -> int:
  args = _parse(argv)
  import numpy as np
  import torch
  from diffusers import AutoencoderKLCogVideoX

  from layerflow_jax.encoders import vae

  torch.manual_seed(0)
  model = AutoencoderKLCogVideoX(**(SMALL_VAE if args.small else {})).eval()
  cfg = vae.VAEConfig.from_dict(dict(model.config))
  vae.latent_frames(cfg, args.frames)  # the frame rule, before anything heavy runs
  state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  x = np.random.default_rng(0).uniform(-1, 1, (1, args.frames, args.height, args.width, 3)).astype(np.float32)
  modes = {"on": [True], "off": [False], "both": [True, False]}[args.tiling]

  import jax

  jax_device = jax.devices()[0]
  device = f"{jax_device.device_kind} ({jax_device.platform})"
  print(
    f"VAE {'small' if args.small else 'default (CogVideoX-2B)'} config, {args.frames}×{args.height}×"
    f"{args.width}, {args.dtype}, device {device}, warm-up {args.warmup}, repeats {args.repeats}",
    flush=True,
  )
  rows = []
  for tiled in modes:
    theirs = None
    if not args.skip_torch:
      theirs = run_torch(model, x, dtype=args.dtype, tiled=tiled, warmup=args.warmup, repeats=args.repeats)
      z = theirs["encode"]["value"]
    else:
      z = (
        np.random.default_rng(1)
        .standard_normal(
          (
            1,
            vae.latent_frames(cfg, args.frames),
            args.height // cfg.spatial_factor,
            args.width // cfg.spatial_factor,
            cfg.latent_channels,
          )
        )
        .astype(np.float32)
      )
    ours = run_jax(
      cfg, state_dict, x, z, dtype=args.dtype, tiled=tiled, warmup=args.warmup, repeats=args.repeats
    )
    for op in ("encode", "decode"):
      for impl, res in (("diffusers", theirs), ("ours", ours)):
        if res is None:
          continue
        r = res[op]
        rows.append(
          dict(
            op=op,
            impl=impl,
            tiling=tiled,
            median_s=common.sig(common.median(r["times"])),
            min_s=common.sig(min(r["times"])),
            first_call_s=common.sig(r["first_s"]),
            peak_gib=common.gib(r["peak"]),
            rel_err_vs_diffusers=(
              common.sig(_rel_err(r["value"], theirs[op]["value"]), 3)
              if impl == "ours" and theirs is not None
              else None
            ),
            out_shape=list(r["value"].shape),
          )
        )
      print(f"  tiling={'on' if tiled else 'off'} {op}: done", flush=True)

  header = (
    f"{'op':<7} {'tiling':<6} {'impl':<10} {'median s':>9} {'min s':>9} {'1st call s':>10} "
    f"{'peak GiB':>9} {'speed-up':>8} {'rel err':>8}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    peer = next(
      (q for q in rows if (q["op"], q["tiling"], q["impl"]) == (r["op"], r["tiling"], "diffusers")), None
    )
    speedup = f"{peer['median_s'] / r['median_s']:.2f}x" if peer and r["impl"] == "ours" else ""
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    print(
      f"{r['op']:<7} {('on' if r['tiling'] else 'off'):<6} {r['impl']:<10} {fmt(r['median_s'], '>9.4g')} "
      f"{fmt(r['min_s'], '>9.4g')} {fmt(r['first_call_s'], '>10.4g')} {fmt(r['peak_gib'], '>9')} "
      f"{speedup:>8} {fmt(r['rel_err_vs_diffusers'], '>8.2g')}"
    )

  if args.results:
    import diffusers
    import flax

    record = dict(
      date=common.utc_now(),
      device=device,
      kind="vae",
      benchmark="vae_encode_decode",
      config="small" if args.small else "default",
      frames=args.frames,
      height=args.height,
      width=args.width,
      dtype=args.dtype,
      warmup=args.warmup,
      repeats=args.repeats,
      latent_shape=list(vae.CogVideoXCodec(cfg, None).latent_shape(args.frames, args.height, args.width)),
      versions=dict(
        jax=jax.__version__, flax=flax.__version__, torch=torch.__version__, diffusers=diffusers.__version__
      ),
      torch_device=(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
      rows=rows,
    )
    common.append_jsonl(args.results, record)
    print(f"appended to {args.results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
