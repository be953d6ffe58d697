"""The work-dir lock: one training job per work dir.

The job's primary process holds an advisory ``fcntl.flock`` on ``WORKDIR/train.lock`` for the whole run and
writes its pid, host and start time into it. A second job on the same work dir cannot take the lock and is
refused with one line naming the holder. The kernel drops the lock when its process dies (kill -9 included),
so a lock left by a dead job is simply taken; the pid it still names is reported in a note. (flock is
advisory: it guards against other ``layerflow train`` jobs, not against other programs writing into the work
dir.)
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
from typing import Iterator

from layerflow_jax.errors import RunError

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class WorkdirLocked(RunError):
  """Another live job holds the work dir's lock."""


def _read(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", "replace").strip()
  if not text:
    return {}
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {"raw": text[:100]}
  return holder if isinstance(holder, dict) else {"raw": text[:100]}


def describe(holder: dict) -> str:
  if "pid" not in holder:
    return f"an unknown process ({holder.get('raw', 'no holder recorded')!r})"
  since = f", since {holder['started']}" if holder.get("started") else ""
  return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``acquire()`` / ``release()`` (or ``with``) the lock of ``workdir`` (which must exist)."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirLocked(
        f"work dir {self.workdir} is in use by another training job: {describe(holder)} "
        f"(lock {self.path}); wait for it to finish or stop it, or use another --workdir"
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      log.warning(
        "%s: this file system does not support locks (%s); running without the work-dir lock",
        self.path,
        e.strerror,
      )
    previous = _read(fd)
    if previous:  # the lock is ours, so whoever it names no longer holds it: a job died without releasing
      host = socket.gethostname()
      state = (
        "is no longer running"
        if previous.get("host") == host and "pid" in previous and not _alive(int(previous["pid"]))
        else "no longer holds it"
      )
      log.warning(
        "work dir %s: taking over the stale lock of %s, which %s", self.workdir, describe(previous), state
      )
    me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # a clean exit leaves no holder behind (a crash leaves its pid: the "stale" note)
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, primary: bool = True) -> Iterator[WorkdirLock | None]:
  """The lock for the duration of a run, taken only by the job's primary process (``primary``)."""
  if not primary:
    yield None
    return
  with WorkdirLock(workdir) as lock:
    yield lock
