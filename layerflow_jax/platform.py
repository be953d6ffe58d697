"""Start-up on a host without TPU chips when libtpu is installed (the ``tpu`` extra, which CI installs).

jax registers a TPU backend whenever libtpu is importable and, unless ``JAX_PLATFORMS`` is set, tries it first: on a
CPU or GPU machine libtpu then logs an ``INVALID_ARGUMENT … TPU_WORKER_HOSTNAMES`` error and a metadata warning on
every start (≈ 0.3 s) before jax falls back. :func:`skip_absent_tpu` drops that backend when this host has no TPU
chips, before any backend is created: its factory is swapped for one that fails at once, which jax skips quietly
(the platform stays registered, so lowering for compile-only TPU devices still works). Compile-only TPU devices (``layerflow compile --topology tpu:…``) do not go
through the backend, so they still work; a host with TPU chips is left alone.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os


def _no_chips():
  raise RuntimeError("this host has no TPU chips (layerflow_jax.platform.skip_absent_tpu)")


def skip_absent_tpu() -> bool:
  """Skips jax's TPU backend when libtpu is installed but this host has no TPU chips; True if it did.

  Leaves everything as it is when ``JAX_PLATFORMS`` is set (the user chose) or jax's backends already exist.
  """
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return False
  from jax._src import hardware_utils, xla_bridge  # only with libtpu: the CLI calls this before importing jax

  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 or xla_bridge.backends_are_initialized():
    return False
  registration = xla_bridge._backend_factories.get("tpu")
  if registration is None or not registration.fail_quietly:
    return False
  xla_bridge._backend_factories["tpu"] = dataclasses.replace(registration, factory=_no_chips)
  return True
