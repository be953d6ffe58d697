"""Ablation sweeps: a config's ``get_sweep(arg)`` expanded into runs, run locally or as a SLURM array, then tabulated.

A config file may define, next to ``get_config(arg)``::

  from layerflow_jax import sweep as hyper

  def get_sweep(arg):
    return hyper.product(hyper.axis("model.layer_embed", ["none", "text", "text+video"]),
                         hyper.axis("arg.image_weight", [0.25, 0.75]))

Each run is a dict ``{key: value}``. A key is a config key (applied like ``--config.KEY=VALUE``) or ``arg.NAME``
(appended to the config argument, ``FILE.py:...,NAME=VALUE``) for knobs that ``get_config`` derives other values from
(a data mixture, a stage's adapters). A run is named by its swept values (``layer_embed=none,image_weight=0.25``).

Work dir layout (``layerflow sweep --workdir DIR``)::

  DIR/sweep.json            the expanded sweep (spec, overrides, runs in order; SLURM tasks index it)
  DIR/<run>/run.json        what the run is (spec + overrides); a second call refuses a run dir made otherwise
  DIR/<run>/checkpoints/, metrics.jsonl, tb/   the trainer's work dir (it auto-resumes from here)
  DIR/<run>/attempts.jsonl  one line per start and per end of training (pid, steps, seconds)
  DIR/<run>/result.json     final metrics; written last and atomically, so its presence means "finished"
  DIR/_shared/<stage>-<hash>/  earlier stages a run starts from (``train.init_from`` naming a stage of
                            ``config.stages``), trained once per distinct config and shared between runs
  DIR/report.md, report.csv, loss_curves.png   ``layerflow sweep-report DIR``

A second ``layerflow sweep`` call skips finished runs and resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Iterable, Mapping, Sequence

from layerflow_jax import stopping
from layerflow_jax.config import ConfigError, call_in_config_file, load_config, split_spec

ARG_PREFIX = "arg."
SWEEP_FILE = "sweep.json"
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
ATTEMPTS_FILE = "attempts.jsonl"
SHARED_DIR = "_shared"

# ----------------------------------------------------------------------------- building sweeps (for get_sweep)


def axis(key: str, values: Iterable[Any]) -> list[dict]:
  """One swept key: ``axis("model.layer_embed", ["none", "text"])`` → ``[{key: "none"}, {key: "text"}]``."""
  values = list(values)
  if not values:
    raise ValueError(f"sweep axis {key!r} has no values")
  return [{key: v} for v in values]


def product(*axes: Sequence[Mapping]) -> list[dict]:
  """Every combination of the given run lists (the first varies slowest)."""
  return [_merge(parts) for parts in itertools.product(*axes)]


def zipit(*axes: Sequence[Mapping]) -> list[dict]:
  """Runs taken side by side: the i-th run merges the i-th entry of every list (all lists equally long)."""
  if len({len(a) for a in axes}) > 1:
    raise ValueError(f"sweep zipit: lists of different lengths {[len(a) for a in axes]}")
  return [_merge(parts) for parts in zip(*axes)]


def _merge(parts: Sequence[Mapping]) -> dict:
  run: dict = {}
  for part in parts:
    clash = set(run) & set(part)
    if clash:
      raise ValueError(f"sweep: key(s) {sorted(clash)} set twice in one run")
    run.update(part)
  return run


# ----------------------------------------------------------------------------- expanding a config's sweep


def _format_value(v: Any) -> str:
  if isinstance(v, str):
    return v
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (list, tuple, dict)):
    return json.dumps(v, separators=(",", ":"), sort_keys=True)
  return str(v)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each key's last component, or the whole key where two keys share the last component."""
  leaves = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def run_name(run: Mapping[str, Any], short: Mapping[str, str] | None = None) -> str:
  """A file-system-safe name from the run's swept values: ``layer_embed=none,steps=3``."""
  short = short or _short_keys(list(run))
  text = ",".join(f"{short.get(k, k)}={_format_value(v)}" for k, v in run.items()) or "base"
  text = re.sub(r"[^A-Za-z0-9_.,=+\-]", "_", text)
  if len(text) > 120:  # keep names usable as directory names
    text = text[:100] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
  return text


