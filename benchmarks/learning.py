"""The learning benchmark (issue 18): train ``configs/learn_gpu.py`` for several seeds, evaluate each, one table.

For each seed: build the synthetic dataset if it is not there, train the config with ``seed=S`` in its own work dir
(resumed if interrupted), evaluate it on the validation split with the python API of ``layerflow evaluate`` (every
task; report files under ``WORKDIR/seedS/eval``), then print one column per seed (and their mean) for every metric
and append one ``"kind": "learning"`` line per seed to ``--results``: the git commit (and whether tracked files were
modified), the device, the config spec and overrides, the seed, train and eval wall time, and every metric
``evaluate`` returned.

  python benchmarks/learning.py                                      # learn_gpu defaults, seeds 0,1,2, in turn
  python benchmarks/learning.py --seeds 0,1,2 --parallel             # the three seeds at once on one GPU
  python benchmarks/learning.py --config configs/learn_gpu.py:steps=4000 --eval-steps 50 --workdir runs/learning
  python benchmarks/learning.py --config configs/default.py:size=tiny --override train.steps=4 \\
      --override data.num_train=16 --eval-batches 1 --eval-steps 2 --results /tmp/learning.jsonl   # CPU check

With ``--parallel`` every seed runs in its own process (``--worker``), all at once; wall times are then those of
runs sharing the device, and each line says how many shared it (``concurrent_runs``). GPU memory is not
preallocated in that mode, so the processes fit side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common as bc  # noqa: E402  (stdlib-only module)

DEFAULT_CONFIG = "configs/learn_gpu.py"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--config", default=DEFAULT_CONFIG, help="configs/FILE.py[:ARG] to train (default: %(default)s)"
  )
  p.add_argument(
    "--override",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="config override, as --config.KEY=VALUE in the CLI (repeatable; not seed: use --seeds)",
  )
  p.add_argument("--seeds", default="0,1,2", help="comma-separated config seeds (default: %(default)s)")
  p.add_argument(
    "--workdir",
    default="runs/learning",
    help="root of the runs: WORKDIR/<config>/seedS (default: %(default)s)",
  )
  p.add_argument("--data-dir", default=None, help="TFDS data_dir (default: the config's data.data_dir)")
  p.add_argument(
    "--eval-steps", type=int, default=50, help="sampling steps per evaluation (default: %(default)s)"
  )
  p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the config's)")
  p.add_argument(
    "--eval-batches",
    type=int,
    default=None,
    help="validation batches to evaluate (default: the whole split, as `layerflow evaluate`)",
  )
  p.add_argument("--results", default=str(bc.RESULTS_FILE), help="JSON-lines file to append to ('' = none)")
  p.add_argument("--parallel", action="store_true", help="one process per seed, all at once")
  p.add_argument("--note", default="", help="free text stored with every line")
  p.add_argument(
    "--worker", action="store_true", help=argparse.SUPPRESS
  )  # one seed; --record-out gets its line
  p.add_argument("--record-out", default=None, help=argparse.SUPPRESS)
  p.add_argument("--concurrent-runs", type=int, default=1, help=argparse.SUPPRESS)  # set by --parallel
  args = p.parse_args(argv)
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
  if not args.seeds:
    p.error("--seeds: no seed given")
  if any(o.split("=", 1)[0].strip() == "seed" for o in args.override):
    p.error("--override seed=…: the seeds come from --seeds")
  if args.worker and len(args.seeds) != 1:
    p.error("--worker runs exactly one seed")
  return args


# ----------------------------------------------------------------------------- provenance


def git_state(root: pathlib.Path = bc.ROOT) -> dict[str, Any]:
  """The commit and whether tracked files differ from it (untracked files do not count)."""

  def git(*cmd: str) -> str | None:
    try:
      return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
      return None

  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no")  # "XY path" lines
  changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
  return {
    "commit": commit.strip() if commit else None,
    "dirty": None if status is None else bool(changed),
    "dirty_files": changed or None,
  }


def run_dir(root: str | pathlib.Path, spec: str, overrides: Sequence[str], seed: int) -> pathlib.Path:
  """``ROOT/<config spec and overrides, as a file name>/seedS``: another config never resumes this one's run."""
  name = spec.replace("configs/", "").replace(".py", "")
  if overrides:
    name += "," + ",".join(overrides)
  name = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", name).strip("_")
  if len(name) > 120:  # long override lists: a prefix and a digest of the whole
    name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
  return pathlib.Path(root) / name / f"seed{seed}"


