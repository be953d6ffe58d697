"""The CLI's one error format: ``error: …`` in one line naming the file, key or value; exit 2 for bad input, 1
for a run that failed. Full tracebacks only with ``LAYERFLOW_DEBUG=1``.

Modules raise :class:`InputError` (or :class:`~layerflow_jax.config.ConfigError`, also a ``ValueError``) for
input the user can fix, :class:`RunError` for a run that could not go on; :func:`describe` maps those and the
few foreign errors a user can cause (I/O on a path they gave, a Ctrl-C) to ``(exit code, one line)``.
"""

from __future__ import annotations

import os

from layerflow_jax.config import ConfigError

DEBUG_ENV = "LAYERFLOW_DEBUG"
BAD_INPUT, FAILED = 2, 1


class InputError(ValueError):
  """Bad input (an argument, a path, a config): exit 2. The message names what is wrong and what is
  expected."""


class RunError(RuntimeError):
  """A run that could not go on (a work dir in use, an interrupted save): exit 1."""


def debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _first_line(text: str) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[0] if lines else ""


def _os_error(e: OSError) -> str:
  where = e.filename if e.filename is not None else ""
  if e.filename2 is not None:
    where = f"{where} -> {e.filename2}"
  what = e.strerror or _first_line(str(e)) or type(e).__name__
  return f"{where}: {what}" if where else what


def describe(e: BaseException) -> tuple[int, str] | None:
  """(exit code, one-line message) of an error the CLI reports without a traceback; None for SystemExit."""
  from layerflow_jax.train.checkpoint import (
    CheckpointError,  # orbax and jax: the CLI imports this module on --help
  )

  if isinstance(e, SystemExit):
    return None
  if isinstance(e, (ConfigError, InputError)):
    return BAD_INPUT, _first_line(str(e))
  if isinstance(e, (RunError, CheckpointError, FloatingPointError)):  # NonFiniteError, NonFiniteStateError
    return FAILED, _first_line(str(e))
  if isinstance(e, KeyboardInterrupt):
    return FAILED, "interrupted (Ctrl-C)"
  if isinstance(e, OSError):  # a path the user gave: missing, read-only, under a regular file …
    return BAD_INPUT, _os_error(e) if e.strerror or e.filename else _first_line(str(e))
  if isinstance(e, Exception):
    return FAILED, (f"{type(e).__name__}: {_first_line(str(e))} (set {DEBUG_ENV}=1 for the traceback)")
  return None
