"""Layer-specific evaluation metrics (NumPy, batch-friendly).

Conventions follow :mod:`layerflow_jax.layers`: colour in [-1, 1], alpha in [0, 1], foreground premultiplied.
An *example* is the last ``example_ndim`` axes (default 4: ``[T, H, W, C]``); any leading axes are batch
axes. Each metric returns a Python float for a single example and a float64 array of the leading (batch)
shape otherwise. JAX arrays are accepted (converted with ``np.asarray``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from data_pipelines import synthetic as _synthetic
from layerflow_jax import layers as L

PSNR_CAP_DB = 100.0
EXAMPLE_NDIM = 4

# Named colours in 0..255 RGB: the synthetic prompts' colours (one definition, in data_pipelines.synthetic) plus
# magenta, gray and black, which catch desaturated or wrong-hue generations.
PALETTE: dict[str, tuple[int, int, int]] = {
  **_synthetic.COLORS,
  "magenta": (230, 40, 200),
  "gray": (128, 128, 128),
  "black": (15, 15, 15),
}


def _arr(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def _axes(x: np.ndarray, example_ndim: int) -> tuple[int, ...]:
  n = min(example_ndim, x.ndim)
  return tuple(range(x.ndim - n, x.ndim))


def _finish(v: np.ndarray):
  v = np.asarray(v, dtype=np.float64)
  return float(v) if v.ndim == 0 else v


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{what}: shapes differ, {a.shape} vs {b.shape}")


def alpha_iou(pred_alpha, true_alpha, threshold: float = 0.5, *, example_ndim: int = EXAMPLE_NDIM):
  """IoU of the mattes binarised at ``alpha > threshold``, over all pixels and frames of each example:
  |P ∩ G| / |P ∪ G|; an example where both masks are empty scores 1.0. Mattes in [0, 1]."""
  p, t = _arr(pred_alpha), _arr(true_alpha)
  _same_shape(p, t, "alpha_iou")
  p, t = p > threshold, t > threshold
  ax = _axes(p, example_ndim)
  inter = np.logical_and(p, t).sum(axis=ax)
  union = np.logical_or(p, t).sum(axis=ax)
  return _finish(np.where(union == 0, 1.0, inter / np.maximum(union, 1)))


def alpha_mae(pred, true, *, example_ndim: int = EXAMPLE_NDIM):
  """Mean absolute error of the mattes (in alpha units, [0, 1]) per example."""
  p, t = _arr(pred), _arr(true)
  _same_shape(p, t, "alpha_mae")
  return _finish(np.abs(p - t).mean(axis=_axes(p, example_ndim)))


def psnr(pred, true, data_range: float = 2.0, *, example_ndim: int = EXAMPLE_NDIM):
  """Peak signal-to-noise ratio per example: 10·log10(data_range² / MSE) dB; ``data_range`` = 2 for
  [-1, 1] images. Capped at ``PSNR_CAP_DB`` (100 dB), which identical inputs (MSE = 0) score."""
  p, t = _arr(pred), _arr(true)
  _same_shape(p, t, "psnr")
  mse = ((p - t) ** 2).mean(axis=_axes(p, example_ndim))
  with np.errstate(divide="ignore"):
    db = 10.0 * np.log10(data_range**2 / np.maximum(mse, 1e-300))
  return _finish(np.minimum(np.where(mse == 0, PSNR_CAP_DB, db), PSNR_CAP_DB))


def composite_error(
  fg_premultiplied, alpha, bg, blend, *, example_ndim: int = EXAMPLE_NDIM, eps: float = 1e-8
):
  """Relative composite error per example, in [-1, 1] pixel space:
  ‖blend − (fg_pm + (1 − α)·bg)‖₂ / ‖blend‖₂ (= ‖blend − (α·fg + (1 − α)·bg)‖ / ‖blend‖).

  0 means the layers recomposite exactly into the blend. Note that mid-grey is 0 in [-1, 1], so a nearly
  grey blend has a small norm and inflates the ratio (the denominator is kept ≥ ``eps``).
  """
  fg, a, b, bl = _arr(fg_premultiplied), _arr(alpha), _arr(bg), _arr(blend)
  if a.ndim == fg.ndim - 1:
    a = a[..., None]
  recon = L.composite(fg, a, b)
  if recon.shape != bl.shape:
    raise ValueError(f"composite_error: composite has shape {recon.shape}, blend {bl.shape}")
  ax = _axes(bl, example_ndim)
  err = np.sqrt(((bl - recon) ** 2).sum(axis=ax))
  ref = np.sqrt((bl**2).sum(axis=ax))
  return _finish(err / np.maximum(ref, eps))


def temporal_change(clip, *, example_ndim: int = EXAMPLE_NDIM):
  """Mean absolute frame-to-frame difference of a clip [..., T, H, W, C] (pixel units, T ≥ 2):
  mean over t, pixels and channels of |x[t+1] − x[t]|. 0 for a static clip."""
  x = _arr(clip)
  if x.ndim < 4 or x.shape[-4] < 2:
    raise ValueError(f"temporal_change needs a clip [..., T, H, W, C] with T >= 2, got shape {x.shape}")
  d = np.abs(np.diff(x, axis=-4))
  return _finish(d.mean(axis=_axes(d, example_ndim)))


def temporal_consistency_ratio(generated, reference, *, eps: float = 1e-6, example_ndim: int = EXAMPLE_NDIM):
  """(temporal_change(generated) + eps) / (temporal_change(reference) + eps) per example.

  ≈ 1: the generated clip moves as much as the reference; ≪ 1: frozen; ≫ 1: flicker. Two static clips → 1.
  """
  g = np.asarray(temporal_change(generated, example_ndim=example_ndim), dtype=np.float64)
  r = np.asarray(temporal_change(reference, example_ndim=example_ndim), dtype=np.float64)
  return _finish((g + eps) / (r + eps))


def mean_straight_color(fg_premultiplied, alpha, *, eps: float = 1e-6) -> np.ndarray:
  """Alpha-weighted mean straight colour of [..., T, H, W, 3] → [..., 3] in [0, 1]:
  Σ α·fg / Σ α = Σ fg_pm / Σ α (NaN where the matte is empty)."""
  fg, a = _arr(fg_premultiplied), _arr(alpha)
  if a.ndim == fg.ndim - 1:
    a = a[..., None]
  num = fg.sum(axis=(-4, -3, -2))
  den = np.broadcast_to(a, fg.shape[:-1] + (1,)).sum(axis=(-4, -3, -2))
  mean = np.where(den > eps, num / np.maximum(den, eps), np.nan)
  return np.clip((mean + 1.0) / 2.0, 0.0, 1.0)


def dominant_color(fg_premultiplied, alpha, palette: Mapping[str, tuple[int, int, int]] | None = None):
  """Name of the palette colour nearest (Euclidean RGB) to the alpha-weighted mean straight colour.

  Inputs [..., T, H, W, 3] premultiplied in [-1, 1] and [..., T, H, W, 1] in [0, 1]; ``palette`` maps names
  to 0..255 RGB (default :data:`PALETTE`). Returns a str for one example (``"none"`` for an empty matte),
  else an array of str of the leading shape. Used to check the colour named in the fg prompt.
  """
  pal = dict(PALETTE if palette is None else palette)
  names = list(pal)
  colors = np.asarray([pal[n] for n in names], dtype=np.float64) / 255.0
  mean = mean_straight_color(fg_premultiplied, alpha)
  dist = ((mean[..., None, :] - colors) ** 2).sum(axis=-1)
  empty = np.isnan(dist).any(axis=-1)
  idx = np.argmin(np.nan_to_num(dist, nan=np.inf), axis=-1)
  out = np.where(empty, "none", np.asarray(names)[idx])
  return str(out) if out.ndim == 0 else out


def _frame_shape(mask: np.ndarray, min_pixels: int) -> str:
  """One binary frame [H, W] → the synthetic shape whose template, centred on the mask's centroid and scaled
  over a range of sizes, overlaps the mask best (IoU); ``"none"`` for (nearly) empty masks."""
  ys, xs = np.nonzero(mask)
  if ys.size < min_pixels:
    return "none"
  gy, gx = np.meshgrid(np.arange(mask.shape[0]) + 0.0, np.arange(mask.shape[1]) + 0.0, indexing="ij")
  dy, dx = gy - ys.mean(), gx - xs.mean()
  extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
  best, best_iou = "none", -1.0
  for shape in _synthetic.SHAPES:
    for radius in np.linspace(0.25 * extent, extent, 16):
      t = _synthetic._shape_sdf(shape, dy, dx, radius) < 0
      iou = np.logical_and(t, mask).sum() / max(np.logical_or(t, mask).sum(), 1)
      if iou > best_iou:
        best, best_iou = shape, iou
  return best


def dominant_shape(alpha, *, threshold: float = 0.5, min_pixels: int = 4) -> str:
  """The sprite shape (one of the synthetic SHAPES, or ``"none"``) of one matte clip [T, H, W(, 1)]:
  the majority vote of per-frame classifications of ``alpha > threshold``. Meant for single-sprite scenes;
  its accuracy on ground-truth mattes is the ceiling any generated matte can reach (report both)."""
  a = _arr(alpha)
  if a.ndim == 4:
    a = a[..., 0]
  if a.ndim != 3:
    raise ValueError(f"dominant_shape needs one matte clip [T, H, W] or [T, H, W, 1], got shape {a.shape}")
  votes = [_frame_shape(frame > threshold, min_pixels) for frame in a]
  names, counts = np.unique(votes, return_counts=True)
  return str(names[np.argmax(counts)])


def prompt_attributes(fg_prompt: str) -> tuple[str | None, str | None]:
  """(colour, shape) named in a synthetic single-sprite foreground prompt; (None, None) when the prompt names
  no sprite or more than one (two-sprite scenes have no single answer)."""
  words = fg_prompt.lower().replace(",", " ").split()
  colors = [w for w in words if w in _synthetic.COLORS]
  shapes = [w for w in words if w in _synthetic.SHAPES]
  if len(colors) != 1 or len(shapes) != 1:
    return None, None
  return colors[0], shapes[0]
