"""The quality gap of the multi-stage data (synthetic kinds), its metrics and the multistage ablation's rows."""

from __future__ import annotations

import numpy as np
import pytest

from configs import default
from data_pipelines import layerflow_synthetic, registry, synthetic
from layerflow_jax import evaluate, validate
from layerflow_jax import sweep as hyper
from layerflow_jax.config import ConfigError, load_config

F, S = 6, 16


def _f(x):
  return np.asarray(x, np.float32)


def test_low_quality_video_has_annotation_artifacts():
  seeds = range(12)
  for seed in seeds:
    clean = synthetic.make_example("clean", seed, F, S, S)
    low = synthetic.make_example("lowq_video", seed, F, S, S)
    np.testing.assert_array_equal(low["blend"], clean["blend"])  # the video itself is the true one
    np.testing.assert_array_equal(low["fg"], low["blend"])  # fg = bl (× mask downstream)
    assert set(np.unique(low["alpha"])) <= {0, 255}  # binary matte
    far = ~synthetic.morph(clean["alpha"][..., 0] > 5, 1)  # outside the dilated foreground: the true bg
    np.testing.assert_array_equal(low["bg"][far], clean["bg"][far])
    assert low["fg_prompt"] == clean["fg_prompt"]
  # Jitter and erosion/dilation move the matte off the true one; the smear changes the bg under the sprite.
  lows = [synthetic.make_example("lowq_video", s, F, S, S) for s in seeds]
  cleans = [synthetic.make_example("clean", s, F, S, S) for s in seeds]
  off = [np.mean((lo["alpha"] > 127) != (cl["alpha"] >= 128)) for lo, cl in zip(lows, cleans)]
  assert max(off) > 0.01
  assert all(np.abs(_f(lo["bg"]) - _f(cl["bg"])).max() > 10 for lo, cl in zip(lows, cleans))


def test_high_quality_images_are_still_soft_and_have_images_only_colours():
  ex = [synthetic.make_example("hq_image", s, F, S, S) for s in range(24)]
  for e in ex:
    for k in ("fg", "alpha", "bg", "blend"):
      assert np.all(e[k] == e[k][:1])  # one image repeated
    a = _f(e["alpha"]) / 255
    assert ((a > 0.02) & (a < 0.98)).sum() > 0  # feathered edges
    translucent = "translucent" in e["fg_prompt"]
    assert (a.max() < 0.75) == translucent  # semi-transparent sprites, named in the prompt
    assert e["fg_color"] in e["fg_prompt"]
  colours = {e["fg_color"] for e in ex}
  assert colours & set(synthetic.IMAGE_ONLY_COLORS) and colours - set(synthetic.IMAGE_ONLY_COLORS)
  assert any("translucent" in e["fg_prompt"] for e in ex) and not all(
    "translucent" in e["fg_prompt"] for e in ex
  )
  # ... and neither the videos nor the copy-paste clips ever show an images-only colour.
  for kind in ("clean", "lowq_video", "copy_paste"):
    assert not {synthetic.make_example(kind, s, F, S, S)["fg_color"] for s in range(24)} & set(
      synthetic.IMAGE_ONLY_COLORS
    )


def test_copy_paste_video_pastes_a_moving_sprite_on_another_moving_background():
  for seed in range(6):
    e = synthetic.make_example("copy_paste", seed, F, S, S)
    a = _f(e["alpha"]) / 255
    blend = np.rint(a * e["fg"] + (1 - a) * e["bg"])
    np.testing.assert_allclose(_f(e["blend"]), blend, atol=1)
    assert np.abs(np.diff(_f(e["bg"]), axis=0)).mean() > 1  # the background moves
    assert e["blend_prompt"] == f"{e['fg_prompt']} over {e['bg_prompt']}"
    assert e["bg_color"] != e["fg_color"]


def test_builder_names_are_kinds_with_held_out_clips(tmp_path):
  c = default.get_config()
  c.data.data_dir = str(tmp_path)
  c.data.frames, c.data.height, c.data.width, c.data.num_train, c.data.num_validation = 4, 8, 8, 3, 2
  c.data.mixture = [
    dict(name="layerflow_synthetic_lowq"),
    dict(name="layerflow_synthetic_images", background="layerflow_synthetic_copypaste"),
  ]
  c.eval.multistage = True
  built = registry.build_all(c)
  assert len(built) == 4 and len(set(built)) == 4  # clean, lowq, images, copy-paste: one folder each
  for name, kind in layerflow_synthetic.NAMES.items():
    c.data.name = name
    val = layerflow_synthetic.load_source(c.data, "validation")
    assert len(val) == 2 and len(layerflow_synthetic.load_source(c.data, "train")) == 3
    want = synthetic.make_example(kind, np.random.SeedSequence([0, 1, 0]), 4, 8, 8)
    np.testing.assert_array_equal(np.asarray(val[0]["alpha"]), want["alpha"])
  with pytest.raises(ValueError, match="unknown"):
    layerflow_synthetic.make_config(kind="blurry")


