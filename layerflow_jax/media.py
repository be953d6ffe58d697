"""Writing layered samples to disk and reading user clips back in.

Pixel conventions follow :mod:`layerflow_jax.layers`: colour in [-1, 1], alpha in [0, 1], foreground
premultiplied. :func:`write_layers` writes one sample as

* ``fg_rgba/0000.png …`` — RGBA PNG frames, straight colour (unpremultiplied) with the matte as alpha;
* ``fg.webp`` — an animated WebP with transparency (``fg.gif`` with a binary matte where Pillow lacks WebP);
* ``alpha``, ``bg``, ``blend`` — MP4 when ``imageio-ffmpeg`` is importable (and the size is even), else GIF;
* ``preview.png`` — a few frames side by side (fg over a checkerboard, alpha, bg, blend, recomposite).

Animated GIF and WebP encoders store runs of identical frames once with a longer duration; :func:`read_video`
expands them back using the per-frame durations (and, for GIFs written here, the frame rate in the comment).
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw, features

from layerflow_jax import layers as L

VIDEO_EXTS = (".mp4", ".gif", ".webp", ".mov", ".avi", ".mkv", ".webm")
FRAME_EXTS = (".png", ".jpg", ".jpeg")
PREVIEW_ROWS = 4
PREVIEW_MIN_CELL = 128
_GIF_COMMENT = "layerflow fps={fps}"


# ----------------------------------------------------------------------------- pixels


def to_uint8(x) -> np.ndarray:
  """[-1, 1] float (NumPy or JAX) → uint8 [0, 255], clipped and rounded."""
  x = np.asarray(x, dtype=np.float32)
  return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def alpha_to_uint8(alpha) -> np.ndarray:
  """[0, 1] matte → uint8 [0, 255], clipped and rounded."""
  a = np.asarray(alpha, dtype=np.float32)
  return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def checkerboard(h: int, w: int, cell: int = 8) -> np.ndarray:
  """float32 [h, w, 3] in [-1, 1]: light/dark grey squares of ``cell`` pixels (transparency backdrop)."""
  yy, xx = np.meshgrid(np.arange(h) // max(cell, 1), np.arange(w) // max(cell, 1), indexing="ij")
  board = np.where(((yy + xx) % 2 == 0)[..., None], 0.6, 0.2).astype(np.float32)
  return np.broadcast_to(board, (h, w, 3)).copy()


def _cell_uint8(img: np.ndarray) -> np.ndarray:
  """Grid cell → uint8 [H, W, 3]: uint8 kept, floats taken as [-1, 1], gray/RGBA made RGB."""
  img = np.asarray(img)
  if img.dtype != np.uint8:
    img = to_uint8(img)
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
    raise ValueError(f"grid cells must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {img.shape}")
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  return img[..., :3]


def save_grid_png(
  path,
  rows: Sequence[Sequence[np.ndarray]],
  *,
  scale: int = 1,
  pad: int = 2,
  pad_value: int = 255,
  labels: Sequence[str] | None = None,
) -> str:
  """Save a grid of images as one PNG; returns the path.

  ``rows[i][j]`` is an image [H, W], [H, W, 1|3|4]: uint8 as is, floats taken as [-1, 1] (convert [0, 1]
  mattes first). Cells are upscaled ``scale``× nearest-neighbour, placed top-left in a cell of the largest
  size and separated by ``pad`` pixels of ``pad_value``. ``labels`` optionally names the columns in a header.
  """
  cells = [[_cell_uint8(c) for c in row] for row in rows]
  if not cells or not any(cells):
    raise ValueError("save_grid_png needs at least one image")
  scale = max(int(scale), 1)
  ch = max(c.shape[0] for row in cells for c in row) * scale
  cw = max(c.shape[1] for row in cells for c in row) * scale
  ncols = max(len(row) for row in cells)
  header = 14 if labels else 0
  height = header + len(cells) * ch + (len(cells) + 1) * pad
  width = ncols * cw + (ncols + 1) * pad
  canvas = np.full((height, width, 3), pad_value, dtype=np.uint8)
  for i, row in enumerate(cells):
    for j, c in enumerate(row):
      c = np.repeat(np.repeat(c, scale, axis=0), scale, axis=1)
      y, x = header + pad + i * (ch + pad), pad + j * (cw + pad)
      canvas[y : y + c.shape[0], x : x + c.shape[1]] = c
  img = Image.fromarray(canvas)
  if labels:
    draw = ImageDraw.Draw(img)
    ink = (0, 0, 0) if pad_value > 127 else (255, 255, 255)
    for j, text in enumerate(labels[:ncols]):
      draw.text((pad + j * (cw + pad) + 2, 1), str(text), fill=ink)
  path = str(path)
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  img.save(path)
  return path


# ----------------------------------------------------------------------------- writing


@functools.lru_cache(maxsize=None)
def have_ffmpeg() -> bool:
  """True when ``imageio-ffmpeg`` is importable and has an ffmpeg binary (MP4 output possible)."""
  try:
    import imageio_ffmpeg  # optional (the video extra): its absence means no MP4

    imageio_ffmpeg.get_ffmpeg_exe()
    return True
  except Exception:  # noqa: BLE001 — missing package or binary alike mean "no MP4"
    return False


@functools.lru_cache(maxsize=None)
def have_webp() -> bool:
  """True when Pillow was built with WebP support (animated WebP with alpha)."""
  try:
    return bool(features.check("webp"))
  except Exception:  # noqa: BLE001
    return False


def _gif_kwargs(fps: float) -> dict:
  return {"duration": 1000.0 / fps, "loop": 0, "comment": _GIF_COMMENT.format(fps=fps).encode()}


def _write_video(base: str, frames_u8: np.ndarray, fps: float, video_format: str) -> str:
  """uint8 [T, H, W, 3] → ``base.mp4`` (ffmpeg, even sizes) or ``base.gif``; returns the path."""
  t, h, w = frames_u8.shape[:3]
  use_mp4 = video_format == "mp4" or (video_format == "auto" and have_ffmpeg())
  if use_mp4 and (h % 2 or w % 2):
    if video_format == "mp4":
      raise ValueError(f"MP4 (H.264, yuv420p) needs even sizes; clip is {w}x{h} (WxH)")
    use_mp4 = False
  if use_mp4:
    path = base + ".mp4"
    iio.imwrite(path, frames_u8, plugin="FFMPEG", fps=fps, codec="libx264", quality=9, macro_block_size=1)
    return path
  path = base + ".gif"
  iio.imwrite(path, frames_u8, plugin="pillow", is_batch=True, **_gif_kwargs(fps))
  return path


def _as_sample(name: str, x, channels: int) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if name == L.ALPHA and x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(
      f"write_layers takes ONE sample: {name!r} must be [T, H, W, {channels}], got shape {tuple(x.shape)}"
      + (" (index the batch first)" if x.ndim == 5 else "")
    )
  return x


def _preview_frames(t: int, n: int = PREVIEW_ROWS) -> list[int]:
  return sorted(set(int(round(i)) for i in np.linspace(0, t - 1, min(n, t))))


def write_layers(
  out_dir,
  layers: Mapping[str, np.ndarray],
  *,
  fps: float = 8,
  prefix: str = "",
  video_format: str = "auto",
) -> dict[str, str]:
  """Write one layered sample; returns name → path of every file/folder written.

  ``layers``: ``fg`` premultiplied [T, H, W, 3] in [-1, 1]; ``alpha`` [T, H, W, 1] (or [T, H, W]) in [0, 1],
  absent for the RGB layout; ``bg`` and ``blend`` [T, H, W, 3] in [-1, 1] (NumPy or JAX). Any of them
  may be missing but the present ones must agree on T, H, W. ``video_format``: "auto" (MP4 when
  imageio-ffmpeg is importable and H, W are even, else GIF), "mp4" or "gif". Keys of the result:
  ``fg_rgba`` (folder of RGBA PNGs), ``fg_anim`` (WebP/GIF with transparency), ``fg`` (RGB layout only),
  ``alpha``, ``bg``, ``blend`` and ``preview``.
  """
  if video_format not in ("auto", "mp4", "gif"):
    raise ValueError(f"video_format must be 'auto', 'mp4' or 'gif', got {video_format!r}")
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  unknown = sorted(set(layers) - {L.FG, L.ALPHA, L.BG, L.BLEND})
  if unknown:
    raise ValueError(f"unknown layer(s) {unknown}; expected fg, alpha, bg, blend")
  arr = {k: _as_sample(k, v, 1 if k == L.ALPHA else 3) for k, v in layers.items() if v is not None}
  if not arr:
    raise ValueError("write_layers got no layers")
  shapes = {k: v.shape[:3] for k, v in arr.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"layers disagree on [T, H, W]: {shapes}")
  t, h, w = next(iter(shapes.values()))

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written: dict[str, str] = {}
  fg, alpha = arr.get(L.FG), arr.get(L.ALPHA)
  straight = L.unpremultiply(fg, alpha) if fg is not None and alpha is not None else None

  if straight is not None:
    assert alpha is not None  # straight is None without it
    rgba = np.concatenate([to_uint8(straight), alpha_to_uint8(alpha)], axis=-1)
    frame_dir = out / f"{prefix}fg_rgba"
    frame_dir.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(rgba):
      iio.imwrite(frame_dir / f"{i:04d}.png", frame, plugin="pillow")
    written["fg_rgba"] = str(frame_dir)
    if have_webp():
      path = str(out / f"{prefix}fg.webp")
      iio.imwrite(path, rgba, plugin="pillow", is_batch=True, duration=1000.0 / fps, loop=0, lossless=True)
    else:
      # GIF transparency is binary: threshold the matte at 0.5 (disposal 2 clears the previous sprite).
      hard = rgba.copy()
      hard[..., 3] = np.where(alpha[..., 0] > 0.5, 255, 0)
      path = str(out / f"{prefix}fg.gif")
      iio.imwrite(path, hard, plugin="pillow", is_batch=True, disposal=2, **_gif_kwargs(fps))
    written["fg_anim"] = path
  elif fg is not None:
    written["fg"] = _write_video(str(out / f"{prefix}fg"), to_uint8(fg), fps, video_format)

  if alpha is not None:
    gray = np.repeat(alpha_to_uint8(alpha), 3, axis=-1)
    written["alpha"] = _write_video(str(out / f"{prefix}alpha"), gray, fps, video_format)
  for name in (L.BG, L.BLEND):
    if name in arr:
      written[name] = _write_video(str(out / f"{prefix}{name}"), to_uint8(arr[name]), fps, video_format)

  written["preview"] = write_preview(str(out / f"{prefix}preview.png"), arr)
  return written


def preview_columns(
  layers: Mapping[str, np.ndarray], *, recomposite: bool = True
) -> list[tuple[str, np.ndarray]]:
  """[(name, clip [T, H, W, 3] in [-1, 1])] for a preview: fg over a checkerboard, alpha, bg, blend and (with
  ``recomposite``) α·fg + (1 − α)·bg — the layers present only."""
  arr = {k: np.asarray(v, dtype=np.float32) for k, v in layers.items() if v is not None}
  if L.ALPHA in arr and arr[L.ALPHA].ndim == 3:
    arr[L.ALPHA] = arr[L.ALPHA][..., None]
  h, w = next(iter(arr.values())).shape[1:3]
  fg, alpha, bg = arr.get(L.FG), arr.get(L.ALPHA), arr.get(L.BG)
  columns: list[tuple[str, np.ndarray]] = []
  if fg is not None:
    if alpha is not None:
      board = checkerboard(h, w, max(min(h, w) // 8, 1))
      columns.append(("fg", L.composite(fg, alpha, board)))
    else:
      columns.append(("fg", fg))
  if alpha is not None:
    columns.append(("alpha", np.repeat(alpha * 2.0 - 1.0, 3, axis=-1)))
  if bg is not None:
    columns.append(("bg", bg))
  if L.BLEND in arr:
    columns.append(("blend", arr[L.BLEND]))
  if recomposite and fg is not None and alpha is not None and bg is not None:
    columns.append(("recomposite", L.composite(fg, alpha, bg)))
  return columns


def write_preview(path, layers: Mapping[str, np.ndarray], *, rows: int = PREVIEW_ROWS) -> str:
  """Side-by-side PNG: rows = evenly spaced frames; columns = :func:`preview_columns`, nearest-upscaled to
  ≥128 px per cell."""
  columns = preview_columns(layers)
  t, h, w = columns[0][1].shape[:3]
  grid = [[clip[i] for _, clip in columns] for i in _preview_frames(t, rows)]
  scale = max(1, math.ceil(PREVIEW_MIN_CELL / max(min(h, w), 1)))
  return save_grid_png(path, grid, scale=scale, labels=[name for name, _ in columns])


# ----------------------------------------------------------------------------- reading


def _natural_key(name: str):
  return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def _to_rgb_float(frame: np.ndarray, source: str) -> np.ndarray:
  """One decoded frame (uint8/uint16/bool/float, gray/GA/RGB/RGBA) → float32 [H, W, 3] in [-1, 1].

  Gray is repeated to RGB; an alpha channel is dropped (the colour is kept as stored).
  """
  f = np.asarray(frame)
  if f.dtype == np.uint8:
    f = f.astype(np.float32) / 255.0
  elif f.dtype == np.uint16:
    f = f.astype(np.float32) / 65535.0
  elif f.dtype == bool:
    f = f.astype(np.float32)
  elif np.issubdtype(f.dtype, np.floating):
    f = f.astype(np.float32)
  else:
    raise ValueError(f"{source}: unsupported pixel type {f.dtype}")
  if f.ndim == 2:
    f = f[..., None]
  if f.ndim != 3 or f.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"{source}: expected an image [H, W(, C)], got shape {f.shape}")
  if f.shape[-1] in (1, 2):
    f = np.repeat(f[..., :1], 3, axis=-1)
  return f[..., :3] * 2.0 - 1.0


def _read_animated(path: str, mode: str = "RGB") -> list[np.ndarray]:
  """GIF/WebP frames as uint8 (Pillow ``mode``), runs of identical frames (merged by the encoder) expanded.

  The frame period is taken from a ``layerflow fps=N`` GIF comment when present, else the shortest frame
  duration; each stored frame is repeated round(duration / period) times.
  """
  frames, durations, comment = [], [], None
  with Image.open(path) as im:
    for i in range(getattr(im, "n_frames", 1)):
      im.seek(i)
      im.load()
      frames.append(np.asarray(im.convert(mode)))
      durations.append(im.info.get("duration"))
      comment = comment or im.info.get("comment")
  if len(frames) < 1 or any(not d for d in durations):
    return frames
  period = None
  if comment:
    m = re.fullmatch(rb"layerflow fps=([0-9.]+)", comment if isinstance(comment, bytes) else comment.encode())
    if m and float(m.group(1)) > 0:
      period = 1000.0 / float(m.group(1))
  period = period or float(min(durations))
  out = []
  for f, d in zip(frames, durations):
    out.extend([f] * max(1, int(round(d / period))))
  return out


def _read_animated_rgba(path: str) -> list[np.ndarray]:
  """GIF/WebP frames as RGBA uint8 [H, W, 4] (e.g. to check the transparency of ``fg.webp``/``fg.gif``)."""
  return _read_animated(path, "RGBA")


def _read_frames(path: str) -> list[np.ndarray]:
  if os.path.isdir(path):
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTS)), key=_natural_key)
    if not names:
      raise ValueError(f"{path}: folder has no frames (expected {', '.join(FRAME_EXTS)} files)")
    frames = []
    for n in names:
      try:
        frames.append(iio.imread(os.path.join(path, n)))
      except Exception as e:  # noqa: BLE001
        raise ValueError(f"{os.path.join(path, n)}: cannot read frame ({e})") from e
    return frames
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext in (".gif", ".webp"):
      return _read_animated(path)
    # index=... (all frames) is documented by imageio v3; its stub types index as int | None
    return list(iio.imread(path, index=...))  # pyright: ignore[reportArgumentType]
  except Exception as e:  # noqa: BLE001
    hint = "" if have_ffmpeg() else " (MP4 needs imageio-ffmpeg: pip install 'layerflow-jax[video]')"
    raise ValueError(f"{path}: cannot read video ({type(e).__name__}: {e}){hint}") from e


def read_video(path, *, frames: int, height: int, width: int) -> np.ndarray:
  """Read the first ``frames`` frames of a clip as float32 [frames, H, W, 3] in [-1, 1].

  ``path``: an .mp4/.gif/.webp/… file (imageio; GIF/WebP through Pillow) or a folder of PNG/JPG frames
  (natural sort order). Grayscale is repeated to RGB and an alpha channel dropped. Nothing is resized:
  a clip of another size, too few frames or frames of differing sizes raise ValueError naming the file.
  """
  path = str(path)
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file or folder")
  if not os.path.isdir(path):
    ext = os.path.splitext(path)[1].lower()
    if ext in FRAME_EXTS:
      raise ValueError(f"{path}: a single image is not a clip; pass a folder of frames or a video file")
    if ext not in VIDEO_EXTS:
      raise ValueError(
        f"{path}: unsupported extension {ext!r}; expected a folder of frames or one of {VIDEO_EXTS}"
      )
  raw = _read_frames(path)
  if len(raw) < frames:
    raise ValueError(f"{path}: has {len(raw)} frames, need {frames}")
  out = []
  for i, frame in enumerate(raw[:frames]):
    rgb = _to_rgb_float(frame, f"{path} frame {i}")
    fh, fw = rgb.shape[:2]
    if (fh, fw) != (height, width):
      where = "" if i == 0 else f" frame {i}"
      raise ValueError(
        f"{path}{where} is {fw}x{fh} (WxH), the model's clips are {width}x{height}; resize it first"
      )
    out.append(rgb)
  return np.stack(out).astype(np.float32)
