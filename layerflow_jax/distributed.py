"""Multi-process start-up: ``jax.distributed.initialize`` from the environment, with timeouts that end every process.

Where the process count and rank come from (first match wins):

* **explicit** — ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
  optionally ``JAX_LOCAL_DEVICE_IDS`` (what ``launch/local.py`` and the GKE recipe set);
* **SLURM** — ``srun`` with more than one task (``SLURM_STEP_NUM_TASKS`` > 1): jax reads ``SLURM_PROCID``,
  ``SLURM_STEP_NODELIST`` … itself (``cluster_detection_method`` auto), one process per GPU;
* **TPU** — a multi-host TPU VM or GKE TPU pod (``TPU_WORKER_HOSTNAMES`` lists more than one host, or
  ``MEGASCALE_COORDINATOR_ADDRESS`` is set for multi-slice): jax auto-detects everything;
* otherwise one process: nothing to initialize.

Set ``LAYERFLOW_DISTRIBUTED=0`` to skip initialization (e.g. a single-process tool inside an ``srun``).

On CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``), set before any backend
exists. Failure modes end in bounded time with a message that names the cause:

* the coordinator unreachable, or a peer that never starts: ``LAYERFLOW_INIT_TIMEOUT_S`` (default 300) — a
  watchdog prints which process waited for what and exits with :data:`EXIT_PEER_LOST`;
* a peer that dies (or hangs) after start-up: ``LAYERFLOW_HEARTBEAT_TIMEOUT_S`` (default 100) — jax's coordination
  service stops the remaining processes; a collective that sees the dead peer first raises at once, and
  :func:`initialize` installs an excepthook that turns that error into one line naming the cause and exits
  with :data:`EXIT_PEER_LOST`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import threading
import time
from types import TracebackType
from typing import Any, NoReturn

import jax

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the job may be retried (the scheduler's requeue can key on it)

ENV_INIT_TIMEOUT = "LAYERFLOW_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "LAYERFLOW_HEARTBEAT_TIMEOUT_S"
ENV_SWITCH = "LAYERFLOW_DISTRIBUTED"

# Messages of errors raised when another process disappeared (gloo, gRPC coordination service, NCCL).
_PEER_ERROR_MARKERS = (
  "Connection closed by peer",
  "Connection reset by peer",
  "Gloo",
  "heartbeat",
  "coordination service",
  "DEADLINE_EXCEEDED",
  "UNAVAILABLE",
  "NCCL",
  "Socket closed",
)


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was started: ``method`` is ``"explicit"``, ``"slurm"``, ``"tpu"`` or ``"single"``."""

  method: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def _int_env(env, name: str) -> int | None:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _timeout(env, name: str, default: int) -> int:
  value = _int_env(env, name)
  if value is None:
    return default
  if value <= 0:
    raise ValueError(f"environment variable {name}={value} must be a positive number of seconds")
  return value


def detect(env=None) -> Launch:
  """Which launcher started this process, from environment variables only (nothing is initialized)."""
  env = os.environ if env is None else env
  if env.get(ENV_SWITCH, "").lower() in ("0", "false", "no", "off"):
    return Launch("single")
  n = _int_env(env, "JAX_NUM_PROCESSES")
  if n is not None or env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_PROCESS_ID"):
    coordinator, rank = env.get("JAX_COORDINATOR_ADDRESS"), _int_env(env, "JAX_PROCESS_ID")
    missing = [
      k
      for k, v in (
        ("JAX_COORDINATOR_ADDRESS", coordinator),
        ("JAX_NUM_PROCESSES", n),
        ("JAX_PROCESS_ID", rank),
      )
      if v is None
    ]
    if missing:
      raise ValueError(
        f"multi-process environment incomplete: {', '.join(missing)} unset (the explicit launch "
        "needs JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
      )
    assert coordinator is not None and n is not None and rank is not None  # else `missing` raised above
    if ":" not in coordinator:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS={coordinator!r}: expected host:port")
    if n < 1 or not 0 <= rank < n:
      raise ValueError(f"JAX_PROCESS_ID={rank} with JAX_NUM_PROCESSES={n}: expected 0 <= id < count")
    ids = env.get("JAX_LOCAL_DEVICE_IDS")
    local = tuple(int(x) for x in ids.split(",")) if ids else None
    return Launch("explicit" if n > 1 else "single", coordinator, n, rank, local)
  # srun sets SLURM_STEP_NUM_TASKS for its tasks; the batch script itself (no srun) is one process even though
  # SLURM_NTASKS counts the whole allocation.
  if (_int_env(env, "SLURM_STEP_NUM_TASKS") or 1) > 1 and env.get("SLURM_PROCID") is not None:
    return Launch(
      "slurm", num_processes=_int_env(env, "SLURM_STEP_NUM_TASKS"), process_id=_int_env(env, "SLURM_PROCID")
    )
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Launch("tpu", num_processes=len(hosts) or None, process_id=_int_env(env, "TPU_WORKER_ID"))
  return Launch("single")


