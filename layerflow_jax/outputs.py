"""Writing a command's output folder (``--out``) without losing anything already there.

A destination that exists and is not empty is refused unless ``--overwrite`` is given; the output is written
to a temporary sibling folder and renamed into place when complete, so a crash or a refusal half-way never
leaves a half output (nor mixes new files into old ones). With ``--overwrite`` the old folder is replaced as a
whole.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

from layerflow_jax.errors import InputError


def check_destination(
  out: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out"
) -> pathlib.Path:
  """``out`` as a path, or :class:`InputError` when it cannot be (re)written: a file, a non-empty folder
  without ``overwrite``, or a parent that is a regular file."""
  path = pathlib.Path(out)
  if path.exists() and not path.is_dir():
    raise InputError(f"{flag} {path}: exists and is not a folder; expected a new or empty folder")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise InputError(
      f"{flag} {path}: folder is not empty; pass --overwrite to replace it, or choose a new folder"
    )
  for parent in path.absolute().parents:
    if parent.exists():
      if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a regular file, not a folder")
      break
  return path


@contextlib.contextmanager
def staged(out: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> Iterator[pathlib.Path]:
  """Yields a temporary folder beside ``out``; on success it becomes ``out`` (replacing it as a whole), on any
  error it is deleted and ``out`` is left as it was."""
  path = check_destination(out, overwrite=overwrite, flag=flag).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if path.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / path.name)
  os.rename(tmp, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def relocate(obj: Any, tmp: os.PathLike, out: os.PathLike) -> Any:
  """``obj`` (paths, strings, dicts, lists) with the temporary folder's path replaced by the final one."""
  src, dst = str(pathlib.Path(tmp)), str(pathlib.Path(out))
  if isinstance(obj, dict):
    return {k: relocate(v, tmp, out) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(relocate(v, tmp, out) for v in obj)
  if isinstance(obj, (str, pathlib.PurePath)):
    text = str(obj)
    return dst + text[len(src) :] if text == src or text.startswith(src + os.sep) else obj
  return obj
