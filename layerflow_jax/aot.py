"""``layerflow compile``: lower and compile the train step ahead of time for a topology you do not have.

  layerflow compile --config configs/stages.py:size=5b --topology cpu:8 --config.mesh.fsdp=8 …
  layerflow compile --config configs/default.py:size=2b --topology tpu:v5p:2x2x2     # needs libtpu
  layerflow compile --config … --topology gpu:8 --device-memory-gb 80

Topologies: ``cpu:N`` (or ``N``) — N fake host devices; ``tpu:NAME`` — jax's compile-only TPU devices
(``jax.experimental.topologies``, e.g. ``v5p:2x2x2``, ``v5e:4x4``; needs libtpu, the ``tpu`` extra), compiled by
the TPU compiler itself — without libtpu the command stops, it never stands fake CPUs in for a TPU;
``--num-slices S`` makes S such slices joined by the data-centre network, the config's mesh is one slice's and
``data`` gains the factor S across slices (``mesh.dcn.data = S``, the hybrid mesh of ``layerflow_jax.sharding``);
``gpu:N`` / ``gpu:HOSTSxN`` — compile-only CUDA devices where the installed jax supports them. When those are
unavailable the GPU step is compiled for that many fake CPU devices instead (said in the output): the sharding,
collectives and buffer sizes are the real program's, the temporary-buffer estimate is the CPU compiler's.

For TPU a second table gives what the TPU compiler says about one step per chip: its FLOPs and HBM bytes
(``compiled.cost_analysis()``), with the FLOPs of the Pallas splash-attention kernels added (Mosaic kernels carry no
cost estimate, see :func:`splash_kernel_flops`), and a roofline step time ``max(FLOPs / bf16 peak, bytes / HBM
bandwidth)`` from the chip's datasheet (:data:`TPU_CHIPS`). XLA's cost analysis counts a while loop's body once,
not once per trip, so for a scanned model (``model.scan_layers``) the step is also compiled unrolled with 1 and 2
blocks and the per-block cost (their difference) extrapolated to all blocks (:func:`per_step_cost`). These are
compiler estimates, not measurements.

Fake CPU devices must exist before jax starts, so that path re-runs this command in a subprocess with
``--xla_force_host_platform_device_count``; and the CLI imports this module for its parser on every command. So
jax, and the project modules that import it, are imported inside the functions that use them. The output is one row per compile of a per-device memory table from
``compiled.memory_analysis()`` (arguments, outputs, aliased by donation, temporaries, peak = args + outputs −
aliased + temps) next to the parameter and optimizer bytes per device computed from the shardings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

from layerflow_jax.config import load_config

_CHILD = "LAYERFLOW_AOT_CHILD"
GiB = 1024**3

# Per chip, from Google Cloud's TPU datasheets: HBM (GiB), dense bf16 peak (FLOP/s), HBM bandwidth (bytes/s).
# Keyed by jax's ``device_kind``.
TPU_CHIPS = {
  "TPU v4": dict(name="v4", hbm_GiB=32, bf16_flops=275e12, hbm_bytes_per_s=1228e9),
  "TPU v5 lite": dict(name="v5e", hbm_GiB=16, bf16_flops=197e12, hbm_bytes_per_s=819e9),
  "TPU v5": dict(name="v5p", hbm_GiB=95, bf16_flops=459e12, hbm_bytes_per_s=2765e9),
  "TPU v6 lite": dict(name="v6e", hbm_GiB=32, bf16_flops=918e12, hbm_bytes_per_s=1640e9),
}


def parse_topology(text: str) -> tuple[str, str, int]:
  """``"cpu:8"`` → ``("cpu", "8", 8)``; ``"tpu:v5p:2x2x2"`` → ``("tpu", "v5p:2x2x2", 8)``; ``"gpu:2x8"`` → 16."""
  platform, _, name = text.partition(":")
  if not name:
    platform, name = "cpu", text
  platform = {"cuda": "gpu"}.get(platform, platform)
  if platform not in ("cpu", "tpu", "gpu"):
    raise ValueError(f"--topology {text!r}: platform {platform!r} unknown; expected cpu:N, tpu:NAME or gpu:N")
  dims = name.rsplit(":", 1)[-1]
  try:
    count = math.prod(int(d) for d in dims.split("x"))
  except ValueError:
    raise ValueError(
      f"--topology {text!r}: cannot read a device count from {dims!r} "
      "(expected e.g. cpu:8, gpu:2x8, tpu:v5p:2x2x2)"
    ) from None
  if count < 1:
    raise ValueError(f"--topology {text!r}: the device count must be positive")
  return platform, name, count


def tpu_devices(name: str, num_slices: int = 1) -> list:
  """jax's compile-only TPU devices for topology ``name`` (``v5p:2x2x1``), ``num_slices`` slices of it; raises
  SystemExit naming the fix when libtpu is missing or the name is unknown (never a silent CPU stand-in)."""
  # libtpu takes a host-wide lock file when it loads; compile-only devices use no chip, so a second compiling
  # process (a test next to a benchmark, a command next to training) need not wait for it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # jax inside functions (module docstring)

  try:
    return list(topologies.get_topology_desc(name, "tpu", num_slices=num_slices).devices)
  except Exception as e:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    hint = (
      ' — install the tpu extra: pip install -e ".[tpu]"'
      if importlib.util.find_spec("libtpu") is None
      else ""
    )
    raise SystemExit(
      f"error: --topology tpu:{name}: no compile-only TPU devices ({type(e).__name__}: {first}){hint}"
    ) from None


def _compile_only_devices(platform: str, name: str):
  """jax's compile-only GPU devices for ``name``, or None when this installation cannot make them."""
  from jax.experimental import topologies  # jax inside functions (module docstring)

  try:
    if platform == "gpu":
      return list(topologies.get_topology_desc(name, "cuda").devices)
  except Exception as e:  # no libtpu / CUDA plugin / unsupported name
    print(
      f"# {platform} topology {name!r} unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
      flush=True,
    )
  return None


