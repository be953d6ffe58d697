"""Synthetic layered scenes: a textured scrolling background and moving anti-aliased sprites.

Every scene is deterministic from its seed and described by named attributes (colours, shapes, textures,
directions), from which the per-layer prompts are written. Layers follow the LayerFlow data convention:
straight-colour foreground, alpha matte, background, and blend = α·fg + (1 − α)·bg (all uint8).

Kinds (:data:`KINDS`, :func:`make_example`) reproduce the quality gap between the paper's data sources:

* ``clean``: :func:`make_scene` as is (exact anti-aliased mattes, the true background);
* ``lowq_video``: layered video as automatic annotation gives it (stage 1): the blend is the true video, the
  matte binary, jittered by a pixel per frame and eroded or dilated per clip, the foreground the blend itself
  (the official loader's fg = bl × mask), the background inpainted with smears where the foreground was;
* ``hq_image``: layered images (stage 3): one still frame repeated, feathered mattes, half of the sprites
  semi-transparent ("translucent" in the prompt), a clean background, and an appearance only images have: the
  colour :data:`IMAGE_ONLY_COLORS` ("teal");
* ``copy_paste``: a moving matted sprite of one scene pasted on the moving background of another.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Named colours, far apart in RGB so that a small model (and a person) can tell them apart.
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (225, 30, 30),
  "green": (30, 200, 60),
  "blue": (40, 70, 235),
  "yellow": (245, 220, 40),
  "white": (245, 245, 245),
  "purple": (150, 50, 210),
  "orange": (250, 140, 20),
  "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond")
TEXTURES = ("stripes", "checker", "gradient", "dots")
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = DIRECTIONS + ("still",)
# Unit steps in (row, column) image coordinates: rows grow downwards.
_STEP = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0), "still": (0.0, 0.0)}
_TEXTURE_WORDS = {"stripes": "stripes", "checker": "checkerboard", "gradient": "gradient", "dots": "dots"}

_AA_WIDTH = 1.5  # anti-aliasing ramp of sprite edges, in pixels
KINDS = ("clean", "lowq_video", "hq_image", "copy_paste")
# Sprite colours that only the layered images (kind hq_image) have: the attribute stage 3 must transfer.
IMAGE_ONLY_COLORS: dict[str, tuple[int, int, int]] = {"teal": (0, 128, 128)}
HQ_FEATHER = (2.5, 4.0)  # hq_image matte ramp widths, pixels
HQ_OPACITY = (0.35, 0.7)  # opacity of the semi-transparent hq_image sprites
HQ_IMAGE_ONLY_P = 0.5  # share of hq_image sprites in an images-only colour
HQ_TRANSLUCENT_P = 0.5  # share of hq_image sprites that are semi-transparent


def _as_rng(rng_or_seed: int | np.random.Generator | np.random.SeedSequence) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  return np.random.default_rng(rng_or_seed)


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
  choices = [o for o in options if o not in exclude]
  return choices[int(rng.integers(len(choices)))]


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates (rows, cols) as float32 [1, H, W]."""
  ys, xs = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
  return ys[None], xs[None]


