"""Shared pieces of the builders that import user data: frame reading, resizing, sampling, skip accounting.

A *malformed layout* (no meta file, unreadable JSON, a meta without ``videos``) is the user's mistake and
stops the build with :class:`LayoutError` naming the file. A *bad record* (an unreadable image, layers with
differing frame counts, a missing mask, frames of differing sizes, too few frames) is the data's: it is skipped,
counted and logged with its id by :class:`SkipLog`, which stops the build once the skipped fraction passes
``max_bad_fraction``.
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import pathlib
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif", ".webp")
RESIZE_MODES = ("crop", "stretch")


class LayoutError(ValueError):
  """The user's data does not follow the documented layout (the message names the file and the problem)."""


class BadRecord(ValueError):
  """One record cannot be imported (the message names the file and the problem); it is skipped."""


class TooManyBadRecords(RuntimeError):
  """More than ``max_bad_fraction`` of the records were bad: the data (or its layout) is likely wrong."""


def read_json(path: pathlib.Path) -> Any:
  """A meta file's JSON. Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) so that
  one bad prompt is one bad record (:func:`text`), not a refused import."""
  try:
    return json.loads(pathlib.Path(path).read_bytes().decode("utf-8", errors="surrogateescape"))
  except FileNotFoundError:
    raise LayoutError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise LayoutError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None


