"""Media writing/reading and layer metrics (CPU, NumPy only, no ffmpeg needed)."""

from __future__ import annotations

import importlib.util
import os

import imageio.v3 as iio
import numpy as np
import pytest

from layerflow_jax import layers as L
from layerflow_jax import media, metrics

T, H, W = 4, 16, 16


def _sample(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  fg = rng.uniform(-1, 1, (T, H, W, 3)).astype(np.float32)
  alpha = rng.uniform(0, 1, (T, H, W, 1)).astype(np.float32)
  alpha[:, :4] = 0.0  # a fully transparent band
  alpha[:, -4:] = 1.0  # and an opaque one
  bg = rng.uniform(-1, 1, (T, H, W, 3)).astype(np.float32)
  fg_pm = L.premultiply(fg, alpha)
  return {"fg": fg_pm, "alpha": alpha, "bg": bg, "blend": L.composite(fg_pm, alpha, bg)}


def _flat_frames(t: int = 6, h: int = 12, w: int = 20) -> np.ndarray:
  """uint8 frames of a few flat colours (exact through a GIF palette); frames 2 and 3 repeat frame 1."""
  colors = np.array([[255, 0, 0], [0, 0, 255], [0, 255, 0], [255, 255, 255]], np.uint8)
  pos, col = [0, 3, 3, 3, 6, 9, 12, 0], [1, 2, 2, 2, 3, 1, 2, 3]
  frames = np.zeros((t, h, w, 3), np.uint8)
  for i in range(t):
    frames[i] = colors[0]
    frames[i, 2:8, pos[i] : pos[i] + 6] = colors[col[i]]
  return frames


def _to_float(u8: np.ndarray) -> np.ndarray:
  return u8.astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- media


def test_to_uint8_and_checkerboard():
  np.testing.assert_array_equal(media.to_uint8(np.array([-2.0, -1.0, 0.0, 1.0, 3.0])), [0, 0, 128, 255, 255])
  board = media.checkerboard(4, 6, 2)
  assert board.shape == (4, 6, 3) and board.dtype == np.float32
  assert board[0, 0, 0] != board[0, 2, 0] and board[0, 0, 0] == board[2, 2, 0]


def test_write_layers_files_and_rgba_roundtrip(tmp_path):
  sample = _sample()
  out = media.write_layers(tmp_path, sample, fps=8, prefix="s0_", video_format="gif")
  assert set(out) == {"fg_rgba", "fg_anim", "alpha", "bg", "blend", "preview"}
  for path in out.values():
    assert os.path.exists(path), path
    assert os.path.basename(path).startswith("s0_")
  names = sorted(os.listdir(out["fg_rgba"]))
  assert names == [f"{i:04d}.png" for i in range(T)]

  alpha = sample["alpha"][..., 0]
  straight = L.unpremultiply(sample["fg"], sample["alpha"])
  for i, name in enumerate(names):
    rgba = iio.imread(os.path.join(out["fg_rgba"], name))
    assert rgba.shape == (H, W, 4) and rgba.dtype == np.uint8
    np.testing.assert_allclose(rgba[..., 3] / 255.0, alpha[i], atol=1 / 255 + 1e-6)
    mask = alpha[i] > 0.5
    # Colour in [0, 1] units: uint8 rounding is at most 0.5/255.
    np.testing.assert_allclose(rgba[mask][:, :3] / 255.0, (straight[i][mask] + 1) / 2, atol=2 / 255)

  anim = iio.imread(out["fg_anim"], index=...)
  assert anim.shape[0] == T and anim.shape[-1] == 4  # transparency kept
  preview = iio.imread(out["preview"])
  assert preview.shape[0] >= 4 * 128 and preview.shape[1] >= 5 * 128  # 4 rows x 5 columns, upscaled
  # The bg GIF reads back with the right frame count and size.
  assert media.read_video(out["bg"], frames=T, height=H, width=W).shape == (T, H, W, 3)


def test_write_layers_rgb_layout_without_alpha(tmp_path):
  sample = _sample()
  del sample["alpha"]
  out = media.write_layers(tmp_path, sample, video_format="gif")
  assert set(out) == {"fg", "bg", "blend", "preview"}


def test_write_layers_rejects_a_batch(tmp_path):
  sample = {k: v[None] for k, v in _sample().items()}
  with pytest.raises(ValueError, match="ONE sample"):
    media.write_layers(tmp_path, sample)


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None, reason="imageio-ffmpeg not installed")
def test_write_layers_mp4(tmp_path):
  out = media.write_layers(tmp_path, _sample(), video_format="mp4")
  for name in ("alpha", "bg", "blend"):
    assert out[name].endswith(".mp4")
  clip = media.read_video(out["blend"], frames=T, height=H, width=W)
  assert clip.shape == (T, H, W, 3)