def _shape_sdf(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
  """Signed distance (pixels, < 0 inside) of a shape of half-size ``radius`` centred at the origin."""
  if shape == "circle":
    return np.sqrt(dy * dy + dx * dx) - radius
  if shape == "square":
    return np.maximum(np.abs(dy), np.abs(dx)) - 0.85 * radius
  if shape == "diamond":
    return (np.abs(dy) + np.abs(dx) - 1.2 * radius) / np.sqrt(2.0)
  if shape == "triangle":
    # Upward equilateral triangle: intersection of three half-planes, centred on its centroid.
    r_in = 0.65 * radius
    s3 = np.sqrt(3.0) / 2.0
    return np.maximum.reduce([dy - r_in, -0.5 * dy + s3 * dx - r_in, -0.5 * dy - s3 * dx - r_in])
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture: str, ys: np.ndarray, xs: np.ndarray, period: float) -> np.ndarray:
  """Pattern intensity in [0, 1] at (possibly shifted) coordinates, soft-edged so that it scrolls smoothly."""
  k = 2.0 * np.pi / period
  if texture == "stripes":
    # Diagonal stripes, visible moving in any direction.
    return np.clip(0.5 + 1.5 * np.sin(k * (xs + ys) / np.sqrt(2.0)), 0.0, 1.0)
  if texture == "checker":
    return np.clip(0.5 + 2.0 * np.sin(k * xs) * np.sin(k * ys), 0.0, 1.0)
  if texture == "gradient":
    # Triangle wave over a long diagonal period: a smooth ramp dark → bright → dark.
    u = ((xs + 0.5 * ys) / (2.5 * period)) % 1.0
    return 1.0 - np.abs(2.0 * u - 1.0)
  if texture == "dots":
    cy = (ys % period) - period / 2.0
    cx = (xs % period) - period / 2.0
    return np.clip(0.28 * period - np.sqrt(cy * cy + cx * cx) + 0.5, 0.0, 1.0)
  raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _background(rng, frames, height, width, texture, color, direction) -> np.ndarray:
  """float32 [T, H, W, 3] in [0, 255]: the texture in a bright and a dark tone of ``color``, scrolling."""
  side = min(height, width)
  period = float(rng.uniform(0.3, 0.5) * side)
  speed = float(rng.uniform(0.04, 0.08) * side)  # pixels per frame
  phase = rng.uniform(0.0, period, size=2).astype(np.float32)
  ys, xs = _grid(height, width)
  t = np.arange(frames, dtype=np.float32)[:, None, None]
  sy, sx = _STEP[direction]
  # Content moves along the direction: the pattern at p at time t is the pattern at p - v·t at time 0.
  pattern = _texture(texture, ys - sy * speed * t + phase[0], xs - sx * speed * t + phase[1], period)
  bright = np.asarray(COLORS[color], np.float32)
  dark = 0.3 * bright + 15.0
  return dark + pattern[..., None] * (bright - dark)


def _sprite(rng, frames, height, width, shape, motion, aa_width: float = _AA_WIDTH) -> np.ndarray:
  """float32 alpha [T, H, W] in [0, 1] of one sprite whose centre stays inside the frame, edges a linear ramp
  ``aa_width`` pixels wide."""
  side = min(height, width)
  radius = float(rng.uniform(0.16, 0.26) * side)  # extent ~30–50% of the frame side
  travel = float(rng.uniform(0.3, 0.5) * side) if motion != "still" else 0.0
  sy, sx = _STEP[motion]
  margin = 0.25 * radius

  # Choose a start so that the whole path of the centre stays within [margin, size - 1 - margin].
  def start(size: int, step: float) -> float:
    lo, hi = margin, size - 1 - margin
    lo, hi = (lo - min(step, 0.0) * travel, hi - max(step, 0.0) * travel)
    return float(rng.uniform(lo, max(lo, hi)))

  cy0, cx0 = start(height, sy), start(width, sx)
  frac = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None, None]
  cy = cy0 + sy * travel * frac
  cx = cx0 + sx * travel * frac
  ys, xs = _grid(height, width)
  sdf = _shape_sdf(shape, ys - cy, xs - cx, radius)
  return np.clip(0.5 - sdf / aa_width, 0.0, 1.0)


def _sprite_phrase(color: str, shape: str, motion: str) -> str:
  article = "an" if color[0] in "aeiou" else "a"
  return f"{article} {color} {shape} " + ("standing still" if motion == "still" else f"moving {motion}")


