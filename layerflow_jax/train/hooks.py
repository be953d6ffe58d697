"""What the training loop does after a step: hooks that run every ``every`` steps and once at the end.

Two kinds, which :class:`Schedule` runs in the order they are given:

* a :class:`MetricHook` reads a step's metrics only (the metric rows, the non-finite guard), for every step.
  It runs one step late, while the next step computes (reading a step's scalars waits for it), so the host
  prepares and dispatches batch n+1 while the device computes step n;
* a :class:`Hook` reads the train state (evaluation, checkpoints, previews) after the steps where it is due.
  Before one runs after step n, the metric hooks see step n: nothing is evaluated or written after a step the
  guard has not seen. At the end the hooks run in reverse order, as nested contexts unwind: the final save
  comes before the final evaluation, which cannot lose it.

Each ``every`` is the config's setting (0 = off); a hook whose cadence is more than a multiple overrides
:meth:`Hook.due`. (A step's train state is donated to the next step, so only a :class:`Hook`, which runs
before that step, is given it.)
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax

if TYPE_CHECKING:  # annotations only: the hooks are given these objects
  from layerflow_jax.stopping import StopSignals
  from layerflow_jax.train.checkpoint import Checkpointer
  from layerflow_jax.train.logging import MetricWriter

log = logging.getLogger(__name__)


class MetricHook:
  """Sees every step's metrics (on-device scalars), never the state: it may run while the next step
  computes."""

  def after_step(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Called for every step, in order."""


class Hook:
  """Runs after the steps where :meth:`due` holds (multiples of ``every``; 0 = never) and at the end."""

  every: int = 0

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def after_step(self, step: int, state) -> None:
    """Called after ``step`` when :meth:`due` holds."""

  def at_end(self, step: int, state) -> dict:
    """Called once when the loop ends at ``step`` (after its last :meth:`after_step`); returns entries for the
    run's summary."""
    del step, state
    return {}


class Schedule:
  """Runs ``metric_hooks`` and ``hooks`` after each step (see the module docstring)."""

  def __init__(self, metric_hooks: Sequence[MetricHook], hooks: Sequence[Hook]):
    self.metric_hooks, self.hooks = tuple(metric_hooks), tuple(hooks)
    self._pending: tuple[int, Mapping[str, Any]] | None = None

  def flush(self) -> None:
    """The metric hooks see the step still pending (if any)."""
    if self._pending is not None:
      step, metrics = self._pending
      self._pending = None
      for h in self.metric_hooks:
        h.after_step(step, metrics)

  def after_step(self, step: int, state, metrics: Mapping[str, Any]) -> None:
    self.flush()  # the previous step, while this one computes
    due = [h for h in self.hooks if h.due(step)]
    self._pending = (step, metrics)
    if due:
      self.flush()
    for h in due:
      h.after_step(step, state)

  def at_end(self, step: int, state) -> dict:
    """The pending step's metric hooks, then every hook's :meth:`Hook.at_end` (last first); returns their
    summary entries."""
    self.flush()
    out = {}
    for h in reversed(self.hooks):
      out.update(h.at_end(step, state))
    return out


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps with non-finite gradients (``train.max_consecutive_nonfinite``)."""


class MetricsLog(MetricHook):
  """A metrics.jsonl row (and the progress bar's loss) every ``train.log_every`` steps, at the loop's last
  step ``total``, and at every step whose update was skipped as non-finite."""

  def __init__(self, writer: MetricWriter, bar, *, every: int, start: int, total: int, t0: float):
    self.writer, self.bar, self.every, self.start, self.total, self.t0 = writer, bar, every, start, total, t0
    self.last: dict = {}  # the newest row

  def after_step(self, step: int, metrics: Mapping[str, Any]) -> None:
    if int(metrics["nonfinite_in_a_row"]) or step % self.every == 0 or step == self.total:
      m = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
      m["steps_per_s"] = (step - self.start) / max(time.time() - self.t0, 1e-9)
      self.last = self.writer.write(step, m)
      self.bar.set_postfix(loss=f"{m['loss']:.4f}")


class NonFiniteGuard(MetricHook):
  """The compiled step already skipped a non-finite update (optax.apply_if_finite); here it is reported and,
  ``train.max_consecutive_nonfinite`` in a row, stops the run. Every step is seen, not only logged ones."""

  def __init__(self, ck: Checkpointer, max_in_a_row: int):
    self.ck, self.max_in_a_row = ck, max_in_a_row

  def after_step(self, step: int, metrics: Mapping[str, Any]) -> None:
    in_a_row = int(metrics["nonfinite_in_a_row"])
    if not in_a_row:
      return
    log.warning(
      "step %d: non-finite loss/gradients, update skipped (%d in a row, %d skipped in total)",
      step,
      in_a_row,
      int(metrics["skipped_nonfinite"]),
    )
    if in_a_row >= self.max_in_a_row:
      raise NonFiniteError(
        f"stopping at step {step}: {in_a_row} consecutive steps had non-finite loss/gradients "
        f"(train.max_consecutive_nonfinite={self.max_in_a_row}); their updates were skipped and no "
        f"checkpoint was written from them (newest checkpoint: step {self.ck.manager.latest_step()}); "
        f"expected finite data and a stable lr"
      )


class EvalHook(Hook):
  """The validation losses every ``train.eval_every`` steps (not at the loop's last step ``total``) and, when
  the run reaches ``train.steps``, at the end. ``evaluate(state)`` returns them (``None``: no validation
  batches, nothing written)."""

  def __init__(
    self, evaluate: Callable[[Any], dict | None], writer: MetricWriter, *, every: int, total: int, steps: int
  ):
    self.evaluate, self.writer, self.every, self.total, self.steps = evaluate, writer, every, total, steps

  def run(self, step: int, state) -> dict:
    m = self.evaluate(state)
    if m is None:
      return {}
    self.writer.write(step, m)
    return m

  def due(self, step: int) -> bool:
    return super().due(step) and step != self.total

  def after_step(self, step: int, state) -> None:
    self.run(step, state)

  def at_end(self, step: int, state) -> dict:
    return {"final": self.run(step, state)} if step == self.steps else {}


class CheckpointHook(Hook):
  """Saves when the Checkpointer's policy wants the step (``train.checkpoint_every`` /
  ``train.checkpoint_every_seconds``), at the loop's last step ``total`` and after a signal. At the end: the
  signal's step (when the signal came after this step's save decision; a step on disk is not rewritten), or
  step 0 of a run of ``train.steps=0`` (the ``init_from`` parameters, as they are)."""

  def __init__(
    self, ck: Checkpointer, stop: StopSignals, iterator, config_json: str, *, start: int, total: int
  ):
    self.ck, self.stop, self.iterator, self.config_json = ck, stop, iterator, config_json
    self.start, self.total = start, total

  def due(self, step: int) -> bool:
    return step == self.total or bool(self.stop.signal) or self.ck.due(step)

  def after_step(self, step: int, state) -> None:
    self.ck.save(step, state, iterator=self.iterator, meta={"config": self.config_json, "step": int(step)})

  def at_end(self, step: int, state) -> dict:
    out = {}
    if self.total == 0 and self.start == 0 and not self.stop.signal:
      self.after_step(0, state)
    if self.stop.signal:
      self.after_step(step, state)
      log.warning("signal %d: saved step %d, exiting", self.stop.signal, step)
      out["interrupted_by_signal"] = int(self.stop.signal)
    self.ck.wait()
    return out
