"""Per-example map functions of the input pipeline (composed in :mod:`data_pipelines.pipeline`).

The stages of an example:

0. record-level (uint8) steps, on any layered source: :func:`complete_record` (fill a missing fg with the blend,
   a missing bg with zeros and ``has_bg`` False), :func:`temporal_sample` (random evenly spaced window; one-frame
   images repeated), :func:`copy_paste` (a matted foreground pasted on a background clip), :func:`random_crop_resize`,
   :func:`static_clip`. Working on uint8 keeps them cheap and the blend exact to uint8 rounding.
1. :func:`decode` — a stored record (uint8 layers, byte-string prompts) → float *layers*:
   ``fg``, ``bg``, ``blend`` float32 [T, H, W, 3] in [-1, 1], ``alpha`` float32 [T, H, W, 1] in [0, 1],
   prompts as ``str``, ``has_bg``.
2. optional layer-level steps such as :func:`drop_prompts` (grain ``random_map``); a ``motion_scale`` key set
   here (1.0 for static samples) is carried into the model inputs.
3. :func:`to_model_inputs` — layers → ``video`` (clips packed on the time axis), ``tokens``,
   ``clip_valid``, ``motion_scale``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from data_pipelines import importing
from layerflow_jax import layers

log = logging.getLogger(__name__)

LAYER_KEYS = ("fg", "alpha", "bg", "blend")
PROMPT_KEYS = ("fg_prompt", "bg_prompt", "blend_prompt")

Example = dict[str, Any]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def normalize_rgb(x: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] → float32 [-1, 1]."""
  return np.asarray(x, np.float32) / 127.5 - 1.0