def make_scene(
  rng_or_seed: int | np.random.Generator | np.random.SeedSequence,
  frames: int,
  height: int,
  width: int,
  *,
  num_sprites: int = 1,
) -> dict[str, Any]:
  """One layered scene; the same seed always gives the same scene.

  Returns a dict with uint8 ``fg`` [T, H, W, 3] (straight colour), ``alpha`` [T, H, W, 1], ``bg``, ``blend``
  (α·fg + (1 − α)·bg from the stored uint8 layers, rounded), the prompts ``fg_prompt``, ``bg_prompt``,
  ``blend_prompt`` and the attributes ``fg_color``, ``fg_shape``, ``motion`` (of the first sprite),
  ``bg_color``, ``bg_texture``, ``bg_motion``.
  """
  if num_sprites not in (1, 2):
    raise ValueError(f"num_sprites must be 1 or 2, got {num_sprites}")
  rng = _as_rng(rng_or_seed)
  bg_color, bg_texture, bg_motion = _pick(rng, COLORS), _pick(rng, TEXTURES), _pick(rng, DIRECTIONS)
  bg = _background(rng, frames, height, width, bg_texture, bg_color, bg_motion)

  # Sprites are composited front to back: the first one is on top.
  premult = np.zeros((frames, height, width, 3), np.float32)
  alpha = np.zeros((frames, height, width, 1), np.float32)
  sprites = []
  for _ in range(num_sprites):
    color = _pick(rng, COLORS, exclude=[bg_color] + [s[0] for s in sprites])
    shape, motion = _pick(rng, SHAPES), _pick(rng, MOTIONS)
    a = _sprite(rng, frames, height, width, shape, motion)[..., None]
    premult += (1.0 - alpha) * a * np.asarray(COLORS[color], np.float32)
    alpha += (1.0 - alpha) * a
    sprites.append((color, shape, motion))
  # Straight colour: the sprite colour where covered, the first sprite's colour elsewhere (invisible).
  first = np.asarray(COLORS[sprites[0][0]], np.float32)
  fg = np.where(alpha > 1e-6, premult / np.maximum(alpha, 1e-6), first)

  fg8 = np.clip(np.rint(fg), 0, 255).astype(np.uint8)
  bg8 = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
  alpha8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
  a = alpha8.astype(np.float32) / 255.0
  blend8 = np.clip(np.rint(a * fg8 + (1.0 - a) * bg8), 0, 255).astype(np.uint8)

  fg_prompt = " and ".join(_sprite_phrase(*s) for s in sprites)
  bg_prompt = f"{bg_color} {_TEXTURE_WORDS[bg_texture]} scrolling {bg_motion}"
  return {
    "fg": fg8,
    "alpha": alpha8,
    "bg": bg8,
    "blend": blend8,
    "fg_prompt": fg_prompt,
    "bg_prompt": bg_prompt,
    "blend_prompt": f"{fg_prompt} over {bg_prompt}",
    "fg_color": sprites[0][0],
    "fg_shape": sprites[0][1],
    "motion": sprites[0][2],
    "bg_color": bg_color,
    "bg_texture": bg_texture,
    "bg_motion": bg_motion,
  }


# ----------------------------------------------------------------------------- the quality gap (kinds)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _composite(fg8: np.ndarray, alpha8: np.ndarray, bg8: np.ndarray) -> np.ndarray:
  a = alpha8.astype(np.float32) / 255.0
  return _to_uint8(a * fg8 + (1.0 - a) * bg8)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """mask [H, W] moved by (dy, dx) pixels, zeros shifted in."""
  out = np.zeros_like(mask)
  h, w = mask.shape
  out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
    max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
  ]
  return out