def _use_gloo_on_cpu() -> None:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if not platforms:
    platforms = str(jax.config.jax_platforms or "")  # pyright: ignore[reportAttributeAccessIssue]  # not in stub
  if not platforms or "cpu" in platforms.split(","):
    # Must precede backend creation; harmless when the job turns out to run on accelerators.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _fail(message: str) -> NoReturn:
  """Prints a one-line cause to stderr and exits the process now (from any thread)."""
  sys.stderr.write(f"layerflow: {message}\n")
  sys.stderr.flush()
  os._exit(EXIT_PEER_LOST)


def initialize(env=None) -> Launch:
  """Joins the job described by the environment (idempotent; a no-op for a single process).

  Returns what was detected. Exits the process with :data:`EXIT_PEER_LOST` and a clear message when the job does
  not assemble within ``LAYERFLOW_INIT_TIMEOUT_S``.
  """
  env = os.environ if env is None else env
  launch = detect(env)
  if launch.method == "single" or jax.distributed.is_initialized():
    return launch
  init_timeout = _timeout(env, ENV_INIT_TIMEOUT, 300)
  heartbeat = _timeout(env, ENV_HEARTBEAT_TIMEOUT, 100)
  _use_gloo_on_cpu()
  who = (
    f"process {launch.process_id} of {launch.num_processes}"
    if launch.process_id is not None
    else "this process"
  )
  where = launch.coordinator or f"the {launch.method} coordinator"
  done = threading.Event()

  def watchdog():
    if not done.wait(init_timeout):
      _fail(
        f"{who} could not join the job within {init_timeout} s ({ENV_INIT_TIMEOUT}): the coordinator "
        f"{where} is unreachable or a peer process never started; exiting so no process hangs"
      )

  threading.Thread(target=watchdog, name="layerflow-init-watchdog", daemon=True).start()
  start = time.time()
  kwargs: dict[str, Any] = dict(
    initialization_timeout=init_timeout + 30,  # the watchdog, with the clearer message, fires first
    heartbeat_timeout_seconds=heartbeat,
  )
  if launch.method == "explicit":
    kwargs.update(
      coordinator_address=launch.coordinator,
      num_processes=launch.num_processes,
      process_id=launch.process_id,
      local_device_ids=launch.local_device_ids,
    )
  elif launch.method == "slurm":  # jax derives the coordinator (first node) and local GPU from SLURM itself
    kwargs.update(num_processes=launch.num_processes, process_id=launch.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # bad address, refused bind …: fail now, with the cause
    _fail(f"{who} could not join the job at {where}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  finally:
    done.set()
  log.info(
    "%s joined the job at %s in %.1f s (%d devices, %d local); a peer silent for %d s stops the job",
    who,
    where,
    time.time() - start,
    jax.device_count(),
    jax.local_device_count(),
    heartbeat,
  )
  _install_excepthook()
  return launch


def _install_excepthook() -> None:
  """An uncaught error caused by a lost peer ends this process at once with one clear line (and
  :data:`EXIT_PEER_LOST`), instead of a traceback followed by jax's shutdown barrier waiting for the dead peer."""
  previous = sys.excepthook

  def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None):
    if exc is not None and is_peer_failure(exc):
      previous(exc_type, exc, tb)
      _fail(peer_lost_message(exc))
    previous(exc_type, exc, tb)

  sys.excepthook = hook


def peer_lost_message(error: BaseException) -> str:
  first = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
  return (
    f"process {jax.process_index()} of {jax.process_count()}: another process of the job stopped "
    f"({first}); exiting instead of waiting for it"
  )


def is_primary() -> bool:
  """True on process 0 (the one that logs and writes files shared by the job)."""
  return jax.process_index() == 0


def is_peer_failure(error: BaseException) -> bool:
  """Whether ``error`` looks like a collective or coordination failure caused by another process."""
  if jax.process_count() == 1:
    return False
  text = f"{type(error).__name__}: {error}"
  return any(m.lower() in text.lower() for m in _PEER_ERROR_MARKERS)


def host_description() -> str:
  """This host's CPU model, the cores this process may use, and ``XLA_FLAGS`` (for timings that name the machine)."""
  model = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  flags = os.environ.get("XLA_FLAGS", "")
  return f"{model}, {cores} cores" + (f", XLA_FLAGS={flags!r}" if flags else "")
