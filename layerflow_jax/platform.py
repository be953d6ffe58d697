"""Start-up on a host without TPU chips when libtpu is installed (the ``tpu`` extra, which CI installs).

jax registers a TPU backend whenever libtpu is importable and, unless ``JAX_PLATFORMS`` is set, tries it first: on a
CPU or GPU machine libtpu then logs an ``INVALID_ARGUMENT … TPU_WORKER_HOSTNAMES`` error and a metadata warning on
every start (≈ 0.3 s) before jax falls back. :func:`skip_absent_tpu` drops that backend when this host has no TPU
chips, before any backend is created. Compile-only TPU devices (``layerflow compile --topology tpu:…``) do not go
through the backend, so they still work; a host with TPU chips is left alone.
"""

from __future__ import annotations

import importlib.util
import os


def skip_absent_tpu() -> bool:
  """Unregisters jax's TPU backend when libtpu is installed but this host has no TPU chips; True if it did.

  Leaves everything as it is when ``JAX_PLATFORMS`` is set (the user chose) or jax's backends already exist.
  """
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return False
  from jax._src import hardware_utils, xla_bridge

  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 or xla_bridge.backends_are_initialized():
    return False
  return xla_bridge._backend_factories.pop("tpu", None) is not None
