"""Stage chains and finished training, each decided once, here: ``train-stages``, sweeps and the trainer's resume
ask this module.

- A work dir's *complete* checkpoints are its ``checkpoints/<step>`` folders: Orbax writes a step to a temporary
  folder and renames it into place when complete, and a damaged step is moved aside to ``<step>.damaged``.
- A work dir's training is *finished* (:func:`is_trained`) when its newest complete checkpoint has reached the
  config's ``train.steps``.
- A stage *chains* from an earlier one (:func:`source_stage`) when its ``train.init_from`` names a stage of
  ``config.stages``; it starts from that stage's work dir, which must be finished (:func:`start_from`). Where
  that work dir is, is the caller's: ``WORKDIR/<stage>`` for ``train-stages``, a shared dir for a sweep.

Nothing here imports jax or Orbax: the sweep CLI asks it before anything heavy is loaded.
"""

from __future__ import annotations

import pathlib

import ml_collections as mlc

from layerflow_jax.config import ConfigError


def complete_steps(workdir: str | pathlib.Path) -> list[int]:
  """The steps of ``WORKDIR/checkpoints`` that are complete, oldest first ([] when there is none)."""
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdecimal() and p.is_dir())


def is_trained(workdir: str | pathlib.Path, steps: int) -> bool:
  """Whether ``workdir``'s training is finished: its newest complete checkpoint has step >= ``steps``."""
  done = complete_steps(workdir)
  return bool(done) and done[-1] >= int(steps)


def source_stage(config: mlc.ConfigDict) -> str | None:
  """The earlier stage whose checkpoint this stage starts from: ``train.init_from`` when it names a stage of
  ``config.stages``; None when it is empty (no chain) or a path (used as it is)."""
  src = config.train.init_from
  return src if src and src in tuple(config.stages) else None


def start_from(config: mlc.ConfigDict, source_dir: pathlib.Path, source_steps: int) -> None:
  """Points ``train.init_from`` (naming an earlier stage) at ``source_dir``, that stage's work dir, once its
  training of ``source_steps`` steps is finished; refuses an unfinished one (ConfigError)."""
  if not is_trained(source_dir, source_steps):
    done = complete_steps(source_dir)
    state = f"stopped at step {done[-1]} of {source_steps}" if done else "has no checkpoint"
    raise ConfigError(
      f"stage {config.stage or '?'}: train.init_from={config.train.init_from!r}: {source_dir} {state}; "
      f"expected that stage trained to its end (run it first)"
    )
  config.train.init_from = str(source_dir)
