"""``layerflow sweep``, ``sweep-report`` and ``sweep-run`` (the CLI finds them in ``COMMANDS``)."""

from __future__ import annotations

import os
import pathlib
import sys

from layerflow_jax.config import ConfigError
from layerflow_jax.sweep.plan import SWEEP_FILE, is_finished, prepare, read_json
from layerflow_jax.sweep.report import write_report
from layerflow_jax.sweep.runners import run_local, run_one, write_slurm


def _add_sweep_args(p) -> None:
  p.add_argument(
    "--config", required=True, help="configs/FILE.py[:ARG] defining get_sweep(arg) and get_config(arg)"
  )
  p.add_argument("--workdir", required=True, help="sweep work dir (one sub-dir per run)")
  p.add_argument(
    "--parallel",
    type=int,
    default=1,
    help="runs at a time; >1 runs subprocesses, each on its own "
    "device group (CUDA_VISIBLE_DEVICES split; plain processes on CPU)",
  )
  p.add_argument(
    "--devices",
    default=None,
    help="comma-separated device ids to split (default: CUDA_VISIBLE_DEVICES or all GPUs nvidia-smi lists)",
  )
  p.add_argument(
    "--slurm",
    action="store_true",
    help="write DIR/slurm.sh (an array job over unfinished runs) instead of running",
  )
  p.add_argument(
    "--sbatch",
    action="append",
    default=[],
    help="extra #SBATCH line for --slurm, e.g. '--gres=gpu:8' (repeatable)",
  )
  p.add_argument(
    "--stop-after",
    type=int,
    default=None,
    help="train each run at most this many more steps in this call (the next call resumes)",
  )
  p.add_argument(
    "--sample-steps",
    type=int,
    default=10,
    help="sampler steps for the layer metrics at the end of a run (0: skip them)",
  )
  p.add_argument("--metric-batches", type=int, default=1, help="validation batches for the layer metrics")
  p.add_argument(
    "--compile-cache",
    default="",
    help="JAX persistent compilation cache shared by the runs "
    "(default: DIR/.jax_cache; 'none' to disable; a JAX_COMPILATION_CACHE_DIR already set wins)",
  )
  p.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def cmd_sweep(args, overrides) -> int:
  root, runs = prepare(
    args.config, args.workdir, overrides, sample_steps=args.sample_steps, metric_batches=args.metric_batches
  )
  if args.slurm:
    path = write_slurm(root, runs, stop_after=args.stop_after, sbatch=args.sbatch)
    if path is None:
      print(f"all {len(runs)} runs in {root} are finished; nothing to submit")
    else:
      print(
        f"wrote {path} ({sum(not is_finished(root / r['name']) for r in runs)} array tasks); "
        f"submit with: sbatch {path}"
      )
    return 0
  try:
    cache = None if args.compile_cache == "none" else pathlib.Path(args.compile_cache or root / ".jax_cache")
    status = run_local(
      root,
      runs,
      parallel=args.parallel,
      devices=args.devices,
      stop_after=args.stop_after,
      compile_cache=cache,
    )
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts: dict[str, int] = {}
  for s in status.values():
    counts[s] = counts.get(s, 0) + 1
  print("sweep status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
  if not args.no_report:
    files = write_report(root)
    print(f"report: {files['markdown']}, {files['csv']}, {files['png']}")
  return 0 if all(s in ("done", "skipped") for s in status.values()) else 1


def _add_report_args(p) -> None:
  p.add_argument("workdir", help="a sweep work dir")
  p.add_argument(
    "--out",
    default=None,
    help="where to write report.md / report.csv / loss_curves.png (default: the work dir)",
  )


def cmd_report(args, overrides) -> int:
  files = write_report(args.workdir, args.out)
  print(pathlib.Path(files["markdown"]).read_text())
  print(f"wrote {files['markdown']}, {files['csv']}, {files['png']}")
  return 0


def _add_run_args(p) -> None:
  p.add_argument("workdir", help="a sweep work dir prepared by `layerflow sweep`")
  p.add_argument("name", help="the run's name (a sub-dir of the work dir)")
  p.add_argument("--stop-after", type=int, default=None)


def cmd_run_one(args, overrides) -> int:
  if overrides:
    raise ConfigError(f"sweep-run takes no --config.* overrides (they are fixed in sweep.json): {overrides}")
  root = pathlib.Path(args.workdir).absolute()
  if not (root / SWEEP_FILE).exists():
    raise ConfigError(f"{root}: no {SWEEP_FILE} (prepare the sweep with `layerflow sweep` first)")
  cwd = read_json(root / SWEEP_FILE).get("cwd")
  if cwd and pathlib.Path(cwd).is_dir():
    os.chdir(cwd)  # config paths and data dirs are relative to where `layerflow sweep` ran
  status = run_one(root, args.name, stop_after=args.stop_after)
  print(f"{args.name}: {status}")
  return 0


COMMANDS = {
  "sweep": (
    "run a config's get_sweep() runs (locally, N at a time, or as a SLURM array); resumable",
    _add_sweep_args,
    cmd_sweep,
  ),
  "sweep-report": (
    "Markdown + CSV table and a loss-curve PNG of a sweep work dir",
    _add_report_args,
    cmd_report,
  ),
  "sweep-run": (
    "run one run of a prepared sweep (what `sweep` subprocesses and SLURM tasks call)",
    _add_run_args,
    cmd_run_one,
  ),
}
