"""The plan of a sweep work dir: sweep.json and each run's run.json, the file helpers and locks the runners share,
and what is finished."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

from layerflow_jax.config import ConfigError
from layerflow_jax.sweep.dsl import expand

SWEEP_FILE = "sweep.json"
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
ATTEMPTS_FILE = "attempts.jsonl"
SHARED_DIR = "_shared"

# ----------------------------------------------------------------------------- files and locks


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic: a reader sees the old file or the whole new one, never a partial one."""
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  os.replace(tmp, path)


def read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def append_jsonl(path: pathlib.Path, obj: Mapping) -> None:
  with path.open("a") as f:
    f.write(json.dumps(obj, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: pathlib.Path):
  """An exclusive lock between processes (also across SLURM tasks on a file system with POSIX locks)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def is_finished(run_dir: pathlib.Path) -> bool:
  """Whether a sweep run is done: its result.json is recorded, which the runner writes only once the run's training
  is finished (``chain.is_trained``, the one rule) and measured; a run trained but not measured yet is resumed."""
  return (run_dir / RESULT_FILE).exists()


# ----------------------------------------------------------------------------- the plan


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
      old = read_json(d / RUN_FILE)
      if (old.get("spec"), old.get("overrides")) != (r["spec"], r["overrides"]):
        raise ConfigError(
          f"run dir {d} was made by {old.get('spec')} {old.get('overrides')}, not by "
          f"{r['spec']} {r['overrides']}; use another --workdir"
        )
    else:
      d.mkdir(parents=True, exist_ok=True)
      write_json(d / RUN_FILE, record)
  write_json(
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


# ----------------------------------------------------------------------------- what a run dir holds


def read_run_metrics(run_dir: pathlib.Path) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) of a run's metrics.jsonl; after a resume the last row of each step wins."""
  from layerflow_jax.train.logging import read_metrics  # imports jax: here, not at CLI start-up

  train, evals = {}, {}
  for row in read_metrics(run_dir):
    if "loss" in row:
      train[row["step"]] = row
    if "val_loss" in row:
      evals[row["step"]] = row
  return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]
