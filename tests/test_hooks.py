"""The training loop's hook schedule (layerflow_jax.train.hooks), with recording fakes: which hook runs after
which step, in which order, and at the end."""

import types

import numpy as np
import pytest

from layerflow_jax.train import hooks


class Recorder(hooks.Hook):
  def __init__(self, name: str, every: int, events: list):
    self.name, self.every, self.events = name, every, events

  def after_step(self, step, state):
    self.events.append((self.name, step, state))

  def at_end(self, step, state):
    self.events.append((self.name, "end", step, state))
    return {self.name: step}


class MetricRecorder(hooks.MetricHook):
  def __init__(self, events: list):
    self.events = events

  def after_step(self, step, metrics):
    self.events.append(("metrics", step, metrics["n"]))


def _run(schedule: hooks.Schedule, steps: int, events: list) -> dict:
  """The trainer's loop with fakes: the state and metrics of step n are "state n" and {"n": n}."""
  for n in range(1, steps + 1):
    events.append(("dispatch", n))
    schedule.after_step(n, f"state {n}", {"n": n})
  schedule.flush()
  return schedule.at_end(steps, f"state {steps}")


def test_a_hook_runs_at_the_multiples_of_every_and_once_at_the_end():
  events = []
  summary = _run(hooks.Schedule([], [Recorder("a", 3, events), Recorder("off", 0, events)]), 10, events)
  assert [e for e in events if e[0] == "a"] == [
    ("a", 3, "state 3"),
    ("a", 6, "state 6"),
    ("a", 9, "state 9"),
    ("a", "end", 10, "state 10"),
  ]
  assert [e for e in events if e[0] == "off"] == [("off", "end", 10, "state 10")]  # every=0: the end only
  assert summary == {"a": 10, "off": 10}


def test_metric_hooks_see_every_step_one_late_and_before_a_due_hook():
  events = []
  _run(hooks.Schedule([MetricRecorder(events)], [Recorder("a", 3, events)]), 5, events)
  assert events == [
    ("dispatch", 1),
    ("dispatch", 2),
    ("metrics", 1, 1),  # step 1 is read while step 2 computes
    ("dispatch", 3),
    ("metrics", 2, 2),
    ("metrics", 3, 3),  # at once: the hook due after step 3 reads a state the metric hooks have seen
    ("a", 3, "state 3"),
    ("dispatch", 4),
    ("dispatch", 5),
    ("metrics", 4, 4),
    ("metrics", 5, 5),  # the loop's flush
    ("a", "end", 5, "state 5"),
  ]


def test_hooks_run_in_order_after_a_step_and_the_other_way_round_at_the_end():
  events = []
  _run(hooks.Schedule([], [Recorder("eval", 2, events), Recorder("save", 2, events)]), 2, events)
  assert [e[:2] for e in events if e[0] != "dispatch"] == [
    ("eval", 2),
    ("save", 2),
    ("save", "end"),  # the final save before the final evaluation
    ("eval", "end"),
  ]


class _Writer:
  def __init__(self):
    self.rows = []

  def write(self, step, metrics):
    self.rows.append((step, dict(metrics)))
    return {"step": step, **metrics}


class _Bar:
  def set_postfix(self, **_):
    pass


def _metrics(bad: bool) -> dict:
  return {"loss": np.float32(0.5), "nonfinite_in_a_row": np.int32(bad), "skipped_nonfinite": np.int32(bad)}


def test_metric_rows_every_log_every_steps_at_the_last_step_and_at_non_finite_ones():
  writer = _Writer()
  log = hooks.MetricsLog(writer, _Bar(), every=4, start=0, total=10, t0=0.0)
  schedule = hooks.Schedule([log], [])
  for n in range(1, 11):
    schedule.after_step(n, None, _metrics(bad=n == 6))
  schedule.flush()
  assert [s for s, _ in writer.rows] == [4, 6, 8, 10]
  assert log.last["step"] == 10 and writer.rows[1][1]["nonfinite_in_a_row"] == 1.0


def test_the_guard_stops_at_max_consecutive_nonfinite():
  ck = types.SimpleNamespace(manager=types.SimpleNamespace(latest_step=lambda: 2))
  schedule = hooks.Schedule([hooks.NonFiniteGuard(ck, 2)], [])
  schedule.after_step(1, None, {"nonfinite_in_a_row": 1, "skipped_nonfinite": 1})
  schedule.after_step(2, None, {"nonfinite_in_a_row": 0, "skipped_nonfinite": 1})
  schedule.after_step(3, None, {"nonfinite_in_a_row": 1, "skipped_nonfinite": 2})
  schedule.after_step(4, None, {"nonfinite_in_a_row": 2, "skipped_nonfinite": 3})  # step 3's: one in a row
  with pytest.raises(
    hooks.NonFiniteError, match=r"^stopping at step 4: 2 consecutive .* checkpoint: step 2\)"
  ):
    schedule.flush()


def test_evaluation_skips_the_loops_last_step_and_runs_at_the_end_of_train_steps():
  writer = _Writer()

  def run(total: int, steps: int) -> tuple[list, dict]:
    writer.rows.clear()

    def losses(state):
      return {"loss": state}

    evaluation = hooks.EvalHook(losses, writer, every=5, total=total, steps=steps)
    summary = _run(hooks.Schedule([], [evaluation]), total, [])
    return [s for s, _ in writer.rows], summary

  assert run(total=10, steps=10) == ([5, 10], {"final": {"loss": "state 10"}})  # 10: once, at the end
  assert run(total=5, steps=10) == ([], {})  # stopped (stop_after) at 5: neither a periodic nor a final one


def test_checkpoints_follow_the_policy_the_last_step_and_a_signal():
  saved = []
  ck = types.SimpleNamespace(
    due=lambda step: step % 4 == 0,
    save=lambda step, state, **_: saved.append(step),
    wait=lambda: None,
  )
  stop = types.SimpleNamespace(signal=None)
  hook = hooks.CheckpointHook(ck, stop, None, "{}", start=0, total=10)
  assert _run(hooks.Schedule([], [hook]), 10, []) == {}
  assert saved == [4, 8, 10]
  saved.clear()
  stop.signal = 15  # after the save decision of step 10: saved at the end
  assert hook.at_end(10, "state") == {"interrupted_by_signal": 15} and saved == [10]
  assert hook.due(3)