def text(value: str, where: str) -> str:
  """``value`` when it is valid Unicode text; :class:`BadRecord` naming ``where`` when it came from bytes that
  are not UTF-8 (see :func:`read_json`)."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    bad = value[e.start : e.end].encode("utf-8", errors="surrogateescape")
    raise BadRecord(f"{where}: is not UTF-8 text (bytes {bad!r} at character {e.start})") from None
  return value


def local_code_path(cls):
  """A TFDS builder's ``code_path``: its own file (TFDS otherwise probes ``importlib_resources``, not a
  dependency). Builders set ``code_path = tfds.core.utils.classproperty(classmethod(local_code_path))``."""
  return epath.Path(inspect.getfile(cls))


def hold_out_validation(
  splits: dict[str, list], num_validation: int, root, noun: str, hint: str = "lower data.num_validation"
) -> dict[str, list]:
  """Without a validation split, the last ``num_validation`` train items become one (``LayoutError`` when train
  is not larger than that)."""
  if "validation" in splits or num_validation <= 0 or "train" not in splits:
    return splits
  train = splits["train"]
  if len(train) <= num_validation:
    raise LayoutError(
      f"{root}: train has {len(train)} {noun}, too few to hold out {num_validation} for validation ({hint})"
    )
  return {**splits, "train": train[:-num_validation], "validation": train[-num_validation:]}


def split_name(meta_file: pathlib.Path) -> str:
  """``train.json``/``train_meta.json`` → ``train``; ``val``/``valid`` → ``validation`` (the trainer's name)."""
  stem = re.sub(r"[-_.]?meta$", "", meta_file.stem.lower())
  stem = re.sub(r"[^a-z0-9_]+", "_", stem).strip("_") or "train"
  return {"val": "validation", "valid": "validation", "eval": "validation"}.get(stem, stem)


def find_frame(folder: pathlib.Path, name: str) -> pathlib.Path | None:
  """``folder/name`` with any image extension (the official layout names frames without one)."""
  p = folder / name
  if p.suffix.lower() in IMAGE_EXTS and p.is_file():
    return p
  for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
    q = folder / f"{name}{ext}"
    if q.is_file():
      return q
  return None


def list_frames(folder: pathlib.Path) -> list[str]:
  """Frame names (without extension) of an image folder, in natural order."""
  names = [p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS]
  return sorted(names, key=lambda n: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", n)])


def read_image(path: pathlib.Path, mode: str) -> np.ndarray:
  """uint8 [H, W, C] in Pillow ``mode`` ("RGB", "L", "RGBA"); BadRecord naming the file if unreadable."""
  try:
    with Image.open(path) as im:
      if mode == "RGBA" and "A" not in im.getbands() and "transparency" not in im.info:
        raise BadRecord(f"{path}: has no alpha channel (mode {im.mode}); an RGBA foreground is required")
      arr = np.asarray(im.convert(mode))
  except BadRecord:
    raise
  except Exception as e:  # noqa: BLE001 — PIL raises many types for damaged files
    raise BadRecord(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
  return arr[..., None] if arr.ndim == 2 else arr


def evenly_spaced(num_available: int, frames: int, window: int = 0, start: int = 0) -> np.ndarray:
  """``frames`` indices evenly spaced over ``window`` source frames from ``start`` (0 = to the end)."""
  window = num_available - start if window <= 0 else window
  if frames < 1:
    raise ValueError(f"frames must be >= 1, got {frames}")
  if start < 0 or window < frames or start + window > num_available:
    raise BadRecord(
      f"has {num_available} frames; needs {frames} over a window of {window} from frame {start}"
    )
  return np.round(np.linspace(start, start + window - 1, frames)).astype(np.int64)


def crop_box(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
  """The centred (left, top, right, bottom) box of the target aspect ratio inside a height × width image."""
  if height * target_w > width * target_h:  # too tall
    h = max(1, round(width * target_h / target_w))
    top = (height - h) // 2
    return 0, top, width, top + h
  w = max(1, round(height * target_w / target_h))
  left = (width - w) // 2
  return left, 0, left + w, height


def resize(
  frames: np.ndarray,
  height: int,
  width: int,
  *,
  mode: str = "crop",
  box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
  """uint8 [T, H, W, C] → [T, height, width, C] (centre crop to the aspect ratio first when ``mode="crop"``;
  ``box`` crops a given (left, top, right, bottom) window instead). Bicubic for colour, bilinear for mattes."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode {mode!r} unknown; expected one of {RESIZE_MODES}")
  t, h, w, c = frames.shape
  if box is None:
    box = crop_box(h, w, height, width) if mode == "crop" else (0, 0, w, h)
  if box == (0, 0, w, h) and (h, w) == (height, width):
    return frames
  resample = Image.BILINEAR if c == 1 else Image.BICUBIC
  out = np.empty((t, height, width, c), np.uint8)
  for i in range(t):
    im = Image.fromarray(frames[i, ..., 0] if c == 1 else frames[i])
    r = np.asarray(im.resize((width, height), resample=resample, box=box))
    out[i] = r[..., None] if c == 1 else r
  return out


class SkipLog:
  """Counts and logs skipped records by id; raises once their fraction passes ``max_bad_fraction``.

  The fraction is checked when the split is complete (``finish``) and, to stop early on hopeless data, as soon as
  the bad count alone exceeds ``max_bad_fraction`` of ``expected`` (the number of records listed).
  """

  def __init__(self, what: str, expected: int, max_bad_fraction: float):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    self.what, self.expected, self.max_bad_fraction = what, int(expected), float(max_bad_fraction)
    self.seen = 0
    self.skipped: dict[str, str] = {}

  def ok(self) -> None:
    self.seen += 1

  def bad(self, record_id: str, reason: str) -> None:
    self.seen += 1
    self.skipped[record_id] = reason
    log.warning("%s: skipped record %s: %s", self.what, record_id, reason)
    if self.expected and len(self.skipped) > self.max_bad_fraction * self.expected:
      self._raise(self.expected)

  def _raise(self, total: int) -> None:
    shown = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:5])
    more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
    raise TooManyBadRecords(
      f"{self.what}: {len(self.skipped)} of {total} records are bad, more than max_bad_fraction="
      f"{self.max_bad_fraction:g} (data.max_bad_fraction); first: {shown}{more}"
    )

  def finish(self) -> dict[str, str]:
    if self.seen and len(self.skipped) > self.max_bad_fraction * self.seen:
      self._raise(self.seen)
    if self.skipped:
      log.warning("%s: skipped %d of %d records", self.what, len(self.skipped), self.seen)
    return dict(self.skipped)


def imap_ordered(fn, items: Sequence, threads: int = 4) -> Iterable:
  """``map(fn, items)`` on a thread pool, in order, with at most ``2 · threads`` results pending (Pillow and
  imageio decode outside the GIL; the bound keeps memory flat on large videos)."""
  if threads <= 1 or len(items) <= 1:
    yield from map(fn, items)
    return
  with ThreadPoolExecutor(threads) as pool:
    pending: collections.deque = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def layered_features(frames: int | None, height: int, width: int):
  """The TFDS features of a layered record (shared by the folder and image builders and read by
  :func:`data_pipelines.transforms.complete_record`).

  ``fg`` and ``bg`` may hold 0 frames: ``has_fg`` False means fg = blend (premultiplied by alpha downstream,
  i.e. bl × mask, the official loader's rule); ``has_bg`` False means the background is missing and its clip is
  left out of the loss.
  """

  def tensor(t, channels):
    # Raw bytes: PNG would shrink files but cost a decode per frame at training time.
    return tfds.features.Tensor(
      shape=(t, height, width, channels), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
    )

  return tfds.features.FeaturesDict(
    {
      "id": tfds.features.Text(),
      "fg": tensor(None, 3),
      "alpha": tensor(frames, 1),
      "bg": tensor(None, 3),
      "blend": tensor(frames, 3),
      "has_fg": tfds.features.Scalar(dtype=np.bool_),
      "has_bg": tfds.features.Scalar(dtype=np.bool_),
      "fg_prompt": tfds.features.Text(),
      "bg_prompt": tfds.features.Text(),
      "blend_prompt": tfds.features.Text(),
    }
  )


def empty_frames(height: int, width: int, channels: int = 3) -> np.ndarray:
  return np.zeros((0, height, width, channels), np.uint8)


def prepared_source(builder, name: str, split: str, hint: str):
  """``builder.as_data_source(split)`` with clear errors for an unbuilt dataset or an unknown split."""
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"dataset {name}/{builder.builder_config.name} is not built in {builder.data_dir_root}: {hint}"
    )
  base = split.split("[", 1)[0]
  if base not in builder.info.splits:
    raise ValueError(f"dataset {name}: no split {base!r}; it has {sorted(builder.info.splits)}")
  return builder.as_data_source(split)


def make_array_record_builder(builder_cls, config, data_dir):
  """``builder_cls`` for ``config`` writing array_record under ``data_dir``. TFDS refuses a custom config object
  named like one of the class's own configs, so those are passed by name."""
  arg = config.name if config.name in builder_cls.builder_configs else config
  return builder_cls(config=arg, data_dir=str(data_dir), file_format="array_record")
