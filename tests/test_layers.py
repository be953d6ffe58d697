import numpy as np
import pytest

from layerflow_jax import layers


def _rand(shape, seed=0, lo=-1.0, hi=1.0):
  return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def test_pack_unpack_round_trip():
  x = _rand((2, 4, 3, 5, 5, 3))
  packed = layers.pack(x)
  assert packed.shape == (2, 12, 5, 5, 3)
  np.testing.assert_array_equal(layers.unpack(packed, 4), x)
  np.testing.assert_array_equal(packed[:, 3:6], x[:, 1])  # clip 1 occupies frames 3..5


def test_unpack_refuses_uneven_split():
  with pytest.raises(ValueError, match="cannot be split into 4"):
    layers.unpack(np.zeros((1, 10, 2, 2, 3)), 4)


def test_layers_to_clips_and_back_rgba():
  fg, bg = _rand((3, 4, 4, 3), 1), _rand((3, 4, 4, 3), 2)
  alpha = _rand((3, 4, 4, 1), 3, 0.0, 1.0)
  blend = layers.composite(layers.premultiply(fg, alpha), alpha, bg)
  clips = layers.layers_to_clips(fg, alpha, bg, blend, layers.get_layout("rgba"))
  assert clips.shape == (4, 3, 4, 4, 3)
  back = layers.clips_to_layers(clips, layers.get_layout("rgba"))
  np.testing.assert_allclose(back["alpha"], alpha, atol=1e-6)
  np.testing.assert_allclose(back["fg"], fg * alpha, atol=1e-6)
  # composite identity with the premultiplied foreground
  np.testing.assert_allclose(
    layers.composite(back["fg"], back["alpha"], back["bg"]), back["blend"], atol=1e-6
  )


def test_premultiplied_foreground_is_zero_where_transparent():
  fg = _rand((2, 4, 4, 3))
  alpha = np.zeros((2, 4, 4, 1), np.float32)
  alpha[:, :2] = 1.0
  pm = layers.premultiply(fg, alpha)
  assert np.all(pm[:, 2:] == 0)
  np.testing.assert_array_equal(pm[:, :2], fg[:, :2])


def test_rgb_layout_has_three_clips():
  lay = layers.get_layout("rgb")
  assert lay.clips == ("fg", "bg", "blend") and not lay.has_alpha


@pytest.mark.parametrize(
  "task,rgba,rgb",
  [
    ("generate", [0, 0, 0, 0], [0, 0, 0]),
    ("decompose", [0, 0, 0, 1], [0, 0, 1]),
    ("fg2bg", [1, 1, 0, 0], [1, 0, 0]),
    ("bg2fg", [0, 0, 1, 0], [0, 1, 0]),
  ],
)
def test_tasks_are_given_clip_masks(task, rgba, rgb):
  np.testing.assert_array_equal(layers.given_clips(task, layers.get_layout("rgba")), np.array(rgba, bool))
  np.testing.assert_array_equal(layers.given_clips(task, layers.get_layout("rgb")), np.array(rgb, bool))


def test_unknown_task_and_layout_are_refused():
  with pytest.raises(ValueError, match="unknown task 'segment'"):
    layers.given_clips("segment", layers.get_layout("rgba"))
  with pytest.raises(ValueError, match="unknown layout 'cmyk'"):
    layers.get_layout("cmyk")


def test_prompts_are_prefixed_and_required():
  assert layers.format_prompts("a cat", "a room", "a cat in a room") == [
    "0, a cat",
    "1, a room",
    "2, a cat in a room",
  ]
  with pytest.raises(ValueError, match="prompt missing for layer.*bg"):
    layers.format_prompts("a cat", " ", "x")


def test_task_weights_vector():
  w = layers.task_weights_vector({"generate": 1, "decompose": 3})
  np.testing.assert_allclose(w, [0.25, 0.75, 0, 0])
  with pytest.raises(ValueError, match="unknown task"):
    layers.task_weights_vector({"gen": 1})
