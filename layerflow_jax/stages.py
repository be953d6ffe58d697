"""``layerflow train-stages``: run the stages of a stages config in order, each from the previous one.

Each stage trains in ``WORKDIR/<stage>``; a stage's ``train.init_from`` names the previous stage, resolved
inside ``WORKDIR`` and required finished. Finished stages are skipped and an interrupted one resumes from its
checkpoint; a stage stopped by a signal ends the chain (the next call resumes it). What "finished" and "names a
stage" mean is :mod:`layerflow_jax.chain`'s, shared with sweeps.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Sequence

import jax

from layerflow_jax import chain, distributed, validate
from layerflow_jax.config import ConfigError, load_config, split_spec
from layerflow_jax.train import trainer


def stage_spec(spec: str, stage: str) -> str:
  path, arg = split_spec(spec)
  parts = [p for p in (arg or "").split(",") if p and not p.startswith("stage=")]
  return f"{path}:{','.join(parts + [f'stage={stage}'])}"


def stage_names(spec: str) -> tuple[str, ...]:
  return tuple(load_config(spec).stages)


def train_stages(
  spec: str,
  workdir: str | pathlib.Path,
  overrides: Sequence[str] = (),
  *,
  progress: bool = True,
  only: str | None = None,
) -> dict:
  root = pathlib.Path(workdir)
  names = stage_names(spec)
  if not names:
    raise ConfigError(f"{spec}: the config lists no stages (config.stages)")
  wanted = names if not only else tuple(s.strip() for s in only.split(","))
  unknown = [s for s in wanted if s not in names]
  if unknown:
    raise ConfigError(f"--only: unknown stage(s) {unknown}; stages: {list(names)}")
  for name in wanted:  # every stage's config is checked before the first compiles (chain sources come later)
    validate.validate(
      load_config(stage_spec(spec, name), overrides),
      num_devices=jax.device_count(),
      process_count=jax.process_count(),
      check_chain=False,
    )
  trainer.check_workdir(root)
  root.mkdir(parents=True, exist_ok=True)  # only once every stage's config is known to be usable
  results = {}
  for name in names:
    if name not in wanted:
      continue
    config = load_config(stage_spec(spec, name), overrides)
    stage_dir = root / name
    source = chain.source_stage(config)
    if source is not None:
      source_steps = int(load_config(stage_spec(spec, source), overrides).train.steps)
      chain.start_from(config, root / source, source_steps)
    if chain.is_trained(stage_dir, int(config.train.steps)):
      results[name] = {"skipped": "already finished"}
      continue
    t0 = time.time()
    summary = trainer.train(config, stage_dir, progress=progress)
    summary["wall_seconds"] = time.time() - t0
    results[name] = {k: v for k, v in summary.items() if k != "last"}
    if distributed.is_primary():  # one writer per job
      (stage_dir / "summary.json").write_text(json.dumps(results[name], indent=2, default=str))
    if summary.get("interrupted_by_signal"):  # saved; the later stages must not start from it
      break
  return results
