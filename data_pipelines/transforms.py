"""Per-example map functions of the input pipeline (composed in :mod:`data_pipelines.pipeline`).

The stages of an example:

1. :func:`decode` — a stored record (uint8 layers, byte-string prompts) → float *layers*:
   ``fg``, ``bg``, ``blend`` float32 [T, H, W, 3] in [-1, 1], ``alpha`` float32 [T, H, W, 1] in [0, 1],
   prompts as ``str``, ``has_bg``.
2. optional layer-level augmentations such as :func:`static_clip` (grain ``random_map``);
   a ``motion_scale`` key set here (1.0 for static samples) is carried into the model inputs.
3. :func:`to_model_inputs` — layers → ``video`` (clips packed on the time axis), ``tokens``,
   ``clip_valid``, ``motion_scale``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from layerflow_jax import layers

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
  """A stored record → float layers, ``str`` prompts and ``has_bg`` (other fields are dropped)."""
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
  """The three prompts, index-prefixed in the order fg, bg, blend → int32 [3, max_length]."""
  prompts = layers.format_prompts(*(example[k] for k in PROMPT_KEYS))
  return np.asarray(tokenize(prompts), dtype=np.int32)


def to_model_inputs(example: Example, *, layout: layers.Layout,
                    tokenize: Callable[[Sequence[str]], np.ndarray]) -> Example:
  """Decoded layers → one example of the batch contract (``video``, ``tokens``, ``clip_valid``,
  ``motion_scale``)."""
  out = to_clips(example, layout)
  out["tokens"] = tokenize_prompts(example, tokenize)
  return out