def test_read_video_gif_roundtrip_with_repeated_frames(tmp_path):
  frames = _flat_frames()
  path = tmp_path / "clip.gif"
  iio.imwrite(path, frames, plugin="pillow", is_batch=True, **media._gif_kwargs(8))
  # Pillow stores frames 1-3 (identical) once; read_video expands them from the durations.
  clip = media.read_video(path, frames=6, height=12, width=20)
  np.testing.assert_array_equal(clip, _to_float(frames))
  # Also without the fps comment (the shortest duration is the period).
  plain = tmp_path / "plain.gif"
  iio.imwrite(plain, frames, plugin="pillow", is_batch=True, duration=125, loop=0)
  np.testing.assert_array_equal(media.read_video(plain, frames=5, height=12, width=20), _to_float(frames[:5]))


def test_read_video_static_gif_from_write_layers(tmp_path):
  sample = _sample()
  sample["bg"] = np.repeat(sample["bg"][:1], T, axis=0)  # static: the GIF stores a single frame
  out = media.write_layers(tmp_path, {"bg": sample["bg"]}, video_format="gif")
  clip = media.read_video(out["bg"], frames=T, height=H, width=W)
  assert clip.shape == (T, H, W, 3)


def test_read_video_png_folder_gray_and_rgba(tmp_path):
  frames = _flat_frames(t=3)
  for i, f in enumerate(frames):
    iio.imwrite(tmp_path / f"frame{i}.png", f)
  rgba = np.concatenate([frames[0], np.full((12, 20, 1), 7, np.uint8)], axis=-1)
  iio.imwrite(tmp_path / "frame10.png", rgba)  # natural order: after frame2; alpha dropped
  iio.imwrite(tmp_path / "frame11.png", frames[1, ..., 0])  # grayscale → RGB
  clip = media.read_video(tmp_path, frames=5, height=12, width=20)
  np.testing.assert_array_equal(clip[:3], _to_float(frames))
  np.testing.assert_array_equal(clip[3], _to_float(frames[0]))
  np.testing.assert_array_equal(clip[4], _to_float(np.repeat(frames[1, ..., :1], 3, axis=-1)))


def test_read_video_errors(tmp_path):
  frames = _flat_frames(t=5, h=48, w=64)
  frames[:, 0, 0] = np.arange(5)[:, None] * 40  # all frames distinct
  path = tmp_path / "clip.gif"
  iio.imwrite(path, frames, plugin="pillow", is_batch=True, duration=125, loop=0)
  with pytest.raises(ValueError, match=r"clip\.gif.*has 5 frames, need 8"):
    media.read_video(path, frames=8, height=48, width=64)
  expected = r"clip\.gif is 64x48 \(WxH\), the model's clips are 32x32; resize it first"
  with pytest.raises(ValueError, match=expected):
    media.read_video(path, frames=4, height=32, width=32)
  with pytest.raises(ValueError, match="missing.mp4: no such file"):
    media.read_video(tmp_path / "missing.mp4", frames=4, height=32, width=32)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="no frames"):
    media.read_video(empty, frames=1, height=32, width=32)


def test_save_grid_png(tmp_path):
  a = np.zeros((8, 8, 3), np.uint8)
  b = np.ones((4, 6), np.float32)  # float → [-1, 1] → white
  path = media.save_grid_png(tmp_path / "g.png", [[a, b], [b, a]], scale=2, pad=1)
  img = iio.imread(path)
  assert img.shape == (2 * 16 + 3, 2 * 16 + 3, 3)
  assert img[1, 1].tolist() == [0, 0, 0] and img[1, 18].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------- metrics


def test_alpha_iou_overlapping_squares():
  pred = np.zeros((1, 10, 10, 1))
  true = np.zeros((1, 10, 10, 1))
  pred[0, 0:4, 0:4] = 1.0  # 16 px
  true[0, 2:6, 2:6] = 0.9  # 16 px, overlap rows/cols 2-3 → 4 px
  assert metrics.alpha_iou(pred, true) == pytest.approx(4 / 28)
  assert metrics.alpha_iou(pred, pred) == 1.0
  empty = np.zeros_like(pred)
  assert metrics.alpha_iou(empty, empty) == 1.0
  batch = metrics.alpha_iou(np.stack([pred, empty]), np.stack([true, empty]))
  np.testing.assert_allclose(batch, [4 / 28, 1.0])


