"""Running a sweep: one run to its end (with the earlier stages it starts from), and the runs of a sweep in this
process, as parallel subprocesses or as a SLURM array."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Sequence

from layerflow_jax import chain, stages, stopping
from layerflow_jax.config import ConfigError, load_config
from layerflow_jax.sweep.plan import (
  ATTEMPTS_FILE,
  RESULT_FILE,
  RUN_FILE,
  SHARED_DIR,
  SWEEP_FILE,
  append_jsonl,
  file_lock,
  is_finished,
  read_json,
  read_run_metrics,
  write_json,
)

# ----------------------------------------------------------------------------- running one run


def _steady_steps_per_s(run_dir: pathlib.Path) -> float | None:
  """Steps per second over consecutive logged rows of one training attempt: an interval that spans a (re)start
  carries start-up and compilation, so only intervals between two rows of the same attempt count."""
  from layerflow_jax.train.logging import read_metrics  # imports jax: here, not at CLI start-up

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
  # jax, the model and the sampler: imported here, not at CLI start-up (as every heavy import in this package)
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
  from data_pipelines import registry  # TFDS: here, not at CLI start-up

  with file_lock(root / ".data.lock"):  # concurrent runs must not build the same dataset twice at once
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
  from layerflow_jax.train import trainer  # jax: here, not at CLI start-up

  append_jsonl(
    run_dir / ATTEMPTS_FILE,
    {"event": "start", "time": time.time(), "pid": os.getpid(), "host": os.uname().nodename},
  )
  summary = trainer.train(config, run_dir, stop_after=stop_after, progress=False)
  append_jsonl(
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
  src = chain.source_stage(config)
  if src is None:
    return True
  pspec = stages.stage_spec(spec, src)
  pover = _filtered_overrides(pspec, overrides)
  pconfig = load_config(pspec, pover)
  _build_data(root, pconfig)
  if not _resolve_stages(root, pspec, pconfig, pover, stop_after=stop_after):
    return False
  from layerflow_jax.train import checkpoint as ckpt_lib  # orbax: here, not at CLI start-up

  digest = hashlib.sha1(ckpt_lib.config_to_meta(pconfig).encode()).hexdigest()[:12]
  pdir = root / SHARED_DIR / f"{src}-{digest}"
  with file_lock(pdir / ".lock"):  # one trainer per shared stage; the other runs wait for it
    if not chain.is_trained(pdir, int(pconfig.train.steps)):
      if not (pdir / RUN_FILE).exists():
        write_json(
          pdir / RUN_FILE, {"name": pdir.name, "spec": pspec, "overrides": list(pover), "shared": True}
        )
      print(f"  shared stage {pdir.name} ({pspec})", flush=True)
      summary = _train_to_end(pconfig, pdir, stop_after=stop_after)
      if summary.get("interrupted_by_signal") or not chain.is_trained(pdir, int(pconfig.train.steps)):
        return False
      write_json(  # a record of the stage (whether it is finished is chain.is_trained's)
        pdir / RESULT_FILE,
        {
          "status": "done",
          "steps": summary["end_step"],
          "val_loss": summary.get("final", {}).get("val_loss"),
        },
      )
  chain.start_from(config, pdir, int(pconfig.train.steps))
  return True


def run_one(workdir: str | pathlib.Path, name: str, *, stop_after: int | None = None) -> str:
  """Trains one run of a prepared sweep to its end (resuming) and writes its result.json.

  Returns ``"done"``, ``"skipped"`` (finished before) or ``"unfinished"`` (stopped by ``stop_after`` or a signal).
  """
  root = pathlib.Path(workdir).absolute()
  sweep = read_json(root / SWEEP_FILE)
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
  if summary.get("interrupted_by_signal") or not chain.is_trained(run_dir, int(config.train.steps)):
    return "unfinished"

  train_rows, _ = read_run_metrics(run_dir)
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
  write_json(run_dir / RESULT_FILE, {"name": name, "swept": run["swept"], "metrics": result})
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
  import jax  # here, not at CLI start-up
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
