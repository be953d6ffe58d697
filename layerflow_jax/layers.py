"""Layers as sub-clips: layouts, tasks, packing on the time axis, compositing.

A LayerFlow video is a stack of sub-clips on the time axis. In the RGBA layout the clips are
``[foreground (premultiplied), alpha (3 channels), background, blend]``; in the RGB layout
``[foreground, background, blend]``. Pixel values are in [-1, 1]; alpha clips store the matte
``a`` in [0, 1] as ``2a - 1`` repeated over three channels (so one RGB autoencoder encodes every clip).

A *task* says which clips are given (kept clean and out of the loss) and which are generated.

Everything here works on NumPy and JAX arrays alike (``xp`` is taken from the input).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

# Clip names.
FG, ALPHA, BG, BLEND = "fg", "alpha", "bg", "blend"
# Prompt names, in the order they are prefixed "0, ", "1, ", "2, " and concatenated.
PROMPTS = ("fg", "bg", "blend")


@dataclasses.dataclass(frozen=True)
class Layout:
  """An ordered list of sub-clips; ``clip_prompt[i]`` is the prompt index of clip i (or -1)."""

  name: str
  clips: tuple[str, ...]

  @property
  def num_clips(self) -> int:
    return len(self.clips)

  def index(self, clip: str) -> int:
    if clip not in self.clips:
      raise ValueError(f"clip {clip!r} is not in layout {self.name!r} (clips: {', '.join(self.clips)})")
    return self.clips.index(clip)

  @property
  def has_alpha(self) -> bool:
    return ALPHA in self.clips


LAYOUTS: dict[str, Layout] = {
  "rgba": Layout("rgba", (FG, ALPHA, BG, BLEND)),
  "rgb": Layout("rgb", (FG, BG, BLEND)),
}

# Tasks: which clips are given. Everything else is generated.
TASKS: dict[str, tuple[str, ...]] = {
  "generate": (),
  "decompose": (BLEND,),
  "fg2bg": (FG, ALPHA),
  "bg2fg": (BG,),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_layout(name: str) -> Layout:
  try:
    return LAYOUTS[name]
  except KeyError:
    raise ValueError(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}") from None


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_NAMES)}")
  return task


def given_clips(task: str, layout: Layout) -> np.ndarray:
  """Boolean [num_clips]: True where the task gives the clip (alpha is dropped in the RGB layout)."""
  check_task(task)
  given = [c in TASKS[task] for c in layout.clips]
  return np.asarray(given, dtype=bool)


def given_table(layout: Layout, tasks: Sequence[str] = TASK_NAMES) -> np.ndarray:
  """Boolean [num_tasks, num_clips] table, row i = ``given_clips(tasks[i])``."""
  return np.stack([given_clips(t, layout) for t in tasks])


def given_frame_mask(
  task: str, layout: Layout, frames_per_clip: int, lead_frames: int = 0, frames: Sequence[int] | None = None
) -> np.ndarray:
  """Boolean [lead_frames + num_clips · frames_per_clip]: the packed latent frames the task gives.

  By default the frames of the task's given clips; lead frames (a copy of the first clip's first frame, the
  official fg2bg/bg2fg RGBA layout) are given when the first clip is. ``frames`` (packed latent frame indices)
  replaces that choice, e.g. the official RGB decomposition gives only the last 2 latent frames of the blend.
  """
  total = lead_frames + layout.num_clips * frames_per_clip
  if frames is not None and len(frames):
    idx = [int(i) for i in frames]
    bad = [i for i in idx if not 0 <= i < total]
    if bad:
      raise ValueError(f"task {task!r}: given latent frames {bad} outside [0, {total})")
    mask = np.zeros(total, bool)
    mask[idx] = True
    return mask
  per_clip = given_clips(task, layout)
  lead = np.full(lead_frames, bool(per_clip[0]) if len(per_clip) else False)
  return np.concatenate([lead, np.repeat(per_clip, frames_per_clip)])


def given_frame_table(
  layout: Layout,
  frames_per_clip: int,
  lead_frames: int = 0,
  overrides: Mapping[str, Sequence[int]] | None = None,
  tasks: Sequence[str] = TASK_NAMES,
) -> np.ndarray:
  """Boolean [num_tasks, frames], row i = ``given_frame_mask(tasks[i])`` (``overrides``: task → frames)."""
  overrides = dict(overrides or {})
  for name in overrides:
    check_task(name)
  return np.stack(
    [given_frame_mask(t, layout, frames_per_clip, lead_frames, overrides.get(t)) for t in tasks]
  )


def task_weights_vector(weights: Mapping[str, float], tasks: Sequence[str] = TASK_NAMES) -> np.ndarray:
  """Normalised probabilities over ``tasks`` from a name → weight mapping (unknown names refused)."""
  for name in weights:
    check_task(name)
  w = np.asarray([float(weights.get(t, 0.0)) for t in tasks], dtype=np.float64)
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"task weights must be non-negative with a positive sum, got {dict(weights)}")
  return (w / w.sum()).astype(np.float32)


# ----------------------------------------------------------------------------- packing


def _xp(x):
  if isinstance(x, np.ndarray):
    return np
  return jnp


def pack(clips):
  """[B, num_clips, T, ...] → [B, num_clips * T, ...] (clips concatenated on the time axis)."""
  b, n, t = clips.shape[:3]
  return clips.reshape((b, n * t) + tuple(clips.shape[3:]))


def unpack(video, num_clips: int):
  """[B, num_clips * T, ...] → [B, num_clips, T, ...]; refuses a time axis not divisible by num_clips."""
  b, total = video.shape[:2]
  if total % num_clips:
    raise ValueError(f"time axis of length {total} cannot be split into {num_clips} equal sub-clips")
  return video.reshape((b, num_clips, total // num_clips) + tuple(video.shape[2:]))


def clip_time_mask(per_clip, frames_per_clip: int):
  """Broadcast a per-clip array [B, num_clips] to the packed time axis [B, num_clips * frames_per_clip]."""
  xp = _xp(per_clip)
  return xp.repeat(per_clip, frames_per_clip, axis=1)


# ----------------------------------------------------------------------------- pixels


def premultiply(rgb, alpha):
  """Premultiply RGB in [-1, 1] by alpha in [0, 1] (broadcast on the channel axis): transparent → 0."""
  return rgb * alpha


def alpha_to_clip(alpha):
  """Alpha [..., 1] in [0, 1] → a 3-channel clip in [-1, 1]."""
  xp = _xp(alpha)
  a = alpha * 2.0 - 1.0
  return xp.concatenate([a, a, a], axis=-1)


def clip_to_alpha(clip):
  """3-channel alpha clip in [-1, 1] → alpha [..., 1] in [0, 1] (mean over channels, clipped)."""
  xp = _xp(clip)
  a = (clip.mean(axis=-1, keepdims=True) + 1.0) / 2.0
  return xp.clip(a, 0.0, 1.0)


def composite(fg_premultiplied, alpha, bg):
  """blend = α·fg + (1 − α)·bg, with the foreground already premultiplied (α·fg)."""
  return fg_premultiplied + (1.0 - alpha) * bg


def unpremultiply(fg_premultiplied, alpha, eps: float = 1e-3):
  """Straight colour from a premultiplied foreground (0 where alpha < eps)."""
  xp = _xp(alpha)
  safe = xp.where(alpha > eps, alpha, 1.0)
  return xp.where(alpha > eps, fg_premultiplied / safe, 0.0)


def layers_to_clips(fg, alpha, bg, blend, layout: Layout):
  """Straight-colour fg [.., T, H, W, 3] in [-1, 1], alpha [.., T, H, W, 1] in [0, 1], bg, blend →
  clips stacked on a new axis before T: [.., num_clips, T, H, W, 3] in the layout's order."""
  xp = _xp(fg)
  fg_pm = premultiply(fg, alpha)
  by_name = {FG: fg_pm, ALPHA: alpha_to_clip(alpha), BG: bg, BLEND: blend}
  return xp.stack([by_name[c] for c in layout.clips], axis=-5)