def test_alpha_mae():
  a = np.zeros((2, 1, 2, 2, 1))
  b = a.copy()
  b[1] = 0.5
  np.testing.assert_allclose(metrics.alpha_mae(a, b), [0.0, 0.5])


def test_psnr_known_noise():
  rng = np.random.default_rng(1)
  clean = rng.uniform(-0.5, 0.5, (2, 3, 8, 8, 3))
  noisy = clean + 0.1 * rng.choice([-1.0, 1.0], clean.shape)  # MSE exactly 0.01
  np.testing.assert_allclose(metrics.psnr(noisy, clean), 10 * np.log10(4 / 0.01))
  assert metrics.psnr(clean[0], clean[0]) == metrics.PSNR_CAP_DB


def test_composite_error():
  s = _sample()
  assert metrics.composite_error(s["fg"], s["alpha"], s["bg"], s["blend"]) < 1e-6
  wrong_bg = -s["bg"]
  assert metrics.composite_error(s["fg"], s["alpha"], wrong_bg, s["blend"]) > 0.1
  batch = {k: np.stack([v, v]) for k, v in s.items()}
  assert metrics.composite_error(batch["fg"], batch["alpha"], batch["bg"], batch["blend"]).shape == (2,)


def test_temporal_change_and_ratio():
  static = np.repeat(np.random.default_rng(2).uniform(-1, 1, (1, 8, 8, 3)), 5, axis=0)
  assert metrics.temporal_change(static) == 0.0
  moving = static.copy()
  moving[1::2] += 0.2  # alternating ±0.2 steps
  assert metrics.temporal_change(moving) == pytest.approx(0.2)
  assert metrics.temporal_consistency_ratio(static, static) == pytest.approx(1.0)
  assert metrics.temporal_consistency_ratio(static, moving) < 1e-3
  with pytest.raises(ValueError, match="T >= 2"):
    metrics.temporal_change(static[:1])


@pytest.mark.parametrize("name", ["red", "blue"])
def test_dominant_color_solid_sprite(name):
  rgb = np.asarray(metrics.PALETTE[name], np.float32) / 127.5 - 1.0
  alpha = np.zeros((3, 16, 16, 1), np.float32)
  alpha[:, 4:12, 4:12] = 1.0
  alpha[:, 3, 4:12] = 0.3  # a soft edge
  fg = L.premultiply(np.broadcast_to(rgb, (3, 16, 16, 3)), alpha)
  assert metrics.dominant_color(fg, alpha) == name
  assert metrics.dominant_color(fg, np.zeros_like(alpha)) == "none"
  both = metrics.dominant_color(np.stack([fg, fg]), np.stack([alpha, alpha]))
  assert both.tolist() == [name, name]


def test_fg_gif_fallback_without_webp(tmp_path, monkeypatch):
  monkeypatch.setattr(media, "have_webp", lambda: False)
  sample = _sample()
  out = media.write_layers(tmp_path, sample, video_format="gif")
  assert out["fg_anim"].endswith(".gif")
  anim = np.stack(media._read_animated_rgba(out["fg_anim"]))
  assert anim.shape == (T, H, W, 4)
  # GIF transparency is binary: the matte thresholded at 0.5.
  np.testing.assert_array_equal(anim[..., 3] > 127, sample["alpha"][..., 0] > 0.5)


def test_dominant_shape_on_synthetic_mattes():
  """The prompt-attribute check's shape classifier reads the named shape back from ground-truth mattes at 32×32
  (its ceiling for generated ones), and every shape is recognised at least once."""
  from data_pipelines import synthetic

  hits, seen = 0, {}
  for seed in range(48):
    scene = synthetic.make_scene(seed, frames=4, height=32, width=32)
    color, shape = metrics.prompt_attributes(scene["fg_prompt"])
    assert color == scene["fg_color"] and shape == scene["fg_shape"]
    pred = metrics.dominant_shape(scene["alpha"].astype(np.float32) / 255.0)
    hits += pred == shape
    seen[shape] = seen.get(shape, 0) + (pred == shape)
  assert hits / 48 >= 0.9, hits
  assert all(v > 0 for v in seen.values()) and len(seen) == 4, seen
  assert metrics.dominant_shape(np.zeros((3, 16, 16, 1), np.float32)) == "none"


def test_prompt_attributes_needs_one_sprite():
  assert metrics.prompt_attributes("a red circle moving left") == ("red", "circle")
  assert metrics.prompt_attributes("a red circle moving left and a blue square still") == (None, None)
  assert metrics.prompt_attributes("nothing here") == (None, None)
