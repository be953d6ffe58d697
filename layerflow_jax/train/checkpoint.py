"""Orbax checkpoints of the train state, the data-iterator state and the config, with auto-resume.

Layout: ``WORKDIR/checkpoints/<step>/{state, data, meta}``. Orbax writes each step to a temporary directory and
renames it when complete, so a partial save (a process killed mid-write) is never listed as a step; the writer
deletes such leftovers when it starts. When to save is Orbax's save-decision policy: every N steps and/or at
least M seconds after the previous checkpoint (the time decision is taken on the primary host and broadcast, so
all hosts agree). A state with a non-finite value is never written.

``restore_latest`` walks the steps newest first and falls back to the previous one, with a warning, when the
newest cannot be read; the trainer then moves the damaged step aside (``<step>.damaged``) so the run can write
that step again. If no step can be read at all the error is raised instead of silently starting over: that is
what a config that no longer matches the checkpoints looks like.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections as mlc
import orbax.checkpoint as ocp

from layerflow_jax import chain
from layerflow_jax import config as config_lib

log = logging.getLogger(__name__)


class NonFiniteStateError(FloatingPointError):
  """Refused to write a checkpoint: the state holds NaN or Inf."""


class CheckpointError(RuntimeError):
  """No checkpoint in a work dir can be restored."""


def _abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
  """True when every floating-point value in ``tree`` is finite (one compiled reduction, any sharding)."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_all_finite(leaves)) if leaves else True


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class Checkpointer:
  """One work dir's checkpoints.

  ``every_steps`` / ``every_seconds`` (0 = off) decide when :meth:`save` without ``force`` writes; with both off
  only forced saves (end of run, signal) write. The time policy also saves at the first opportunity when the
  run has no checkpoint yet. ``writer=True`` (the trainer) deletes temporary directories that a killed save
  left behind; readers (sampling, evaluation) must not, since a trainer may be writing one right now.
  """

  def __init__(
    self,
    workdir: str | pathlib.Path,
    *,
    keep: int = 2,
    every_steps: int = 0,
    every_seconds: float = 0.0,
    async_save: bool = False,
    writer: bool = False,
  ):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    policies = []
    if every_steps > 0:
      policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(int(every_steps)))
    if every_seconds > 0:
      # orbax annotates int; it only compares the (float) seconds elapsed against it
      policy = ocp.checkpoint_managers.ContinuousCheckpointingPolicy
      policies.append(policy(minimum_interval_secs=every_seconds))  # pyright: ignore[reportArgumentType]
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=writer,
      save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data", "meta")
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, *, iterator=None, meta: dict | None = None, force: bool = True) -> bool:
    """Writes ``step`` if ``force`` or the save policy says so; returns whether it wrote.

    Raises :class:`NonFiniteStateError` (writing nothing) when the state holds NaN/Inf. A step that is already
    on disk is not written again.
    """
    if not force and not self.due(step):
      return False
    latest = self.manager.latest_step()
    if latest is not None and latest >= step:
      return False
    if not all_finite(state):
      raise NonFiniteStateError(
        f"step {step}: the train state holds NaN/Inf; no checkpoint written (newest good one: "
        f"{self.directory / str(latest) if latest is not None else 'none'})"
      )
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(iterator)
    return bool(self.manager.save(step, args=ocp.args.Composite(**args), force=True))

  def due(self, step: int) -> bool:
    """Whether the save policy (``every_steps`` / ``every_seconds``) wants ``step`` written."""
    return bool(self.manager.should_save(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state, shardings, *, iterator=None) -> tuple[Any, dict]:
    args = {
      "state": ocp.args.StandardRestore(_abstract_with_shardings(abstract_state, shardings)),
      "meta": ocp.args.JsonRestore(),
    }
    other_topology = iterator is not None and self._iterator_file(step) is None
    if iterator is not None and not other_topology:
      args["data"] = grain.checkpoint.CheckpointRestore(iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    if other_topology:
      self._restore_iterator_from_other_topology(step, iterator)
    return out["state"], out["meta"]

  def _iterator_file(self, step: int) -> pathlib.Path | None:
    """This process's data-iterator file of ``step`` (Grain writes one per process), or None."""
    path = (
      self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    )
    return path if path.exists() else None

  def _restore_iterator_from_other_topology(self, step: int, iterator) -> None:
    """A checkpoint written by another process count (a topology change): the iterator continues from process 0's
    position. The training pipeline counts global batches in every process, so that position is the run's; the
    batches themselves are the same only where the pipeline splits by global batch (data.mixture sources split
    records by stride, so there the continuation is a different but valid order)."""
    files = sorted((self.directory / str(step) / "data").glob("process_0-of-*.json"))
    if not files:
      raise CheckpointError(f"{self.directory / str(step)}: no data-iterator state to resume from")
    iterator.set_state(json.loads(files[0].read_text()))
    log.warning(
      "checkpoint %s was written by %s; this run has %d process(es): the data iterator continues "
      "from process 0's position",
      self.directory / str(step),
      files[0].stem.split("_", 1)[1],
      jax.process_count(),
    )

  def restore_latest(self, abstract_state, shardings, *, iterator=None, quarantine: bool = False):
    """(state, meta, step) of the newest readable checkpoint, or (None, None, None) when there is none.

    An unreadable newer step is skipped with a warning (and with ``quarantine`` renamed to ``<step>.damaged``
    once an older one restored, which shows the config fits). Raises :class:`CheckpointError` when steps
    exist but none can be read. With ``iterator``, its position is that of the step returned.
    """
    steps = self.steps()
    failed: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state, shardings, iterator=iterator)
      except Exception as e:  # a damaged checkpoint: fall back to the previous one
        failed.append((step, _first_line(e)))
        log.warning(
          "checkpoint %s is unreadable (%s); falling back to the previous one",
          self.directory / str(step),
          failed[-1][1],
        )
        continue
      if failed:
        log.warning("resuming from step %d instead of the damaged step(s) %s", step, [s for s, _ in failed])
        if quarantine:
          self._quarantine([s for s, _ in failed])
      return state, meta, step
    if failed:
      raise CheckpointError(
        f"{self.directory}: none of the checkpoints {steps} can be restored into this config (step "
        f"{failed[0][0]}: {failed[0][1]}); expected checkpoints written with the same model and optimizer "
        f"config (use a new work dir to start over)"
      )
    return None, None, None

  def _quarantine(self, steps: list[int]) -> None:
    """Renames damaged steps to ``<step>.damaged`` (ignored by Orbax), so the run can write those steps again."""
    if jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        dest = self.directory / f"{step}.damaged"
        n = 1
        while dest.exists():
          n += 1
          dest = self.directory / f"{step}.damaged{n}"
        if src.exists():
          src.rename(dest)
          log.warning("moved the damaged checkpoint %s to %s", src, dest)
    ocp.multihost.sync_global_processes("layerflow_checkpoint_quarantine")
    self.manager.reload()

  def read_meta(self, step: int | None = None) -> dict:
    """The meta item of ``step`` (default: the newest step whose meta is readable)."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for s in [step] if step is not None else reversed(steps):
      try:
        return self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:
        errors.append(f"step {s}: {_first_line(e)}")
        log.warning("checkpoint %s: meta unreadable (%s)", self.directory / str(s), errors[-1])
    raise CheckpointError(f"{self.directory}: no readable checkpoint meta ({'; '.join(errors)})")

  def close(self) -> None:
    """Waits for pending saves and closes the manager (a second call does nothing)."""
    if getattr(self, "_closed", False):
      return
    self._closed = True
    self.manager.wait_until_finished()
    # A writer's manager starts deleting temporary directories in a background thread when it is built, and
    # only its save() waits for that; its close() does not (orbax 0.12.8). A run stopped before its first save
    # (a second Ctrl-C during start-up) closed the manager under that thread, which then died with a
    # "cannot schedule new futures after shutdown" traceback after the run's one-line error.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()


def config_to_meta(config: mlc.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True)


def config_from_meta(text: str) -> mlc.ConfigDict:
  """The config a checkpoint was written with; keys declared since (configs/default.py) take their defaults."""
  return config_lib.complete(mlc.ConfigDict(json.loads(text)))


def has_checkpoints(workdir: str | pathlib.Path) -> bool:
  """Whether ``WORKDIR/checkpoints`` holds a complete step, so a run resumes (without creating anything)."""
  return bool(chain.complete_steps(workdir))


def find_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """Accepts a workdir (with ``checkpoints/``) or the ``checkpoints`` directory itself."""
  p = pathlib.Path(path)
  if (p / "checkpoints").is_dir():
    return p
  if p.name == "checkpoints" and p.is_dir():
    return p.parent
  raise FileNotFoundError(f"{path}: no checkpoints found (expected a work dir containing checkpoints/)")