def run_spec(spec: str, run: Mapping[str, Any]) -> tuple[str, list[str]]:
  """The config spec (``arg.*`` keys folded into the argument) and the ``KEY=VALUE`` overrides of one run."""
  path, arg = split_spec(spec)
  arg_parts = [p for p in (arg or "").split(",") if p]
  overrides = []
  for key, value in run.items():
    if not isinstance(key, str) or not key:
      raise ConfigError(f"sweep run {dict(run)}: key {key!r} is not a config key")
    if key.startswith(ARG_PREFIX):
      name = key[len(ARG_PREFIX) :]
      if not name or any(c in str(value) for c in ",:") or any(c in name for c in ",=:"):
        raise ConfigError(f"sweep key {key!r}={value!r}: config arguments cannot contain ',', ':' or '='")
      arg_parts.append(f"{name}={value}")
    else:
      overrides.append(f"{key}={value!r}")
  new_spec = f"{path}:{','.join(arg_parts)}" if arg_parts else path
  return new_spec, overrides


def expand(spec: str, overrides: Sequence[str] = ()) -> list[dict]:
  """``FILE.py[:ARG]`` with ``get_sweep(ARG)`` → ``[{name, spec, overrides, swept}]``; every config is checked."""
  runs = call_in_config_file(spec, "get_sweep", "get_sweep: ")
  if not isinstance(runs, (list, tuple)) or not runs or not all(isinstance(r, Mapping) for r in runs):
    raise ConfigError(f"{spec}: get_sweep must return a non-empty list of dicts, got {type(runs).__name__}")
  keys: list[str] = []
  for r in runs:
    keys += [k for k in r if k not in keys]
  short = _short_keys(keys)
  out, seen = [], {}
  for r in runs:
    name = run_name(r, short)
    if name in seen:
      raise ConfigError(f"{spec}: runs {seen[name]} and {dict(r)} have the same name {name!r}")
    seen[name] = dict(r)
    rspec, rover = run_spec(spec, r)
    all_overrides = list(overrides) + rover
    try:
      load_config(rspec, all_overrides)  # fail before anything runs, naming the key
    except ConfigError as e:
      raise ConfigError(f"sweep run {name!r}: {e}") from None
    out.append({"name": name, "spec": rspec, "overrides": all_overrides, "swept": {k: r[k] for k in r}})
  return out


# ----------------------------------------------------------------------------- files


def _write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic: a reader sees the old file or the whole new one, never a partial one."""
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  os.replace(tmp, path)


def _read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def _append_jsonl(path: pathlib.Path, obj: Mapping) -> None:
  with path.open("a") as f:
    f.write(json.dumps(obj, default=str) + "\n")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """An exclusive lock between processes (also across SLURM tasks on a file system with POSIX locks)."""
  import fcntl

  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def is_finished(run_dir: pathlib.Path) -> bool:
  return (run_dir / RESULT_FILE).exists()


def prepare(
  spec: str,
  workdir: str | pathlib.Path,
  overrides: Sequence[str] = (),
  *,
  sample_steps: int = 10,
  metric_batches: int = 1,
) -> tuple[pathlib.Path, list[dict]]:
  """Expands the sweep into ``workdir``: writes sweep.json and each run's run.json (refusing a changed run)."""
  root = pathlib.Path(workdir).absolute()
  root.mkdir(parents=True, exist_ok=True)
  runs = expand(spec, overrides)
  for r in runs:
    d = root / r["name"]
    record = {"name": r["name"], "spec": r["spec"], "overrides": r["overrides"], "swept": r["swept"]}
    if (d / RUN_FILE).exists():
      old = _read_json(d / RUN_FILE)
      if (old.get("spec"), old.get("overrides")) != (r["spec"], r["overrides"]):
        raise ConfigError(
          f"run dir {d} was made by {old.get('spec')} {old.get('overrides')}, not by "
          f"{r['spec']} {r['overrides']}; use another --workdir"
        )
    else:
      d.mkdir(parents=True, exist_ok=True)
      _write_json(d / RUN_FILE, record)
  _write_json(
    root / SWEEP_FILE,
    {
      "spec": spec,
      "overrides": list(overrides),
      "sample_steps": int(sample_steps),
      "metric_batches": int(metric_batches),
      "cwd": os.getcwd(),
      "runs": runs,
    },
  )
  return root, runs