def _bytes_per_device(tree, shardings) -> int:
  # jax inside functions (module docstring)
  import jax
  import jax.numpy as jnp
  import numpy as np

  total = 0
  for a, s in zip(
    jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "shard_shape"))
  ):
    if jnp.issubdtype(a.dtype, jax.dtypes.extended):  # RNG keys: negligible
      continue
    total += int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
  return total


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def splash_kernel_flops(model_cfg, tokens: int, batch_per_chip: float) -> float:
  """FLOPs per chip of the splash-attention kernels in one train step, which the TPU compiler's cost analysis does
  not see (a Mosaic kernel is an opaque custom call without a cost estimate).

  Per layer, sample and head over the padded joint sequence N: forward ``QKᵀ`` and ``PV`` 4·N²·D; backward the dq
  kernel (scores again, dP, dq: 6·N²·D) and the dkv kernel (scores again, dV, dP, dK: 8·N²·D); a remat policy that
  does not keep the kernel's residuals (``"attention_out"``) runs the forward once more.
  """
  if model_cfg.attention != "splash":
    return 0.0
  pad = model_cfg.pad_tokens_to
  n = -(-tokens // pad) * pad if pad else tokens
  per_call = float(n) * n * model_cfg.head_dim * model_cfg.num_heads
  recompute = model_cfg.remat in ("full", "dots")
  return batch_per_chip * model_cfg.num_layers * per_call * (4 + 14 + (4 if recompute else 0))


def _compile(config, devices):
  """(compiled, seconds, experiment, mesh) of the train step of ``config`` on ``devices``."""
  # jax and the modules that import it inside functions (module docstring)
  import jax

  from layerflow_jax import sharding as shd
  from layerflow_jax.train import step as step_lib
  from layerflow_jax.train.experiment import Experiment

  mesh = shd.make_mesh(config.mesh, devices)
  exp = Experiment(config, mesh)
  abstract = exp.abstract_state()
  shardings = exp.state_shardings(abstract)
  state_in = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  batch_in = exp.batch_spec  # the abstract global batch, with the data sharding of this mesh
  fn = step_lib.compile_train_step(exp, shardings, None)
  t0 = time.time()
  with shd.use_mesh(mesh):
    compiled = fn.lower(state_in, batch_in).compile()
  return compiled, time.time() - t0, exp, abstract, shardings


def per_step_cost(config, devices) -> tuple[float, float, float]:
  """(FLOPs, HBM bytes, seconds spent compiling) per chip of one step of all ``model.num_layers`` blocks, from
  the step compiled unrolled with 1 and 2 blocks: ``cost(1) + (L − 1) · (cost(2) − cost(1))``.

  Where only some blocks train (stage 1's official subset and stage 3's adapters sit in every 6th block), the small
  steps train every block (``train.trainable="all"`` for the base, adapters on ``"all"`` blocks): an upper bound,
  every block costed as a trained one."""
  costs, seconds = [], 0.0
  for n in (1, 2):
    small = config.copy_and_resolve_references()
    small.model.update(dict(num_layers=n, scan_layers=False))
    if small.train.trainable == "official_base":
      small.train.trainable = "all"
    for adapter in small.model.adapters.values():
      adapter.blocks = "all"
    compiled, s, *_ = _compile(small, devices)
    cost = _cost(compiled)
    costs.append((float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))))
    seconds += s
  layers = int(config.model.num_layers)
  (f1, b1), (f2, b2) = costs
  return f1 + (layers - 1) * (f2 - f1), b1 + (layers - 1) * (b2 - b1), seconds