def normalize_alpha(x: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] → float32 [0, 1]."""
  return np.asarray(x, np.float32) / 255.0


def decode(record: Example) -> Example:
  """A stored record → float layers, ``str`` prompts and ``has_bg`` (other fields are dropped).

  Records of the folder/image builders with a missing fg or bg are completed first (:func:`complete_record`).
  """
  record = complete_record(record)
  out = {
    "fg": normalize_rgb(record["fg"]),
    "alpha": normalize_alpha(record["alpha"]),
    "bg": normalize_rgb(record["bg"]),
    "blend": normalize_rgb(record["blend"]),
    "has_bg": bool(record.get("has_bg", True)),
  }
  for key in PROMPT_KEYS:
    out[key] = _text(record[key])
  return out


# ----------------------------------------------------------------------------- record-level (uint8) steps


def complete_record(record: Example) -> Example:
  """A layered record with every layer present and the same frame count: a missing foreground (``has_fg``
  False, 0 frames) is the blend — premultiplied by the mask downstream, i.e. bl × mask — and a missing
  background is zeros with ``has_bg`` False (its clip leaves the loss through ``clip_valid``)."""
  blend = np.asarray(record["blend"])
  fg, bg = np.asarray(record["fg"]), np.asarray(record["bg"])
  has_fg = bool(record.get("has_fg", True)) and fg.shape[0] > 0
  has_bg = bool(record.get("has_bg", True)) and bg.shape[0] > 0
  if has_fg and has_bg and fg.shape == blend.shape == bg.shape:
    return record
  out = dict(record)
  out["fg"] = fg if has_fg else blend
  out["bg"] = bg if has_bg else np.zeros_like(blend)
  out["has_fg"], out["has_bg"] = True, has_bg
  shapes = {k: np.shape(out[k])[:3] for k in LAYER_KEYS}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"record {_text(record.get('id', '?'))}: layers differ in [frames, H, W]: {shapes}")
  return out


def as_background(record: Example) -> Example:
  """Any source as a copy-paste background: ``bg`` (uint8 clip) and ``bg_prompt``. Plain videos give their
  ``video``/``prompt``; layered records their background (or, where it is missing, their blend)."""
  if "video" in record:
    return {
      "id": record.get("id", b""),
      "bg": np.asarray(record["video"]),
      "bg_prompt": _text(record["prompt"]),
    }
  has_bg = bool(record.get("has_bg", True)) and np.shape(record["bg"])[0] > 0
  key, prompt = ("bg", "bg_prompt") if has_bg else ("blend", "blend_prompt")
  return {"id": record.get("id", b""), "bg": np.asarray(record[key]), "bg_prompt": _text(record[prompt])}


def _frame_keys(example: Example) -> list[str]:
  """The clip keys of an example, the reference (never empty) first: a missing fg/bg may hold 0 frames."""
  ref = next(k for k in ("blend", "video", "bg") if k in example)
  return [ref] + [k for k in LAYER_KEYS + ("video",) if k in example and k != ref]


def temporal_sample(
  example: Example, rng: np.random.Generator | None, *, frames: int, max_stride: int = 1
) -> Example:
  """Every clip of the example → ``frames`` frames: a one-frame record (an image) is repeated; a longer one is
  cut to ``frames`` evenly spaced frames, stride ``1..max_stride`` and start drawn from ``rng`` (None: the
  whole clip, evenly spaced — deterministic, for evaluation). A clip of 2..frames-1 frames is an error."""
  keys = _frame_keys(example)
  t = int(np.shape(example[keys[0]])[0])
  if t == frames:
    return example
  out = dict(example)
  if t == 1:
    for k in keys:
      x = np.asarray(example[k])
      out[k] = np.repeat(x, frames, axis=0) if x.shape[0] else x
    return out
  if t < frames:
    raise ValueError(
      f"record {_text(example.get('id', '?'))} has {t} frames, fewer than data.frames={frames}"
    )
  if rng is None:
    idx = importing.evenly_spaced(t, frames)
  else:
    most = max(1, min(int(max_stride), (t - 1) // max(frames - 1, 1)))
    stride = int(rng.integers(1, most + 1))
    start = int(rng.integers(0, t - stride * (frames - 1)))
    idx = start + stride * np.arange(frames)
  for k in keys:
    x = np.asarray(example[k])
    out[k] = x[idx] if x.shape[0] else x  # a missing layer stays missing
  return out


def random_crop_resize(
  example: Example, rng: np.random.Generator | None, *, height: int, width: int, min_area: float = 1.0
) -> Example:
  """The same window of every frame of every clip → ``height × width``. The window has the target aspect
  ratio and a random area fraction in [``min_area``, 1] of the largest such window, at a random place
  (``rng`` None or ``min_area`` 1: the centred largest window, i.e. a plain centre crop + resize)."""
  keys = _frame_keys(example)
  h, w = np.shape(example[keys[0]])[1:3]
  left, top, right, bottom = importing.crop_box(h, w, height, width)
  if rng is not None and min_area < 1.0:
    area = float(rng.uniform(min_area, 1.0))
    ch, cw = max(1, round((bottom - top) * area**0.5)), max(1, round((right - left) * area**0.5))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    bottom, right = top + ch, left + cw
  box = (left, top, right, bottom)
  if box == (0, 0, w, h) and (h, w) == (height, width):
    return example
  out = dict(example)
  for k in keys:
    x = np.asarray(example[k])
    if x.shape[0]:
      out[k] = importing.resize(x, height, width, box=box)
  return out


def fit_record(record: Example, *, frames: int, height: int, width: int) -> Example:
  """A stored layered record, completed (:func:`complete_record`) and fitted to ``frames`` (evenly spaced;
  images repeated) and ``height × width`` (centre crop + resize); the identity on matching records."""
  record = complete_record(record)
  record = temporal_sample(record, None, frames=frames)
  return random_crop_resize(record, None, height=height, width=width)


def copy_paste(
  pair: tuple[Example, Example],
  rng: np.random.Generator,
  *,
  scale: Sequence[float] = (0.5, 1.0),
  flip: float = 0.5,
  template: str = "{fg} over {bg}",
) -> Example:
  """A matted foreground (a layered record's fg + alpha: a clip, or an image repeated) pasted onto a background
  clip (:func:`as_background`) at a random scale, position and horizontal flip; the blend is recomputed as
  round(α·fg + (1 − α)·bg) in uint8 and the blend prompt composed from ``template``.

  Both records must already have the same frame count and size (after :func:`temporal_sample` and
  :func:`random_crop_resize`). The foreground's own background is discarded.
  """
  fg_rec, bg_rec = complete_record(pair[0]), pair[1]
  fg, alpha, bg = np.asarray(fg_rec["fg"]), np.asarray(fg_rec["alpha"]), np.asarray(bg_rec["bg"])
  if fg.shape != bg.shape:
    raise ValueError(
      f"copy_paste: foreground {_text(fg_rec.get('id', '?'))} is {fg.shape}, background "
      f"{_text(bg_rec.get('id', '?'))} is {bg.shape}; fit both to data.frames/height/width first"
    )
  t, h, w, _ = fg.shape
  s = float(rng.uniform(*scale))
  ph, pw = max(1, round(h * s)), max(1, round(w * s))
  fg_s = importing.resize(fg, ph, pw, mode="stretch")
  a_s = importing.resize(alpha, ph, pw, mode="stretch")
  if rng.uniform() < flip:
    fg_s, a_s = fg_s[:, :, ::-1], a_s[:, :, ::-1]
  # Top-left corner: inside the frame when the paste is smaller, a random crop of it when it is larger.
  top = int(rng.integers(min(0, h - ph), max(0, h - ph) + 1))
  left = int(rng.integers(min(0, w - pw), max(0, w - pw) + 1))
  ys, xs = slice(max(top, 0), min(top + ph, h)), slice(max(left, 0), min(left + pw, w))
  src_y = slice(ys.start - top, ys.stop - top)
  src_x = slice(xs.start - left, xs.stop - left)
  new_fg = np.zeros_like(fg)
  new_alpha = np.zeros_like(alpha)
  new_fg[:, ys, xs] = fg_s[:, src_y, src_x]
  new_alpha[:, ys, xs] = a_s[:, src_y, src_x]
  a = new_alpha.astype(np.float32) / 255.0
  blend = np.clip(np.rint(a * new_fg + (1.0 - a) * bg), 0, 255).astype(np.uint8)
  fg_prompt, bg_prompt = _text(fg_rec["fg_prompt"]), _text(bg_rec["bg_prompt"])
  return {
    "id": f"{_text(fg_rec.get('id', '?'))}+{_text(bg_rec.get('id', '?'))}",
    "fg": new_fg,
    "alpha": new_alpha,
    "bg": bg,
    "blend": blend,
    "has_fg": True,
    "has_bg": True,
    "fg_prompt": fg_prompt,
    "bg_prompt": bg_prompt,
    "blend_prompt": template.format(fg=fg_prompt, bg=bg_prompt),
  }


def drop_prompts(example: Example, rng: np.random.Generator, *, p: float) -> Example:
  """Each layer prompt independently replaced by the empty prompt with probability ``p`` (per-layer dropout;
  the train step's ``diffusion.prompt_dropout`` zeroes an example's whole text embedding instead)."""
  out = dict(example)
  for key in PROMPT_KEYS:
    if rng.uniform() < p:
      out[key] = ""
  return out


def static_clip(example: Example, rng: np.random.Generator) -> Example:
  """One random frame repeated over the clip, for every layer (the paper's "frozen" videos).

  Works on stored records and decoded layers alike; other fields are kept. Use with ``random_map``.
  """
  frames = example["blend"].shape[0]
  t = int(rng.integers(frames))
  out = dict(example)
  for key in LAYER_KEYS:
    if key in example:
      x = np.asarray(example[key])
      out[key] = np.repeat(x[t : t + 1], frames, axis=0)
  return out


def to_clips(example: Example, layout: layers.Layout) -> Example:
  """Decoded layers → ``video`` float32 [num_clips·T, H, W, 3], ``clip_valid`` bool [num_clips],
  ``motion_scale`` float32 [] (the example's ``motion_scale``, default 0 = video sample)."""
  clips = layers.layers_to_clips(example["fg"], example["alpha"], example["bg"], example["blend"], layout)
  video = layers.pack(clips[None])[0].astype(np.float32)
  valid = np.ones(layout.num_clips, dtype=bool)
  if not example.get("has_bg", True):
    valid[layout.index(layers.BG)] = False
  return {
    "video": video,
    "clip_valid": valid,
    "motion_scale": np.float32(example.get("motion_scale", 0.0)),
  }


def tokenize_prompts(example: Example, tokenize: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
  """The three prompts, index-prefixed in the order fg, bg, blend → int32 [3, max_length]. A prompt dropped by
  :func:`drop_prompts` (empty) is tokenized as the empty string, without its index prefix."""
  texts = [_text(example[k]) for k in PROMPT_KEYS]
  if all(texts):
    prompts = layers.format_prompts(*texts)
  else:
    prompts = [f"{i}, {t.strip()}" if t.strip() else "" for i, t in enumerate(texts)]
  return np.asarray(tokenize(prompts), dtype=np.int32)


def to_model_inputs(
  example: Example, *, layout: layers.Layout, tokenize: Callable[[Sequence[str]], np.ndarray]
) -> Example:
  """Decoded layers → one example of the batch contract (``video``, ``tokens``, ``clip_valid``,
  ``motion_scale``)."""
  out = to_clips(example, layout)
  out["tokens"] = tokenize_prompts(example, tokenize)
  return out


def record_to_model_inputs(
  record: Example, *, layout: layers.Layout, tokenize: Callable[[Sequence[str]], np.ndarray]
) -> Example:
  """A uint8 layered record (missing fg/bg allowed) → one example of the batch contract, equal to
  ``to_model_inputs(decode(record))`` but written straight into the packed float32 video: at 480×720 × 16 frames
  the float layers, their stack and the cast each cost a pass over ~265 MB, which this skips."""
  blend = np.asarray(record["blend"])
  t = blend.shape[0]
  fg, bg = np.asarray(record["fg"]), np.asarray(record["bg"])
  has_bg = bool(record.get("has_bg", True)) and bg.shape[0] > 0
  if not (bool(record.get("has_fg", True)) and fg.shape[0] > 0):
    fg = blend  # official rule: fg = bl (× mask below)
  for name, x in (("fg", fg), ("bg", bg), ("alpha", record["alpha"])):
    if np.shape(x)[0] and np.shape(x)[:3] != blend.shape[:3]:
      raise ValueError(f"record {_text(record.get('id', '?'))}: {name} is {np.shape(x)}, blend {blend.shape}")
  a = normalize_alpha(record["alpha"])
  video = np.empty((layout.num_clips * t,) + blend.shape[1:3] + (3,), np.float32)
  half = np.float32(127.5)
  for i, name in enumerate(layout.clips):
    dst = video[i * t : (i + 1) * t]
    if name == layers.ALPHA:
      dst[...] = a * np.float32(2.0) - np.float32(1.0)
      continue
    src = {layers.FG: fg, layers.BG: bg, layers.BLEND: blend}[name]
    if name == layers.BG and not has_bg:
      dst.fill(-1.0)  # zeros, normalised (the clip is out of the loss)
      continue
    np.divide(src, half, out=dst)
    dst -= np.float32(1.0)
    if name == layers.FG:
      dst *= a  # premultiply
  valid = np.ones(layout.num_clips, dtype=bool)
  if not has_bg:
    valid[layout.index(layers.BG)] = False
  return {
    "video": video,
    "clip_valid": valid,
    "motion_scale": np.float32(record.get("motion_scale", 0.0)),
    "tokens": tokenize_prompts(record, tokenize),
  }