# ----------------------------------------------------------------------------- running one run


def _read_metrics(run_dir: pathlib.Path) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) of a run's metrics.jsonl; after a resume the last row of each step wins."""
  from layerflow_jax.train.logging import read_metrics

  train, evals = {}, {}
  for row in read_metrics(run_dir):
    if "loss" in row:
      train[row["step"]] = row
    if "val_loss" in row:
      evals[row["step"]] = row
  return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _steady_steps_per_s(run_dir: pathlib.Path) -> float | None:
  """Steps per second over consecutive logged rows of one training attempt: an interval that spans a (re)start
  carries start-up and compilation, so only intervals between two rows of the same attempt count."""
  from layerflow_jax.train.logging import read_metrics

  rows = [r for r in read_metrics(run_dir) if "loss" in r]
  starts = []
  if (run_dir / ATTEMPTS_FILE).exists():
    starts = [
      a["time"]
      for a in (json.loads(x) for x in (run_dir / ATTEMPTS_FILE).read_text().splitlines() if x.strip())
      if a.get("event") == "start"
    ]
  steps = seconds = 0.0
  for prev, cur in zip(rows, rows[1:]):
    if cur["step"] > prev["step"] and not any(prev["time"] < t <= cur["time"] for t in starts):
      steps += cur["step"] - prev["step"]
      seconds += cur["time"] - prev["time"]
  return steps / seconds if seconds > 0 else None


def _layer_metrics(run_dir: pathlib.Path, sample_steps: int, num_batches: int) -> dict:
  """Layer metrics (every task sampled on fixed validation clips) of the run's final parameters."""
  from layerflow_jax import evaluate as eval_lib
  from layerflow_jax.sampling import LayeredSampler
  from layerflow_jax.train import trainer

  params, config = trainer.load_params(run_dir)
  sampler = LayeredSampler(config, params)
  batches = eval_lib.eval_batches(config, "validation", num_batches=num_batches)
  metrics, _ = eval_lib.evaluate(sampler, batches, num_steps=sample_steps)
  metrics.pop("num_clips", None)
  if config.eval.multistage:
    metrics.update(
      eval_lib.multistage_metrics(config, params, num_batches=num_batches, num_steps=sample_steps)
    )
  return metrics


def _build_data(root: pathlib.Path, config) -> None:
  from data_pipelines import registry

  with _file_lock(root / ".data.lock"):  # concurrent runs must not build the same dataset twice at once
    registry.build_all(config)


def _filtered_overrides(config_spec: str, overrides: Sequence[str]) -> list[str]:
  """The overrides whose keys exist in this (earlier-stage) config: a key it lacks cannot concern it."""
  base = load_config(config_spec)
  keep = []
  for o in overrides:
    node = base
    for part in o.partition("=")[0].strip().split("."):
      if not hasattr(node, "keys") or part not in node:
        node = None
        break
      node = node[part]
    if node is not None:
      keep.append(o)
  return keep


def _train_to_end(config, run_dir: pathlib.Path, *, stop_after: int | None) -> dict:
  from layerflow_jax.train import trainer

  _append_jsonl(
    run_dir / ATTEMPTS_FILE,
    {"event": "start", "time": time.time(), "pid": os.getpid(), "host": os.uname().nodename},
  )
  summary = trainer.train(config, run_dir, stop_after=stop_after, progress=False)
  _append_jsonl(
    run_dir / ATTEMPTS_FILE,
    {
      "event": "end",
      "time": time.time(),
      "pid": os.getpid(),
      "start_step": summary.get("start_step"),
      "end_step": summary.get("end_step"),
      "seconds": summary.get("seconds"),
      "signal": summary.get("interrupted_by_signal"),
    },
  )
  return summary


