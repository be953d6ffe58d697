"""The one trainer: every stage (base, motion LoRA, content LoRA) is this loop with another config.

Resumes automatically from ``WORKDIR/checkpoints`` (state, RNG and data-iterator position; the newest readable
step); starts from ``config.train.init_from`` (a previous stage's work dir: parameters only, fresh optimizer)
otherwise. Checkpoints every ``train.checkpoint_every`` steps and/or ``train.checkpoint_every_seconds``. SIGTERM and
SIGINT finish the current step, save and return. Non-finite updates are skipped inside the compiled step and
counted; ``train.max_consecutive_nonfinite`` in a row stop the run. ``train.inject_nan_steps`` (tests) poisons the
batches of those steps. Every ``train.sample_every`` steps the current weights sample every trained task
(:mod:`layerflow_jax.train.previews`). What runs after a step (metric rows, the non-finite guard, evaluation,
checkpoints, previews) are the hooks of :mod:`layerflow_jax.train.hooks`, each at its setting's cadence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from tqdm import tqdm

from data_pipelines import pipeline
from layerflow_jax import distributed, stopping, validate
from layerflow_jax import sharding as shd
from layerflow_jax.config import ConfigError
from layerflow_jax.errors import InputError, RunError
from layerflow_jax.train import checkpoint as ckpt_lib
from layerflow_jax.train import hooks, partition, previews, workdir_lock
from layerflow_jax.train import logging as log_lib
from layerflow_jax.train import step as step_lib
from layerflow_jax.train.experiment import Experiment

log = logging.getLogger(__name__)


def global_batch(exp: Experiment, local: dict) -> dict:
  """This process's rows of a batch (NumPy) → the global batch of ``exp.batch_spec`` (jax.Arrays sharded over
  the batch axes of the mesh); a ``ValueError`` naming the key where a row does not fit the spec. (The rows
  are usually ``data.batch_size // process_count``; one process's last evaluation batch may have fewer.)"""
  out = {}
  for k, s in exp.batch_spec.items():
    x = np.asarray(local[k])
    if x.shape[1:] != s.shape[1:] or x.dtype != s.dtype:
      raise ValueError(
        f"batch key {k!r}: rows of {x.dtype}{list(x.shape[1:])}, the batch spec's are "
        f"{s.dtype}{list(s.shape[1:])}"
      )
    out[k] = jax.make_array_from_process_local_data(s.sharding, x)
  return out


def load_params(path: str | pathlib.Path, mesh=None, *, use_ema: bool | None = None) -> tuple[dict, Any]:
  """Full flat parameters (EMA when the run used it) and the config of the newest checkpoint under ``path``."""
  params, config, _ = load_checkpoint(path, mesh, use_ema=use_ema)
  return params, config


def load_checkpoint(
  path: str | pathlib.Path, mesh=None, *, use_ema: bool | None = None
) -> tuple[dict, Any, dict]:
  """:func:`load_params` plus which step was used: ``{"step", "newest", "directory", "used"}`` where ``used``
  is a one-line description naming the step (and the newer steps skipped as unreadable, if any)."""
  workdir = ckpt_lib.find_checkpoint_dir(path)
  ck = ckpt_lib.Checkpointer(workdir)
  try:
    steps = ck.steps()
    if not steps:
      raise InputError(
        f"{ck.directory}: holds no finished checkpoint; expected checkpoints/<step>/ written "
        f"by layerflow train"
      )
    meta = ck.read_meta()
    config = ckpt_lib.config_from_meta(meta["config"])
    exp = Experiment(config, mesh)
    abstract = exp.abstract_state()
    state, _, step = ck.restore_latest(abstract, exp.state_shardings(abstract))
    if state is None or step is None:
      raise InputError(f"{ck.directory}: none of the steps {steps} could be read")
    skipped = [s for s in steps if s > step]
    used = f"step {step} of {ck.directory}" + (
      f" (the newer step(s) {skipped} are unreadable; fell back to step {step})" if skipped else ""
    )
    info = {"step": int(step), "newest": int(steps[-1]), "directory": str(ck.directory), "used": used}
    return exp.full_params(state, use_ema), config, info
  finally:
    ck.close()


class _StopFlag(stopping.StopSignals):
  """Set by SIGTERM/SIGINT; the loop saves and exits after the current step.

  A second signal of the same kind while the first is pending restores the previous handler and re-sends
  itself, so an impatient Ctrl-C Ctrl-C still stops a run stuck in a long compilation or save. Python ignores
  an exception raised where the handler happened to run inside a garbage-collector callback or ``__del__``
  (seen: the second Ctrl-C during start-up was swallowed there and the run went on), so a second SIGINT is
  also recorded in ``forced`` and :meth:`check` raises it again at the loop's next boundary.
  """

  forced = None
  _deferring = False
  _deferred = None

  @contextlib.contextmanager
  def deferred(self):
    """A second signal inside this block takes effect when it ends. Orbax's manager starts a background thread
    in its constructor (the deletion of temporary directories) that only the finished manager can wait for: a
    KeyboardInterrupt raised inside the constructor left that thread running into interpreter shutdown, where
    it printed a traceback after the run's one-line error (seen under load)."""
    self._deferring = True
    try:
      yield
    finally:
      self._deferring = False
      signum, self._deferred = self._deferred, None
      if signum is not None:
        self.on_signal(signum)

  def on_signal(self, signum: int) -> None:
    if self.signal == signum and self._deferring:
      self._deferred = signum
      return
    if self.signal == signum:
      previous = self.previous_handler(signum)
      if previous is signal.default_int_handler:
        self.forced = signum
      signal.signal(signum, previous)
      signal.raise_signal(signum)
      return
    log.warning("signal %d: finishing the current step, then saving and exiting", signum)
    self.signal = signum

  def check(self) -> None:
    """Raises the KeyboardInterrupt of a second SIGINT that an earlier raise could not deliver."""
    if self.forced:
      raise KeyboardInterrupt

  def __enter__(self):
    self._unraisable = sys.unraisablehook

    def hook(info):  # a swallowed KeyboardInterrupt is raised again by check(): no "Exception ignored" trace
      if not (self.forced and isinstance(info.exc_value, KeyboardInterrupt)):
        self._unraisable(info)

    sys.unraisablehook = hook
    return super().__enter__()

  def __exit__(self, *exc):
    sys.unraisablehook = self._unraisable
    return super().__exit__(*exc)


def _validation_batches(exp: Experiment, num_batches: int) -> list[dict]:
  ds = pipeline.make_dataset(
    exp.config, "validation", shard_index=jax.process_index(), shard_count=jax.process_count()
  )
  out = []
  for i in range(min(num_batches, len(ds))):
    batch = ds[i]
    assert batch is not None  # a batched map dataset: only filters give None
    out.append(global_batch(exp, batch))
  return out


def evaluate_loss(exp: Experiment, eval_fn, params: dict, batches: list[dict], seed: int = 1234) -> dict:
  totals: dict[str, float] = {}
  for i, b in enumerate(batches):
    m = eval_fn(params, b, jax.random.key(seed + i))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
  return totals


def train(
  config: mlc.ConfigDict,
  workdir: str | pathlib.Path,
  *,
  mesh=None,
  stop_after: int | None = None,
  progress: bool = True,
) -> dict:
  """Trains to ``config.train.steps`` (or ``stop_after`` more steps); returns a summary dict.

  The config is validated before anything is built (:mod:`layerflow_jax.validate`). SIGTERM/SIGINT at any time
  (also during start-up and compilation) end the run cleanly: the current step finishes, is saved, and this
  returns (``summary["interrupted_by_signal"]``). ``train.max_consecutive_nonfinite`` non-finite steps in a row
  raise :class:`NonFiniteError`.
  """
  distributed.initialize()  # a multi-process job joins before any device is touched (a no-op for one process)
  workdir = pathlib.Path(workdir)
  with _StopFlag() as stop, contextlib.ExitStack() as held:
    try:
      summary = _train(config, workdir, stop, held, mesh=mesh, stop_after=stop_after, progress=progress)
      stop.check()  # a second Ctrl-C swallowed during the final save (after the loop's last check) still counts
      return summary
    except KeyboardInterrupt:  # the second Ctrl-C (see _StopFlag): say what is safe on disk, in one line
      if not stop.signal:
        raise
      raise Interrupted(
        f"interrupted by a second signal {stop.signal} before the run could save and exit; "
        f"{safe_checkpoint(workdir)}"
      ) from None


class Interrupted(RunError):
  """A second SIGINT (Ctrl-C) stopped the run at once, without the final save."""


def safe_checkpoint(workdir: pathlib.Path) -> str:
  """Which checkpoint of ``workdir`` a restart resumes from (finished steps only: Orbax renames a step into
  place when complete, so an interrupted save is a temporary folder that is never read)."""
  d = pathlib.Path(workdir).absolute() / "checkpoints"
  steps = sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []
  if not steps:
    return f"no checkpoint was written yet in {d} (a restart begins at step 0)"
  return f"the newest complete checkpoint is {d / str(steps[-1])} and is safe (a restart resumes from it)"


# Keys a resume may change (steps, logging, evaluation and checkpoint cadence); any other difference from the
# checkpoint's config is refused unless train.allow_config_change.
RESUME_MAY_CHANGE = (
  "train.steps",
  "train.log_every",
  "train.eval_every",
  "train.sample_every",
  "train.checkpoint_every",
  "train.checkpoint_every_seconds",
  "train.keep_checkpoints",
  "train.allow_config_change",
)


def _flat(d, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def config_changes(saved_json: str, config: mlc.ConfigDict) -> list[str]:
  """``key: checkpoint value -> new value`` for every key (but :data:`RESUME_MAY_CHANGE`) that differs. Keys
  declared after the checkpoint was written count at their defaults (what that run used)."""
  old = _flat(json.loads(ckpt_lib.config_to_meta(ckpt_lib.config_from_meta(saved_json))))
  new = _flat(json.loads(ckpt_lib.config_to_meta(config)))
  missing = "(absent)"
  show = lambda v: v if v is missing else json.dumps(v)[:60]
  return [
    f"{k}: {show(old.get(k, missing))} -> {show(new.get(k, missing))}"
    for k in sorted(set(old) | set(new))
    if k not in RESUME_MAY_CHANGE and old.get(k, missing) != new.get(k, missing)
  ]


def check_resume_config(config: mlc.ConfigDict, meta: dict, where: pathlib.Path) -> None:
  """Refuses (:class:`ConfigError`, listing the keys) a resume whose config differs from the checkpoint's."""
  changes = config_changes(meta["config"], config)
  if not changes:
    return
  if config.train.allow_config_change:
    log.warning(
      "resuming %s with a changed config (train.allow_config_change=True): %s", where, "; ".join(changes)
    )
    return
  raise ConfigError(
    f"{where}: resuming step {meta.get('step', '?')} with a config that differs from the "
    f"checkpoint's in {len(changes)} key(s): {'; '.join(changes)}; only "
    f"{', '.join(RESUME_MAY_CHANGE[:-1])} may change on resume: use the same config, a new "
    f"--workdir, or --config.train.allow_config_change=True"
  )


def check_workdir(workdir: pathlib.Path) -> None:
  """Before anything is created: the work dir (and its checkpoints/) must be, or be creatable as, a folder
  this process can write (a probe file, so a read-only mount or an immutable folder is found now, not at the
  first save)."""
  path = workdir.absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise InputError(f"--workdir {workdir}: {existing} is a regular file, not a folder")
  for d in (existing, path / "checkpoints"):
    if not d.is_dir():
      continue
    try:
      with tempfile.TemporaryFile(dir=d, prefix=".layerflow-write-probe-"):
        pass
    except OSError as e:
      raise InputError(
        f"--workdir {workdir}: {d} is not writable ({e.strerror}); expected a folder this "
        f"user can write (checkpoints, metrics and the lock go there)"
      ) from None


NonFiniteError = hooks.NonFiniteError  # raised by the guard hook; callers catch trainer.NonFiniteError


def _poison(local: dict) -> dict:
  """Fault injection (``train.inject_nan_steps``): the batch's video becomes NaN."""
  return {**local, "video": np.full_like(np.asarray(local["video"]), np.nan)}


def _check(config: mlc.ConfigDict, mesh, *, resuming: bool) -> Experiment:
  """Everything about the config that can be refused, before the work dir is created or locked and before
  compiling; the run's :class:`Experiment`."""
  validate.validate(
    config,
    num_devices=jax.device_count(),
    process_count=jax.process_count(),
    mesh_shape=dict(mesh.shape) if mesh is not None else None,
    check_chain=not resuming,
  )
  validate.check_backend(config, jax.default_backend())
  validate.check_precision(
    config,
    jax.default_backend(),
    getattr(jax.devices()[0], "compute_capability", None),
    training=int(config.train.steps) > 0,
  )
  for warning in validate.ineffective_settings(config):
    log.warning("%s", warning)
  exp = Experiment(config, mesh)
  validate.check_param_sharding(
    {k: v.shape for k, v in exp.abstract_params.items()}, exp.param_specs, dict(exp.mesh.shape)
  )
  return exp


def _start_state(exp: Experiment, ck: ckpt_lib.Checkpointer, iterator, init_from: str):
  """The train state (resumed with the iterator's position, chained from ``init_from``, or initialised) and
  its shardings."""
  abstract = exp.abstract_state()
  shardings = exp.state_shardings(abstract)
  restored, _, resumed = ck.restore_latest(abstract, shardings, iterator=iterator, quarantine=True)
  if restored is not None:
    log.info("resumed from %s at step %d", ck.directory, resumed)
    return restored, shardings
  if init_from:
    params, _ = load_params(init_from, exp.mesh)
    log.info("initialised parameters from %s", init_from)
    return exp.init_state(params=params), shardings
  return exp.init_state(), shardings


def _sizes(exp: Experiment, state) -> dict:
  return {
    "trainable_params": partition.count(state.trainable),
    "total_params": sum(int(np.prod(v.shape)) for v in exp.abstract_params.values()),
    "optimizer_state_values": sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0
    ),
    "trainable_selection": partition.describe(exp.selection),
  }


def _train(
  config: mlc.ConfigDict,
  workdir: pathlib.Path,
  stop: "_StopFlag",
  held: contextlib.ExitStack,
  *,
  mesh,
  stop_after: int | None,
  progress: bool,
) -> dict:
  tc = config.train
  resuming = ckpt_lib.has_checkpoints(workdir)
  exp = _check(config, mesh, resuming=resuming)
  iterator = pipeline.make_iterator(
    config,
    shard_index=jax.process_index(),  # the dataset must be built
    shard_count=jax.process_count(),
  )
  check_workdir(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  held.enter_context(workdir_lock.hold(workdir, primary=distributed.is_primary()))
  with stop.deferred():  # see _StopFlag.deferred
    ck = held.enter_context(
      contextlib.closing(
        ckpt_lib.Checkpointer(
          workdir,
          keep=int(tc.keep_checkpoints),
          every_steps=int(tc.checkpoint_every),
          every_seconds=float(tc.checkpoint_every_seconds),
          writer=True,
        )
      )
    )
  if resuming:
    check_resume_config(config, ck.read_meta(), ck.directory)
  writer = log_lib.MetricWriter(workdir)
  state, shardings = _start_state(exp, ck, iterator, tc.init_from)
  start = int(state.step)
  stop.check()
  summary = {"workdir": str(workdir), "start_step": start, **_sizes(exp, state)}
  train_fn = step_lib.compile_train_step(exp, shardings, None)
  eval_fn = step_lib.compile_eval(exp)
  stop.check()
  val_batches = _validation_batches(exp, int(config.eval.num_batches))

  def validation_losses(state) -> dict | None:
    if not val_batches:
      return None
    with shd.use_mesh(exp.mesh):
      return evaluate_loss(exp, eval_fn, exp.full_params(state), val_batches)

  total = int(tc.steps) if stop_after is None else min(int(tc.steps), start + int(stop_after))
  evaluation = hooks.EvalHook(
    validation_losses, writer, every=int(tc.eval_every), total=total, steps=int(tc.steps)
  )
  if start == 0 and not stop.signal:
    summary["initial"] = evaluation.run(0, state)
  samples = previews.SampleHook(exp, writer, workdir)  # train.sample_every (0 = off)
  t0 = time.time()
  bar = tqdm(
    total=total,
    initial=start,
    disable=not progress or jax.process_index() != 0,
    desc="train",
    dynamic_ncols=True,
  )
  metrics_log = hooks.MetricsLog(writer, bar, every=int(tc.log_every), start=start, total=total, t0=t0)
  checkpoints = hooks.CheckpointHook(
    ck, stop, iterator, ckpt_lib.config_to_meta(exp.config), start=start, total=total
  )
  schedule = hooks.Schedule(
    [metrics_log, hooks.NonFiniteGuard(ck, int(tc.max_consecutive_nonfinite))],
    [evaluation, checkpoints, samples],  # in this order after a step; the other way round at the end
  )
  inject = {int(s) for s in tc.inject_nan_steps}
  step = start
  try:
    while step < total and not stop.signal:
      stop.check()
      local = next(iterator)
      if step + 1 in inject:
        local = _poison(local)
      batch = global_batch(exp, local)
      with shd.use_mesh(exp.mesh):
        state, metrics = train_fn(state, batch)
      step += 1
      bar.update(1)
      schedule.after_step(step, state, metrics)
    schedule.flush()
    stop.check()
    bar.close()
    summary.update(schedule.at_end(step, state))
  finally:
    bar.close()
    writer.flush()
    writer.close()
    ck.close()
  summary.update(
    end_step=step,
    seconds=time.time() - t0,
    steps_per_s=(step - start) / max(time.time() - t0, 1e-9),
    last=metrics_log.last,
  )
  return summary