def roofline(row: dict, chip: dict) -> dict:
  """Compute-bound and HBM-bound times per chip and their maximum, the roofline step-time estimate."""
  compute_s = row["flops_per_chip"] / chip["bf16_flops"]
  memory_s = row["bytes_per_chip"] / chip["hbm_bytes_per_s"]
  return {
    "chip": chip["name"],
    "hbm_GiB": chip["hbm_GiB"],
    "compute_s": compute_s,
    "memory_s": memory_s,
    "est_step_s": max(compute_s, memory_s),
    "fits": row["peak_GiB"] <= chip["hbm_GiB"],
  }


def compile_train_step(config, devices, *, label: str) -> dict:
  """Lowers and compiles the train step of ``config`` on ``devices``; returns a row of the memory table.

  The batch is the config's (:func:`data_pipelines.spec.batch_spec`; the benchmarks' configs are ``data.cached``
  latents). On TPU devices the row also has the compiler's FLOPs and bytes per chip and the roofline estimate.
  """
  import jax  # not at the top: fake CPU devices must be set before jax starts (module docstring)
  import numpy as np

  from data_pipelines import spec as spec_lib

  compiled, seconds, exp, abstract, shardings = _compile(config, devices)
  mesh = exp.mesh
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)
  args, out, alias, temp = (
    get("argument_size_in_bytes"),
    get("output_size_in_bytes"),
    get("alias_size_in_bytes"),
    get("temp_size_in_bytes"),
  )
  params = sum(int(np.prod(v.shape)) for v in exp.abstract_params.values())
  trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.trainable))
  shape = dict(mesh.shape)
  cost = _cost(compiled)
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  layer_s = 0.0
  if devices[0].platform == "tpu" and config.model.scan_layers and config.model.num_layers > 1:
    flops, nbytes, layer_s = per_step_cost(config, devices)
  num_text = spec_lib.NUM_PROMPTS * int(config.text_encoder.max_length)
  tokens = num_text + exp.latent_shape[0] * exp.layout.num_clips * (
    exp.latent_shape[1] // exp.model_cfg.patch_size
  ) * (exp.latent_shape[2] // exp.model_cfg.patch_size)
  kernel = splash_kernel_flops(exp.model_cfg, tokens, int(config.data.batch_size) / len(devices))
  row = {
    "config": label,
    "devices": len(devices),
    "platform": devices[0].platform,
    "mesh": "×".join(f"{a}={n}" for a, n in shape.items() if n > 1) or "1 device",
    "batch": int(config.data.batch_size),
    "params_B": params / 1e9,
    "trainable_B": trainable / 1e9,
    "tokens": exp.latent_shape[0]
    * exp.layout.num_clips
    * (exp.latent_shape[1] // exp.model_cfg.patch_size)
    * (exp.latent_shape[2] // exp.model_cfg.patch_size),
    "dtype": config.model.dtype,
    "remat": config.model.remat,
    "state_GiB": _bytes_per_device(abstract, shardings) / GiB,
    "args_GiB": args / GiB,
    "out_GiB": out / GiB,
    "alias_GiB": alias / GiB,
    "temp_GiB": temp / GiB,
    "peak_GiB": (args + out - alias + temp) / GiB,
    "compile_s": seconds,
    "joint_tokens": tokens,
    "compiler_flops_per_chip": flops,
    "splash_flops_per_chip": kernel,
    "flops_per_chip": flops + kernel,
    "bytes_per_chip": nbytes,
    "cost_compile_s": layer_s,
    "device_kind": devices[0].device_kind,
    "slices": len({getattr(d, "slice_index", 0) for d in devices}),
  }
  chip = TPU_CHIPS.get(devices[0].device_kind) if devices[0].platform == "tpu" else None
  if chip:
    row.update(roofline(row, chip))
  return row


def format_table(rows: list[dict], device_gb: float) -> str:
  head = (
    "| config | devices | mesh | batch | params (B) | trainable (B) | video tokens | state/dev GiB | "
    "args GiB | out GiB | aliased GiB | temp GiB | peak/dev GiB | fits " + f"{device_gb:g} GB |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    fits = "yes" if r["peak_GiB"] * GiB <= device_gb * 1e9 else "no"
    lines.append(
      f"| {r['config']} | {r['devices']} {r['platform']} | {r['mesh']} | {r['batch']} | "
      f"{r['params_B']:.2f} | {r['trainable_B']:.2f} | {r['tokens']} | {r['state_GiB']:.1f} | "
      f"{r['args_GiB']:.1f} | {r['out_GiB']:.1f} | {r['alias_GiB']:.1f} | {r['temp_GiB']:.1f} | "
      f"{r['peak_GiB']:.1f} | {fits} |"
    )
  return "\n".join(lines)


def format_roofline(rows: list[dict]) -> str:
  """The TPU rows: per-chip peak against HBM, the compiler's FLOPs per step, the roofline estimate."""
  head = (
    "| config | chips | slices | mesh | peak/chip GiB | HBM GiB | fits | compiler TFLOP/chip | + splash TFLOP/chip "
    "| HBM GB/chip | est. step s (compute, HBM) | compile s |"
  )
  lines = ["Compiler estimates, not measurements:", head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if "est_step_s" not in r:
      continue
    lines.append(
      f"| {r['config']} | {r['devices']} {r['chip']} | {r['slices']} | {r['mesh']} | {r['peak_GiB']:.1f} | "
      f"{r['hbm_GiB']} | {'yes' if r['fits'] else 'no'} | {r['compiler_flops_per_chip'] / 1e12:.3g} | "
      f"{r['splash_flops_per_chip'] / 1e12:.3g} | {r['bytes_per_chip'] / 1e9:.3g} | "
      f"{r['est_step_s']:.3g} ({r['compute_s']:.3g}, {r['memory_s']:.3g}) | {r['compile_s']:.1f} |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--config",
    required=True,
    action="append",
    help="configs/FILE.py[:ARG]; repeat to compile several configs into one table",
  )
  p.add_argument("--topology", required=True, help="cpu:N | tpu:NAME (e.g. v5p:2x2x2) | gpu:N or gpu:HOSTSxN")
  p.add_argument(
    "--device-memory-gb",
    type=float,
    default=None,
    help="per-device memory for the 'fits' column (default: the TPU chip's HBM, else 80)",
  )
  p.add_argument(
    "--num-slices",
    type=int,
    default=1,
    help="tpu: this many slices of the topology over DCN (data across slices, the mesh inside one)",
  )
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def _child_env(count: int) -> dict:
  env = dict(os.environ)
  flags = [
    f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env.update(
    XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={count}"]),
    JAX_PLATFORMS="cpu",
    **{_CHILD: "1"},
  )
  return env


def run(args, overrides) -> int:
  platform, name, count = parse_topology(args.topology)
  if args.num_slices < 1 or (args.num_slices > 1 and platform != "tpu"):
    raise SystemExit(f"error: --num-slices {args.num_slices}: expected 1, or more with a tpu:NAME topology")
  configs = [
    (spec, load_config(spec, overrides)) for spec in args.config
  ]  # bad configs fail before any compile
  devices = None
  if platform == "tpu":
    devices = tpu_devices(name, args.num_slices)
    chip = TPU_CHIPS.get(devices[0].device_kind)
    memory_gb = args.device_memory_gb or (float(chip["hbm_GiB"]) * GiB / 1e9 if chip else 80.0)
    print(
      f"# {len(devices)} compile-only {devices[0].device_kind} devices ({args.num_slices} × {name})",
      flush=True,
    )
  else:
    memory_gb = args.device_memory_gb or 80.0
  if platform == "gpu" and not os.environ.get(_CHILD):
    devices = _compile_only_devices(platform, name)
  if devices is None:
    import jax  # after the subprocess's device count is set (module docstring)

    have = jax.devices("cpu") if os.environ.get(_CHILD) else []
    if len(have) < count:
      if os.environ.get(_CHILD):
        raise SystemExit(f"error: expected {count} fake CPU devices, have {len(have)}")
      print(f"# compiling for {count} fake CPU devices standing in for {args.topology}", flush=True)
      cmd = [
        sys.executable,
        "-m",
        "layerflow_jax.cli",
        "compile",
        "--topology",
        f"cpu:{count}",
        "--device-memory-gb",
        str(memory_gb),
      ]
      for spec in args.config:
        cmd += ["--config", spec]
      if args.json:
        cmd += ["--json", args.json]
      cmd += [f"--config.{o}" for o in overrides]
      return subprocess.call(cmd, env=_child_env(count))
    devices = have[:count]
  rows = []
  for spec, config in configs:
    if args.num_slices > 1:
      from layerflow_jax import sharding as shd  # jax (module docstring)

      config = shd.multislice_config(config, len(devices) // args.num_slices, args.num_slices)
    rows.append(compile_train_step(config, devices, label=spec))
    print(f"# compiled {spec} in {rows[-1]['compile_s']:.1f} s", flush=True)
  print(format_table(rows, memory_gb))
  if any("est_step_s" in r for r in rows):
    print(format_roofline(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


COMMANDS = {
  "compile": (
    "ahead-of-time compile the train step for a topology; print per-device memory",
    add_arguments,
    run,
  )
}


if __name__ == "__main__":
  from layerflow_jax import cli

  sys.exit(cli.main(["compile"] + sys.argv[1:]))