def morph(mask: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation (radius > 0) or erosion (radius < 0) of bool [..., H, W] by a (2|r|+1)² square."""
  if radius == 0:
    return mask.copy()
  m = mask if radius > 0 else ~mask
  out = np.zeros_like(m)
  r = abs(radius)
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      out |= np.stack([_shift(f, dy, dx) for f in m.reshape((-1,) + m.shape[-2:])]).reshape(m.shape)
  return out if radius > 0 else ~out


def _inpaint_smear(bg: np.ndarray, hole: np.ndarray) -> np.ndarray:
  """float32 [T, H, W, 3]: ``bg`` with the pixels of ``hole`` [T, H, W] filled with the mean colour of the rest
  of their row (the frame's mean where a whole row is a hole): the horizontal streaks of a poor inpainting."""
  out = bg.astype(np.float32).copy()
  keep = (~hole)[..., None].astype(np.float32)
  row_n = keep.sum(axis=2, keepdims=True)
  frame_mean = (out * keep).sum(axis=(1, 2), keepdims=True) / np.maximum(
    keep.sum(axis=(1, 2), keepdims=True), 1.0
  )
  row_mean = np.where(row_n > 0, (out * keep).sum(axis=2, keepdims=True) / np.maximum(row_n, 1.0), frame_mean)
  return np.where(hole[..., None], np.broadcast_to(row_mean, out.shape), out)


def degrade_low_quality(scene: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  """A scene as automatic annotation would give it (kind ``lowq_video``); the blend stays the true video.

  Matte: thresholded at 0.5 (binary), eroded or dilated by one pixel for the whole clip (or left), and moved by
  up to a pixel per frame. Foreground: the blend (straight colour; fg = bl × mask downstream). Background:
  the true one with the foreground's (dilated) region inpainted by row-mean smears.
  """
  true_alpha = scene["alpha"][..., 0].astype(np.float32) / 255.0
  mask = true_alpha >= 0.5
  mask = morph(mask, int(rng.choice([-1, 0, 1])))
  jitter = rng.integers(-1, 2, size=(mask.shape[0], 2))
  mask = np.stack([_shift(f, int(dy), int(dx)) for f, (dy, dx) in zip(mask, jitter)])
  hole = morph(true_alpha > 0.02, 1)
  bg = _to_uint8(_inpaint_smear(scene["bg"], hole))
  out = dict(scene)
  out.update(fg=scene["blend"].copy(), alpha=(mask[..., None] * 255).astype(np.uint8), bg=bg)
  return out


def make_hq_image(rng_or_seed, frames: int, height: int, width: int) -> dict[str, Any]:
  """A high-quality layered image (kind ``hq_image``) repeated over ``frames`` frames: a still sprite with a
  feathered, possibly semi-transparent matte (opacity in :data:`HQ_OPACITY`, prompt word "translucent"), in
  an images-only colour with probability :data:`HQ_IMAGE_ONLY_P`, over a clean still background."""
  rng = _as_rng(rng_or_seed)
  bg_color, bg_texture = _pick(rng, COLORS), _pick(rng, TEXTURES)
  bg = _background(rng, 1, height, width, bg_texture, bg_color, _pick(rng, DIRECTIONS))
  image_only = rng.uniform() < HQ_IMAGE_ONLY_P
  color = _pick(rng, IMAGE_ONLY_COLORS) if image_only else _pick(rng, COLORS, exclude=[bg_color])
  shape = _pick(rng, SHAPES)
  feather = float(rng.uniform(*HQ_FEATHER))
  translucent = rng.uniform() < HQ_TRANSLUCENT_P
  opacity = float(rng.uniform(*HQ_OPACITY)) if translucent else 1.0
  alpha = opacity * _sprite(rng, 1, height, width, shape, "still", aa_width=feather)[..., None]
  rgb = {**COLORS, **IMAGE_ONLY_COLORS}[color]
  fg8 = np.broadcast_to(np.asarray(rgb, np.uint8), (1, height, width, 3))
  alpha8, bg8 = _to_uint8(alpha * 255.0), _to_uint8(bg)
  blend8 = _composite(fg8, alpha8, bg8)
  article = "an" if (("translucent " if translucent else "") + color)[0] in "aeiou" else "a"
  fg_prompt = f"{article} {'translucent ' if translucent else ''}{color} {shape} standing still"
  bg_prompt = f"{bg_color} {_TEXTURE_WORDS[bg_texture]}"
  rep = lambda x: np.repeat(x, frames, axis=0)
  return {
    "fg": rep(fg8),
    "alpha": rep(alpha8),
    "bg": rep(bg8),
    "blend": rep(blend8),
    "fg_prompt": fg_prompt,
    "bg_prompt": bg_prompt,
    "blend_prompt": f"{fg_prompt} over {bg_prompt}",
    "fg_color": color,
    "fg_shape": shape,
    "motion": "still",
    "bg_color": bg_color,
    "bg_texture": bg_texture,
    "bg_motion": "still",
  }


def make_copy_paste(rng_or_seed, frames: int, height: int, width: int) -> dict[str, Any]:
  """A copy-paste video (kind ``copy_paste``): the moving sprite (fg, matte) of one scene pasted on the
  scrolling background of another, blend recomposited, prompts composed."""
  rng = _as_rng(rng_or_seed)
  top = make_scene(rng, frames, height, width)
  under = make_scene(rng, frames, height, width)
  while under["bg_color"] == top["fg_color"]:  # keep the sprite visible
    under = make_scene(rng, frames, height, width)
  out = dict(top)
  out.update(
    bg=under["bg"],
    blend=_composite(top["fg"], top["alpha"], under["bg"]),
    bg_prompt=under["bg_prompt"],
    blend_prompt=f"{top['fg_prompt']} over {under['bg_prompt']}",
    bg_color=under["bg_color"],
    bg_texture=under["bg_texture"],
    bg_motion=under["bg_motion"],
  )
  return out


def make_example(kind: str, rng_or_seed, frames: int, height: int, width: int) -> dict[str, Any]:
  """One scene of a kind of :data:`KINDS` (same fields as :func:`make_scene`)."""
  rng = _as_rng(rng_or_seed)
  if kind == "clean":
    return make_scene(rng, frames, height, width)
  if kind == "lowq_video":
    return degrade_low_quality(make_scene(rng, frames, height, width), rng)
  if kind == "hq_image":
    return make_hq_image(rng, frames, height, width)
  if kind == "copy_paste":
    return make_copy_paste(rng, frames, height, width)
  raise ValueError(f"synthetic kind {kind!r} unknown; expected one of {KINDS}")
