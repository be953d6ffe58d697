"""Graceful stop on SIGTERM / SIGINT: the signal is recorded instead of ending the process at once."""

from __future__ import annotations

import signal


class StopSignals:
  """Context manager: while inside, SIGTERM and SIGINT call :meth:`on_signal` (by default: record it in
  ``self.signal``); the previous handlers come back on exit. Outside the main thread nothing is installed."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    self.on_signal(signum)

  def on_signal(self, signum: int) -> None:
    self.signal = signum

  def previous_handler(self, signum: int):
    return self._old.get(signum, signal.SIG_DFL)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