def _resolve_stages(
  root: pathlib.Path, spec: str, config, overrides: Sequence[str], *, stop_after: int | None
) -> bool:
  """Points ``train.init_from`` naming an earlier stage at a shared, trained copy of it; False if it is unfinished."""
  from layerflow_jax import stages as stages_lib

  src = config.train.init_from
  if not src or src not in tuple(config.stages):
    return True
  pspec = stages_lib.stage_spec(spec, src)
  pover = _filtered_overrides(pspec, overrides)
  pconfig = load_config(pspec, pover)
  _build_data(root, pconfig)
  if not _resolve_stages(root, pspec, pconfig, pover, stop_after=stop_after):
    return False
  from layerflow_jax.train import checkpoint as ckpt_lib

  digest = hashlib.sha1(ckpt_lib.config_to_meta(pconfig).encode()).hexdigest()[:12]
  pdir = root / SHARED_DIR / f"{src}-{digest}"
  with _file_lock(pdir / ".lock"):  # one trainer per shared stage; the other runs wait for it
    if not is_finished(pdir):
      if not (pdir / RUN_FILE).exists():
        _write_json(
          pdir / RUN_FILE, {"name": pdir.name, "spec": pspec, "overrides": list(pover), "shared": True}
        )
      print(f"  shared stage {pdir.name} ({pspec})", flush=True)
      summary = _train_to_end(pconfig, pdir, stop_after=stop_after)
      if summary.get("end_step") != int(pconfig.train.steps) or summary.get("interrupted_by_signal"):
        return False
      _write_json(
        pdir / RESULT_FILE,
        {
          "status": "done",
          "steps": summary["end_step"],
          "val_loss": summary.get("final", {}).get("val_loss"),
        },
      )
  config.train.init_from = str(pdir)
  return True


def run_one(workdir: str | pathlib.Path, name: str, *, stop_after: int | None = None) -> str:
  """Trains one run of a prepared sweep to its end (resuming) and writes its result.json.

  Returns ``"done"``, ``"skipped"`` (finished before) or ``"unfinished"`` (stopped by ``stop_after`` or a signal).
  """
  root = pathlib.Path(workdir).absolute()
  sweep = _read_json(root / SWEEP_FILE)
  byname = {r["name"]: r for r in sweep["runs"]}
  if name not in byname:
    raise ConfigError(f"{root}: no run named {name!r}; runs: {sorted(byname)}")
  run = byname[name]
  run_dir = root / name
  if is_finished(run_dir):
    return "skipped"
  config = load_config(run["spec"], run["overrides"])
  _build_data(root, config)
  if not _resolve_stages(root, run["spec"], config, run["overrides"], stop_after=stop_after):
    return "unfinished"
  summary = _train_to_end(config, run_dir, stop_after=stop_after)
  if summary.get("end_step") != int(config.train.steps) or summary.get("interrupted_by_signal"):
    return "unfinished"

  train_rows, _ = _read_metrics(run_dir)
  tail = train_rows[-max(1, math.ceil(len(train_rows) / 10)) :]
  result: dict[str, Any] = {"status": "done", "steps": int(summary["end_step"])}
  result["train_loss"] = sum(r["loss"] for r in tail) / len(tail) if tail else None
  result.update(summary.get("final", {}))
  if int(sweep.get("sample_steps", 0)) > 0:
    t = time.time()
    layer = _layer_metrics(run_dir, int(sweep["sample_steps"]), int(sweep.get("metric_batches", 1)))
    result.update({f"layer/{k}": v for k, v in layer.items()})
    result["layer_metrics_seconds"] = time.time() - t
  sps = _steady_steps_per_s(run_dir) or summary.get("steps_per_s")
  result["steps_per_s"] = sps
  result["examples_per_s"] = sps * int(config.data.batch_size) if sps else None
  attempts = [json.loads(l) for l in (run_dir / ATTEMPTS_FILE).read_text().splitlines() if l.strip()]
  result["train_seconds"] = sum(a.get("seconds") or 0.0 for a in attempts if a.get("event") == "end")
  result["trainable_params"] = summary.get("trainable_params")
  result["finished_at"] = time.time()
  _write_json(run_dir / RESULT_FILE, {"name": name, "swept": run["swept"], "metrics": result})
  return "done"


# ----------------------------------------------------------------------------- running a sweep


def _visible_devices(devices: str | None) -> list[str]:
  """Accelerator ids to split between parallel runs: --devices, CUDA_VISIBLE_DEVICES, or nvidia-smi; [] on CPU."""
  if devices:
    return [d.strip() for d in devices.split(",") if d.strip()]
  env = os.environ.get("CUDA_VISIBLE_DEVICES")
  if env is not None:
    return [d.strip() for d in env.split(",") if d.strip()]
  try:
    out = subprocess.run(
      ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=20,
      check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]
  except (OSError, subprocess.SubprocessError):
    return []