def clips_to_layers(clips, layout: Layout) -> dict:
  """Inverse of :func:`layers_to_clips` for a clip stack [.., num_clips, T, H, W, 3].

  Returns a dict with ``fg`` (premultiplied), ``bg``, ``blend`` and, in the RGBA layout, ``alpha`` [..., 1].
  """
  out = {name: clips[..., i, :, :, :, :] for i, name in enumerate(layout.clips)}
  if ALPHA in out:
    out[ALPHA] = clip_to_alpha(out[ALPHA])
  return out


def format_prompts(fg: str, bg: str, blend: str | None, num_prompts: int = 3) -> list[str]:
  """Per-layer prompts with their index prefixes, in the concatenation order (fg, bg, blend); the official
  decomposition models take two (fg, bg: ``num_prompts`` 2)."""
  prompts = dict(zip(PROMPTS[:num_prompts], (fg, bg, blend)))
  missing = [k for k, v in prompts.items() if v is None or not str(v).strip()]
  if missing:
    raise ValueError(f"prompt missing for layer(s): {', '.join(missing)} (every layer needs a prompt)")
  given = {k: v for k, v in prompts.items() if v is not None}  # all of them (checked above)
  return [f"{i}, {given[name].strip()}" for i, name in enumerate(PROMPTS[:num_prompts])]