def _relative(path: pathlib.Path) -> str:
  try:
    return str(path.resolve().relative_to(bc.ROOT))
  except ValueError:
    return str(path)


# ----------------------------------------------------------------------------- one seed


def run_seed(args: argparse.Namespace, seed: int, *, concurrent_runs: int = 1) -> dict[str, Any]:
  """Builds the data if needed, trains (or resumes) one seed, evaluates it; returns its results line."""
  import jax

  from data_pipelines import registry
  from layerflow_jax import evaluate
  from layerflow_jax.config import load_config
  from layerflow_jax.sampling import LayeredSampler
  from layerflow_jax.train import trainer

  overrides = list(args.override) + [f"seed={seed}"]
  if args.data_dir:
    overrides.append(f"data.data_dir={json.dumps(args.data_dir)}")
  config = load_config(args.config, overrides)
  work = run_dir(args.workdir, args.config, args.override, seed)
  dev = jax.devices()[0]
  print(f"[seed {seed}] {args.config} {' '.join(args.override)} → {work} on {dev.device_kind}", flush=True)

  t = time.time()
  registry.build(config.data)
  data_s = time.time() - t

  t = time.time()
  summary = trainer.train(config, work, progress=False)
  train_s = time.time() - t
  start, end = int(summary.get("start_step", 0)), int(summary.get("end_step", 0))
  print(f"[seed {seed}] trained steps {start} → {end} in {train_s:.1f} s", flush=True)

  t = time.time()
  params, trained_config = trainer.load_params(work)
  sampler = LayeredSampler(trained_config, params)
  batches = evaluate.eval_batches(trained_config, "validation", num_batches=args.eval_batches)
  metrics, previews = evaluate.evaluate(
    sampler, batches, num_steps=args.eval_steps, guidance_scale=args.guidance
  )
  evaluate.write_report(work / "eval", metrics, previews, title=f"{args.config} seed {seed} on validation")
  eval_s = time.time() - t
  print(f"[seed {seed}] evaluated {metrics.get('num_clips')} clips in {eval_s:.1f} s", flush=True)

  initial, final = summary.get("initial") or {}, summary.get("final") or {}
  return {
    "date": bc.utc_now(),
    "kind": "learning",
    **git_state(),
    "device": dev.device_kind,
    "platform": dev.platform,
    "device_count": jax.device_count(),
    "jax_version": jax.__version__,
    "config": args.config,
    "overrides": list(args.override),
    "seed": seed,
    "workdir": _relative(work),
    "train_steps": int(config.train.steps),
    "steps_this_run": end - start,
    "resumed_from_step": start,
    "train_seconds": round(train_s, 2),
    "data_seconds": round(data_s, 2),
    "eval_seconds": round(eval_s, 2),
    "concurrent_runs": concurrent_runs,
    "eval_clips": metrics.get("num_clips"),
    "sampling_steps": args.eval_steps,
    "guidance_scale": float(
      trained_config.sampling.guidance_scale if args.guidance is None else args.guidance
    ),
    "val_loss_start": initial.get("val_loss"),
    "val_loss_end": final.get("val_loss"),
    "metrics": {k: v for k, v in metrics.items() if k != "num_clips"},
    "note": args.note,
  }


# ----------------------------------------------------------------------------- all seeds


def worker_command(args: argparse.Namespace, seed: int, record_out: pathlib.Path) -> list[str]:
  cmd = [
    sys.executable,
    str(pathlib.Path(__file__).resolve()),
    "--worker",
    "--seeds",
    str(seed),
    "--config",
    args.config,
    "--workdir",
    args.workdir,
    "--eval-steps",
    str(args.eval_steps),
    "--results",
    "",
    "--record-out",
    str(record_out),
    "--note",
    args.note,
  ]
  for o in args.override:
    cmd += ["--override", o]
  if args.data_dir:
    cmd += ["--data-dir", args.data_dir]
  if args.guidance is not None:
    cmd += ["--guidance", str(args.guidance)]
  if args.eval_batches is not None:
    cmd += ["--eval-batches", str(args.eval_batches)]
  return cmd