def split_devices(ids: Sequence[str], parallel: int) -> list[dict[str, str]]:
  """One environment patch per parallel slot: disjoint CUDA_VISIBLE_DEVICES groups, or nothing on CPU."""
  if parallel < 1:
    raise ValueError(f"--parallel must be at least 1, got {parallel}")
  if not ids:
    return [{} for _ in range(parallel)]
  if len(ids) < parallel:
    raise ValueError(
      f"--parallel {parallel} needs at least {parallel} devices; found {len(ids)} ({','.join(ids)})"
    )
  per = len(ids) // parallel
  return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * per : (i + 1) * per])} for i in range(parallel)]


def _worker_command(root: pathlib.Path, name: str, stop_after: int | None) -> list[str]:
  cmd = [sys.executable, "-m", "layerflow_jax.cli", "sweep-run", str(root), name]
  if stop_after is not None:
    cmd += ["--stop-after", str(stop_after)]
  return cmd


class _Stop(stopping.StopSignals):
  """SIGINT/SIGTERM while a sweep runs: pass it on to the runs (they save and exit) and start no new one."""

  def __init__(self):
    super().__init__()
    self.procs: list[subprocess.Popen] = []

  def on_signal(self, signum: int) -> None:
    self.signal = signum
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def _compile_cache(path: pathlib.Path | None):
  """JAX's persistent compilation cache in this process (runs of a sweep often compile the same programs, and a
  resumed run compiles what it compiled before); restored afterwards. A cache the user configured is kept."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  old = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]  # not in stub
  if path is None or old:
    yield
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old)
    cc.reset_cache()


def run_local(
  root: pathlib.Path,
  runs: Sequence[dict],
  *,
  parallel: int = 1,
  devices: str | None = None,
  stop_after: int | None = None,
  compile_cache: pathlib.Path | None = None,
) -> dict[str, str]:
  """Runs the unfinished runs: in this process one after another (parallel 1), else N subprocesses at a time."""
  status = {r["name"]: "skipped" for r in runs if is_finished(root / r["name"])}
  pending = [r["name"] for r in runs if r["name"] not in status]
  print(f"sweep {root}: {len(runs)} runs, {len(status)} finished before, {len(pending)} to run", flush=True)
  if not pending:
    return status
  if parallel == 1:
    with _compile_cache(compile_cache):
      _run_in_process(root, pending, status, stop_after)
    for name in pending:
      status.setdefault(name, "not started")
    return status

  slots = split_devices(_visible_devices(devices), parallel)
  cache_env = {"JAX_COMPILATION_CACHE_DIR": str(compile_cache)} if compile_cache else {}
  free = list(range(parallel))
  running: dict[int, tuple[subprocess.Popen, str, float, Any]] = {}
  queue = list(pending)
  with _Stop() as stop:
    while queue or running:
      while queue and free and stop.signal is None:
        slot, name = free.pop(0), queue.pop(0)
        env = {**cache_env, **os.environ, **slots[slot]}
        log = (root / name / "log.txt").open("a")
        p = subprocess.Popen(
          _worker_command(root, name, stop_after), env=env, stdout=log, stderr=subprocess.STDOUT
        )
        stop.procs.append(p)
        running[slot] = (p, name, time.time(), log)
        dev = slots[slot].get("CUDA_VISIBLE_DEVICES", "cpu")
        print(f"start {name} (devices {dev}, pid {p.pid}, log {root / name / 'log.txt'})", flush=True)
      if stop.signal is not None:
        queue.clear()
      time.sleep(0.2)
      for slot, (p, name, t, log) in list(running.items()):
        rc = p.poll()
        if rc is None:
          continue
        log.close()
        del running[slot]
        free.append(slot)
        status[name] = (
          ("done" if is_finished(root / name) else "unfinished") if rc == 0 else f"failed (rc {rc})"
        )
        print(f"end   {name}: {status[name]} ({time.time() - t:.0f} s)", flush=True)
  for name in pending:
    status.setdefault(name, "not started")
  return status


def _run_in_process(root: pathlib.Path, pending: Sequence[str], status: dict, stop_after: int | None) -> None:
  """One run after another in this process (no start-up per run); a signal stops the sweep after saving."""
  for i, name in enumerate(pending):
    print(f"[{i + 1}/{len(pending)}] {name}", flush=True)
    t = time.time()
    try:
      status[name] = run_one(root, name, stop_after=stop_after)
    except ConfigError:
      raise
    except Exception:  # a failed run (e.g. non-finite loss) must not stop the others
      (root / name / "error.txt").write_text(traceback.format_exc())
      status[name] = "failed"
    print(f"      {status[name]} ({time.time() - t:.0f} s)", flush=True)
    if _interrupted(root / name):
      print("      interrupted by a signal: stopping the sweep (run it again to resume)", flush=True)
      break


def _interrupted(run_dir: pathlib.Path) -> bool:
  path = run_dir / ATTEMPTS_FILE
  if not path.exists():
    return False
  lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return bool(lines and lines[-1].get("event") == "end" and lines[-1].get("signal"))


def write_slurm(
  root: pathlib.Path, runs: Sequence[dict], *, stop_after: int | None = None, sbatch: Sequence[str] = ()
) -> pathlib.Path | None:
  """An array job over the unfinished runs: task i runs ``layerflow sweep-run DIR <run i>``."""
  pending = [r["name"] for r in runs if not is_finished(root / r["name"])]
  if not pending:
    return None
  (root / "slurm").mkdir(exist_ok=True)
  extra = " ".join(shlex.quote(str(x)) for x in (["--stop-after", str(stop_after)] if stop_after else []))
  names = "\n".join(f"  {shlex.quote(n)}" for n in pending)
  header = [
    f"#SBATCH --job-name=layerflow-sweep-{root.name}",
    f"#SBATCH --array=0-{len(pending) - 1}",
    f"#SBATCH --output={root}/slurm/%A_%a.out",
    "#SBATCH --signal=TERM@120   # the trainer saves a checkpoint on SIGTERM; a rerun resumes",
  ]
  header += [f"#SBATCH {s}" for s in sbatch]
  text = "\n".join(
    [
      "#!/bin/bash",
      *header,
      "# Written by `layerflow sweep --slurm`; submit with: sbatch " + str(root / "slurm.sh"),
      "# Runs already finished when this task starts are skipped; unfinished ones resume from their checkpoints.",
      "set -euo pipefail",
      f"cd {shlex.quote(os.getcwd())}",
      "RUNS=(",
      names,
      ")",
      "NAME=${RUNS[$SLURM_ARRAY_TASK_ID]}",
      f'srun {shlex.quote(sys.executable)} -m layerflow_jax.cli sweep-run {shlex.quote(str(root))} "$NAME" {extra}',
      "",
    ]
  )
  path = root / "slurm.sh"
  path.write_text(text)
  path.chmod(0o755)
  return path


# ----------------------------------------------------------------------------- report


def _runs_in(root: pathlib.Path) -> list[dict]:
  """run.json of every run dir, in sweep.json order first (shared stages excluded)."""
  order = []
  if (root / SWEEP_FILE).exists():
    order = [r["name"] for r in _read_json(root / SWEEP_FILE).get("runs", [])]
  found = {p.parent.name: p for p in root.glob(f"*/{RUN_FILE}") if p.parent.name != SHARED_DIR}
  names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
  return [_read_json(found[n]) for n in names]


def _status(run_dir: pathlib.Path) -> str:
  if is_finished(run_dir):
    return "done"
  if (run_dir / "error.txt").exists():
    return "failed"
  return "unfinished" if (run_dir / ATTEMPTS_FILE).exists() else "not started"


def collect(root: str | pathlib.Path) -> tuple[list[str], list[dict]]:
  """(columns, rows): swept keys, then status and metrics, one row per run."""
  root = pathlib.Path(root)
  runs = _runs_in(root)
  if not runs:
    raise ConfigError(f"{root}: no sweep runs found (expected */{RUN_FILE}; run `layerflow sweep` first)")
  swept: list[str] = []
  for r in runs:
    swept += [k for k in r.get("swept", {}) if k not in swept]
  rows, metric_keys = [], []
  for r in runs:
    d = root / r["name"]
    row = {"run": r["name"], **{k: r.get("swept", {}).get(k, "") for k in swept}, "status": _status(d)}
    if is_finished(d):
      m = _read_json(d / RESULT_FILE)["metrics"]
      row.update({k: v for k, v in m.items() if k not in ("status", "finished_at")})
      metric_keys += [k for k in m if k not in metric_keys and k not in ("status", "finished_at")]
    else:
      train, _ = _read_metrics(d)
      row["steps"] = train[-1]["step"] if train else 0
    rows.append(row)
  first = ["steps", "train_loss", "val_loss"]
  val = sorted(k for k in metric_keys if k.startswith("val_loss_"))
  layer = sorted(k for k in metric_keys if k.startswith("layer/"))
  last = ["steps_per_s", "examples_per_s", "train_seconds", "layer_metrics_seconds", "trainable_params"]
  rest = [k for k in metric_keys if k not in first + val + layer + last]
  columns = (
    ["run"]
    + swept
    + ["status"]
    + [k for k in first + val + layer + rest + last if k in metric_keys or k == "steps"]
  )
  return columns, rows


def _cell(v: Any) -> str:
  if v is None or v == "":
    return "" if v == "" else "–"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping]) -> str:
  head = [c.replace("|", "\\|") for c in columns]
  numeric = [
    any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows) for c in columns
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |")
  return "\n".join(lines)


def headline_columns(columns: Sequence[str]) -> list[str]:
  """The Markdown table's columns: swept keys, losses, the layer metrics of the demo table, throughput
  (report.csv keeps every column)."""
  from layerflow_jax.evaluate import TABLE_METRICS

  layer = {f"layer/{key}" for key, _, _ in TABLE_METRICS}
  drop = {"train_seconds", "trainable_params", "layer_metrics_seconds"}
  return [c for c in columns if c in layer or (not c.startswith(("val_loss_", "layer/")) and c not in drop)]


def plot_losses(root: pathlib.Path, runs: Sequence[dict], out: pathlib.Path) -> pathlib.Path:
  """Training loss (raw, faint, and smoothed) and validation loss against step, one colour per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, r in enumerate(runs):
    train, evals = _read_metrics(root / r["name"])
    c = colors[i % len(colors)]
    if train:
      steps = [x["step"] for x in train]
      loss = [x["loss"] for x in train]
      ax_t.plot(steps, loss, color=c, alpha=0.25, linewidth=0.8)
      smooth, s = [], None
      k = 2.0 / (1.0 + max(1.0, len(loss) / 20))  # EMA over about a twentieth of the curve
      for v in loss:
        s = v if s is None else (1 - k) * s + k * v
        smooth.append(s)
      ax_t.plot(steps, smooth, color=c, linewidth=1.6, label=r["name"])
    if evals:
      ax_v.plot([x["step"] for x in evals], [x["val_loss"] for x in evals], "o-", color=c, label=r["name"])
  for ax, title in ((ax_t, "training loss (faint: logged, solid: smoothed)"), (ax_v, "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=7)
  fig.suptitle(f"sweep {root.name}")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def write_report(root: str | pathlib.Path, out: str | pathlib.Path | None = None) -> dict[str, pathlib.Path]:
  """report.md, report.csv and loss_curves.png of a sweep work dir."""
  root = pathlib.Path(root)
  out = pathlib.Path(out) if out else root
  out.mkdir(parents=True, exist_ok=True)
  columns, rows = collect(root)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({c: ("" if r.get(c) is None else r.get(c, "")) for c in columns})
  (out / "report.csv").write_text(buf.getvalue())
  spec = _read_json(root / SWEEP_FILE).get("spec", "") if (root / SWEEP_FILE).exists() else ""
  md = [
    f"# Sweep {root.name}",
    "",
    f"config: `{spec}`",
    "",
    markdown_table(headline_columns(columns), rows),
    "",
    "train_loss: mean of the last tenth of logged training losses; val_loss: fixed-noise validation loss at the "
    "end (per task in val_loss_*); layer/*: layer metrics of samples on validation clips; steps_per_s: steady "
    "rate between log rows (compilation excluded). Every column: report.csv.",
    "",
  ]
  (out / "report.md").write_text("\n".join(md))
  png = plot_losses(root, _runs_in(root), out / "loss_curves.png")
  return {"markdown": out / "report.md", "csv": out / "report.csv", "png": png}


# ----------------------------------------------------------------------------- command line


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
  cwd = _read_json(root / SWEEP_FILE).get("cwd")
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