def test_matte_scores_edge_band_and_semi_transparency():
  t = np.zeros((2, 12, 12), np.float32)
  t[:, 3:9, 3:9] = 0.5  # a translucent square
  band = evaluate.edge_band(t)
  assert band[0, 3, 3] and band[0, 2, 5] and not band[0, 0, 0]
  assert evaluate.matte_scores(t, t) == {"edge_alpha_mae": 0.0, "semi_reproduced": 1.0, "semi_alpha_mae": 0.0}
  opaque = np.where(t > 0, 1.0, 0.0)
  m = evaluate.matte_scores(opaque, t)
  assert m["semi_reproduced"] == 0.0 and m["semi_alpha_mae"] == pytest.approx(0.5)
  # Noise at the right level is no reproduction either.
  noisy = np.where(t > 0, np.random.default_rng(0).choice([0.1, 0.55], t.shape), 0.0)
  assert evaluate.matte_scores(noisy, t)["semi_reproduced"] == 0.0
  assert m["edge_alpha_mae"] > 0.2
  # An opaque true matte has no semi-transparency score; a blurred prediction costs in the edge band only.
  hard = np.where(t > 0, 1.0, 0.0)
  blurred = hard.copy()
  blurred[:, 2, 3:9] = 0.5
  m = evaluate.matte_scores(blurred, hard)
  assert set(m) == {"edge_alpha_mae"} and m["edge_alpha_mae"] > 0
  assert np.abs(blurred - hard)[~evaluate.edge_band(hard)].max() == 0


def test_zero_steps_needs_init_from():
  c = default.get_config()
  c.train.steps = 0
  with pytest.raises(ConfigError, match="train.steps=0"):
    validate.check_values(c)
  c.train.init_from = "somewhere"
  validate.check_values(c)


def test_multistage_sweep_rows():
  runs = hyper.expand("configs/ablations.py:demo,sweep=multistage")
  assert [r["name"] for r in runs] == [
    "variant=stage1",
    "variant=no_motion",
    "variant=remove",
    "variant=keep",
  ]
  s1, no_motion, remove, keep = [load_config(r["spec"], r["overrides"]) for r in runs]
  assert (s1.stage, s1.train.init_from, s1.train.steps) == ("stage1_base", "stage1_base", 0)
  assert no_motion.train.steps > 0 and no_motion.train.init_from == "stage1_base"
  assert set(no_motion.model.adapters) == {"content"} and not no_motion.train.adapter_scale_keys
  assert (remove.train.init_from, remove.train.steps) == ("stage3_content_lora", 0)
  assert remove.sampling.remove_adapters == ("motion",)
  assert keep.sampling.remove_adapters == () and keep.sampling.adapter_scales.motion == 1.0
  assert all(c.eval.multistage for c in (s1, no_motion, remove, keep))
  # The quality gap: stage 1 on low-quality video, stage 3 on images (motion LoRA on) + copy-paste videos.
  base = load_config("configs/ablations.py:demo,sweep=multistage,stage=stage1_base")
  assert [e["name"] for e in base.data.mixture] == ["layerflow_synthetic_lowq"]
  assert [(e["name"], e["transform"], e["motion_scale"]) for e in remove.data.mixture] == [
    ("layerflow_synthetic_images", "static", 1.0),
    ("layerflow_synthetic_copypaste", "video", 0.0),
  ]


def test_relative_change_ignores_contrast():
  clip = synthetic.make_example("clean", 1, F, S, S)["bg"].astype(np.float32) / 127.5 - 1.0
  still = np.repeat(clip[:1], F, axis=0)
  assert evaluate.relative_change(still) == 0.0
  r = evaluate.relative_change(clip)
  assert r > 0.05
  # Twice the contrast doubles the pixel-unit change but not the relative one.
  assert evaluate.relative_change(2.0 * clip + 0.3) == pytest.approx(r, rel=1e-6)


def test_timestep_power_leans_to_high_noise():
  import jax

  from layerflow_jax.diffusion import loss as loss_lib

  uniform = np.asarray(loss_lib.sample_timesteps(jax.random.key(0), 4096, 1000, 1.0))
  high = np.asarray(loss_lib.sample_timesteps(jax.random.key(0), 4096, 1000, 3.0))
  assert uniform.min() >= 0 and uniform.max() <= 999 and high.min() >= 0 and high.max() <= 999
  assert abs(uniform.mean() - 499.5) < 20
  assert abs(high.mean() - 750) < 20  # density 3x²: mean 3/4 of the range


def test_timestep_power_one_keeps_the_draws_of_runs_before_the_option():
  """power 1 (the default) draws exactly what ``jax.random.randint`` drew before the option existed, so adding it
  changed no default run (a different stream sent the demo's stage 1 down another trajectory: alpha IoU 0.07)."""
  import jax

  from layerflow_jax.diffusion import loss as loss_lib

  key = jax.random.key(3)
  np.testing.assert_array_equal(
    np.asarray(loss_lib.sample_timesteps(key, 64, 1000, 1.0)),
    np.asarray(jax.random.randint(key, (64,), 0, 1000, dtype=np.int32)),
  )
