"""TPU compile table: the 2B and 5B LayerFlow train steps compiled by the TPU compiler for TPUs this machine lacks.

Compiler estimates, not measurements. Each row lowers and compiles the real train step (``Experiment`` from
``configs/stages.py:stage=…,size=…,tpu=1``, fed latents and text embeddings as ``train_step.py`` does) for jax's
compile-only TPU devices (``jax.experimental.topologies``, libtpu — the ``tpu`` extra) and reports per chip what the
compiler says: peak memory (arguments + outputs − donated + temporaries) against the chip's HBM, FLOPs and HBM bytes
of one step (``cost_analysis`` of the step unrolled with 1 and 2 blocks, extrapolated to all blocks — XLA counts a
scanned loop's body once — plus the splash kernels' FLOPs, which Mosaic kernels do not report), the roofline
step time ``max(FLOPs / bf16 peak, bytes / HBM bandwidth)`` and the MFU that time would give for the model FLOPs of
``benchmarks/common.py`` (stage 1: every weight's gradient counted; stage 3: ``lora_flops``).

Shape: RGBA at 480×720, 4 sub-clips × 16 frames (4 latent frames each, 60×90 latents, patch 2) + 3 × 226 text
tokens: 22,278 tokens (22,528 padded to splash's 512-token blocks); one clip per chip (batch = chips), FSDP over the
slice (``tpu=1``), several slices: data over DCN. Rows are tried with the ``tpu=1`` remat first and ``full`` remat
when that does not fit.

  python benchmarks/tpu_aot.py                       # every row (2B compiles take minutes each on 2 cores)
  python benchmarks/tpu_aot.py --rows 2b:stage1_base:v5p-8,2b:stage1_base:v6e-8
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no backend; no TPU init here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks import common as bc  # noqa: E402

# Cloud TPU slice names → (topology, slices). v5p-N counts TensorCores (2 per chip), v6e-N counts chips.
TOPOLOGIES = {
  "v5p-8": ("v5p:2x2x1", 1),
  "v5p-16": ("v5p:2x2x2", 1),
  "v5p-32": ("v5p:2x2x4", 1),
  "2x v5p-8": ("v5p:2x2x1", 2),
  "v6e-8": ("v6e:2x4", 1),
  "v6e-16": ("v6e:4x4", 1),
}
STAGES = ("stage1_base", "stage3_content_lora")
ROWS = [f"{size}:{stage}:{topo}" for size in ("2b", "5b") for stage in STAGES for topo in TOPOLOGIES]
FALLBACK_REMAT = "full"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default=",".join(ROWS), help="comma-separated SIZE:STAGE:SLICE (default: all)")
  p.add_argument("--results", default=str(bc.RESULTS_FILE), help="append kind=tpu_aot lines here ('' = no)")
  return p.parse_args(argv)


def build(size: str, stage: str, chips: int, remat: str | None):
  """The stage config at the benchmark shape with one clip per chip; ``remat`` None keeps ``tpu=1``'s."""
  from benchmarks import train_step as ts
  from layerflow_jax.config import load_config

  shape = bc.SHAPES[size]
  spec = f"configs/stages.py:stage={stage},size={size},tpu=1"
  base = load_config(spec)
  m = base.model
  # train_step's own argument defaults (one declaration), with the stage config's model levers
  args = ts.parse_args(["--config", spec, "--lora-config", spec])
  args.dtype, args.attention, args.scan = m.dtype, m.attention, m.scan_layers
  args.remat, args.fused_qkv, args.pad_tokens_to = remat or m.remat, m.fused_qkv, m.pad_tokens_to
  args.precision = m.precision
  shape = bc.Shape(**{**shape.__dict__, "batch": chips})
  mode = "lora" if stage == "stage3_content_lora" else "train"
  _, config = ts.build_config(args, shape, mode)
  return spec, shape, config


def model_flops(shape, config, stage: str) -> tuple[float, str]:
  from layerflow_jax.model import lora as lora_lib

  m = config.model
  d = m.num_heads * m.head_dim
  if stage == "stage3_content_lora":
    specs = lora_lib.specs_from_config(m.adapters, m.num_layers)
    trained = [s for s in specs if s.name in tuple(config.train.trainable_adapters)]
    first = min(min(s.blocks) for s in trained)
    return bc.lora_flops(m.num_layers, first, shape.tokens, d, shape.batch), "lora_flops"
  return bc.train_flops(m.num_layers, shape.tokens, d, shape.batch), "train_flops"


def run_row(row: str) -> dict:
  from layerflow_jax import aot
  from layerflow_jax import sharding as shd

  size, stage, slice_name = row.split(":")
  topology, slices = TOPOLOGIES[slice_name]
  devices = aot.tpu_devices(topology, slices)
  chip = aot.TPU_CHIPS[devices[0].device_kind]
  out = None
  for remat in (None, FALLBACK_REMAT):
    spec, shape, config = build(size, stage, len(devices), remat)
    if slices > 1:
      config = shd.multislice_config(config, len(devices) // slices, slices)
    r = aot.compile_train_step(config, devices, label=row)
    out = dict(r, remat=config.model.remat)
    print(
      f"# {row}: remat={config.model.remat} peak {r['peak_GiB']:.1f} GiB of {chip['hbm_GiB']} "
      f"({'fits' if r['fits'] else 'does not fit'}), compiled in {r['compile_s']:.0f} s",
      flush=True,
    )
    if r["fits"] or config.model.remat == FALLBACK_REMAT:
      break
  flops, formula = model_flops(shape, config, stage)
  peak_total = len(devices) * chip["bf16_flops"]
  out.update(
    kind="tpu_aot",
    time=bc.utc_now(),
    row=row,
    size=size,
    stage=stage,
    slice=slice_name,
    topology=topology,
    config=spec,
    model_flops=flops,
    flops_formula=formula,
    mfu_at_estimate=flops / (peak_total * out["est_step_s"]),
    shape=shape.describe(),
    estimate="compiler estimates (memory_analysis, cost_analysis, datasheet roofline), not measurements",
  )
  return out


def format_rows(rows: list[dict]) -> str:
  head = (
    "| model | stage | slice | chips | mesh | remat | peak/chip GiB | HBM GiB | fits | TFLOP/chip/step "
    "| est. step s | MFU at est. | compile s (+ 1- and 2-block cost compiles) |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
      f"| {r['size'].upper()} | {r['stage']} | {r['slice']} | {r['devices']} | {r['mesh']} | "
      f"{r['remat']} | {r['peak_GiB']:.1f} | {r['hbm_GiB']} | {'yes' if r['fits'] else 'no'} | "
      f"{r['flops_per_chip'] / 1e12:.0f} | {r['est_step_s']:.2f} | {100 * r['mfu_at_estimate']:.0f}% | "
      f"{r['compile_s']:.0f} (+{r['cost_compile_s']:.0f}) |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax

  rows = []
  for row in [r for r in args.rows.split(",") if r]:
    rec = run_row(row)
    rec.update(jax_version=jax.__version__)
    rows.append(rec)
    if args.results:
      bc.append_jsonl(args.results, rec)
  print("Compiler estimates, not measurements:")
  print(format_rows(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