def run_parallel(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Every seed in its own process at once (the data is built first, once, so that they do not race on it)."""
  from data_pipelines import registry
  from layerflow_jax.config import load_config

  config = load_config(
    args.config,
    list(args.override) + ([f"data.data_dir={json.dumps(args.data_dir)}"] if args.data_dir else []),
  )
  registry.build(config.data)
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes on one GPU
  env.setdefault("PYTHONUNBUFFERED", "1")
  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  procs = []
  for seed in args.seeds:
    out = run_dir(args.workdir, args.config, args.override, seed).with_name(f"seed{seed}.record.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = worker_command(args, seed, out) + ["--concurrent-runs", str(len(args.seeds))]
    print(f"[seed {seed}] " + " ".join(cmd), flush=True)
    procs.append((seed, out, subprocess.Popen(cmd, env=env, cwd=bc.ROOT)))
  records, failed = [], []
  for seed, out, proc in procs:
    if proc.wait() != 0 or not out.exists():
      failed.append(seed)
      continue
    records.append(json.loads(out.read_text()))
  if failed:
    print(f"error: seed(s) {failed} failed (their output is above)", file=sys.stderr)
  return records


def metric_table(records: Sequence[dict[str, Any]]) -> str:
  """One row per metric (the evaluation's table metrics first, then the rest), one column per seed, then the mean."""
  from layerflow_jax import evaluate

  columns = {f"seed {r['seed']}": dict(r["metrics"]) for r in records}
  keys = sorted({k for c in columns.values() for k in c})
  columns["mean"] = {
    k: sum(c[k] for c in columns.values() if k in c) / sum(k in c for c in columns.values()) for k in keys
  }
  known = {k for k, _, _ in evaluate.TABLE_METRICS}
  rows = list(evaluate.TABLE_METRICS) + [(k, k, None) for k in keys if k not in known]
  extra = {"train_seconds": "train wall time, s", "eval_seconds": "evaluation wall time, s"}
  for key, label in extra.items():
    for r in records:
      columns[f"seed {r['seed']}"][key] = float(r[key])
    columns["mean"][key] = sum(float(r[key]) for r in records) / len(records)
    rows.append((key, label, None))
  return evaluate.markdown_table(columns, rows)


def main(argv=None) -> int:
  args = parse_args(argv)
  # Paths given here are taken from the current directory; config files and the config's data_dir from the
  # repository's root, where every process of this benchmark runs.
  for name in ("workdir", "data_dir", "record_out"):
    if getattr(args, name):
      setattr(args, name, str(pathlib.Path(getattr(args, name)).resolve()))
  if args.results:
    args.results = str(pathlib.Path(args.results).resolve())
  os.chdir(bc.ROOT)
  if args.worker:
    record = run_seed(args, args.seeds[0], concurrent_runs=args.concurrent_runs)
    if args.record_out:
      pathlib.Path(args.record_out).write_text(json.dumps(record, default=str))
    return 0
  if args.parallel and len(args.seeds) > 1:
    records = run_parallel(args)
  else:
    records = [run_seed(args, s) for s in args.seeds]
  if args.results:
    for r in records:
      bc.append_jsonl(args.results, r)
  if records:
    g = git_state()
    print(
      f"\n{args.config} {' '.join(args.override)} — commit {str(g['commit'])[:10]}"
      f"{' (dirty)' if g['dirty'] else ''}, {records[0]['device']}, {records[0]['eval_clips']} validation clips, "
      f"{args.eval_steps} sampling steps, guidance {records[0]['guidance_scale']:g}\n"
    )
    print(metric_table(records))
    if args.results:
      print(f"\n{len(records)} line(s) appended to {args.results}")
  return 0 if len(records) == len(args.seeds) else 1


if __name__ == "__main__":
  sys.exit(main())
