"""Data: synthetic scenes, the TFDS builder, transforms and the Grain pipeline (batch contract)."""

from __future__ import annotations

import numpy as np
import pytest

from configs import default
from data_pipelines import layerflow_synthetic, pipeline, synthetic, transforms
from layerflow_jax import layers

FRAMES, SIZE, NUM_TRAIN, NUM_VAL = 8, 16, 16, 4


def tiny_config(data_dir, layout: str = "rgba"):
  c = default.get_config(f"layout={layout}")
  c.data.data_dir = str(data_dir)
  c.data.frames, c.data.height, c.data.width = FRAMES, SIZE, SIZE
  c.data.num_train, c.data.num_validation = NUM_TRAIN, NUM_VAL
  c.data.batch_size = 4
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  layerflow_synthetic.build(tiny_config(path).data)
  return path


def records_by_id(source) -> dict:
  return {r["id"]: r for r in (source[i] for i in range(len(source)))}


def _decode_tokens(row: np.ndarray) -> str:
  return bytes((row[row > 0] - 1).astype(np.uint8).tolist()).decode("utf-8")


# ----------------------------------------------------------------------------- scenes


def test_scene_is_deterministic_from_seed():
  a, b, c = (synthetic.make_scene(s, FRAMES, 32, 32) for s in (7, 7, 8))
  for key in ("fg", "alpha", "bg", "blend"):
    np.testing.assert_array_equal(a[key], b[key])
  assert a["blend_prompt"] == b["blend_prompt"]
  assert not np.array_equal(a["blend"], c["blend"])


@pytest.mark.parametrize("num_sprites", [1, 2])
def test_scene_layers_and_composite_identity(num_sprites):
  for seed in range(6):
    s = synthetic.make_scene(seed, FRAMES, 32, 32, num_sprites=num_sprites)
    assert s["fg"].shape == s["bg"].shape == s["blend"].shape == (FRAMES, 32, 32, 3)
    assert s["alpha"].shape == (FRAMES, 32, 32, 1)
    assert all(s[k].dtype == np.uint8 for k in ("fg", "alpha", "bg", "blend"))
    a = s["alpha"].astype(np.float64) / 255.0
    expected = a * s["fg"] + (1.0 - a) * s["bg"]
    assert np.abs(s["blend"] - expected).max() <= 1.0
    # Soft edges, and the sprite is at least partly in every frame.
    assert ((s["alpha"] > 0) & (s["alpha"] < 255)).any()
    assert (s["alpha"].reshape(FRAMES, -1).max(axis=1) == 255).all()


def test_scene_prompts_follow_attributes():
  for seed in range(20):
    s = synthetic.make_scene(seed, FRAMES, 32, 32)
    assert s["fg_color"] != s["bg_color"]
    assert s["fg_color"] in s["fg_prompt"] and s["fg_shape"] in s["fg_prompt"]
    assert s["bg_color"] in s["bg_prompt"] and f"scrolling {s['bg_motion']}" in s["bg_prompt"]
    assert s["blend_prompt"] == f"{s['fg_prompt']} over {s['bg_prompt']}"
    assert s["motion"] in synthetic.MOTIONS and s["bg_texture"] in synthetic.TEXTURES


# ----------------------------------------------------------------------------- builder


def test_builder_is_deterministic_and_sized(tmp_path, data_dir):
  cfg = tiny_config(tmp_path).data
  builder = layerflow_synthetic.build(cfg)
  assert builder.builder_config.name == f"h{SIZE}_w{SIZE}_f{FRAMES}_n{NUM_TRAIN}_v{NUM_VAL}_s0"
  ours = records_by_id(layerflow_synthetic.load_source(cfg, "train"))
  theirs = records_by_id(layerflow_synthetic.load_source(tiny_config(data_dir).data, "train"))
  assert len(ours) == NUM_TRAIN and ours.keys() == theirs.keys()
  for key, rec in ours.items():
    for field, value in rec.items():
      np.testing.assert_array_equal(value, theirs[key][field])
  val = records_by_id(layerflow_synthetic.load_source(cfg, "validation"))
  assert len(val) == NUM_VAL
  # Disjoint seeds: no validation scene repeats a training scene.
  assert not any(np.array_equal(v["blend"], t["blend"]) for v in val.values() for t in ours.values())
  rec = next(iter(val.values()))
  assert rec["fg"].shape == (FRAMES, SIZE, SIZE, 3) and rec["alpha"].shape == (FRAMES, SIZE, SIZE, 1)
  assert rec["fg"].dtype == np.uint8 and isinstance(rec["blend_prompt"], bytes) and bool(rec["has_bg"])


def test_build_is_idempotent(data_dir):
  builder = layerflow_synthetic.build(tiny_config(data_dir).data)  # reuses: no error, same place
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == NUM_TRAIN


def test_unbuilt_dataset_gives_clear_error(tmp_path):
  cfg = tiny_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="layerflow data build layerflow_synthetic"):
    layerflow_synthetic.load_source(cfg.data, "train")
  with pytest.raises(FileNotFoundError, match="not built"):
    pipeline.make_dataset(cfg, "train")


# ----------------------------------------------------------------------------- transforms


def test_static_clip_repeats_one_frame():
  scene = synthetic.make_scene(3, FRAMES, SIZE, SIZE)
  for example in (scene, transforms.decode(scene)):
    out = transforms.static_clip(example, np.random.default_rng(0))
    for key in transforms.LAYER_KEYS:
      assert out[key].shape == example[key].shape
      assert (out[key] == out[key][:1]).all()
      assert any(np.array_equal(out[key][0], example[key][t]) for t in range(FRAMES))
    assert out["fg_prompt"] == example["fg_prompt"]


def test_missing_background_marks_clip_invalid():
  example = transforms.decode({**synthetic.make_scene(0, 2, 8, 8), "has_bg": False})
  for name in ("rgba", "rgb"):
    layout = layers.get_layout(name)
    valid = transforms.to_clips(example, layout)["clip_valid"]
    assert valid.tolist() == [c != layers.BG for c in layout.clips]


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("layout", ["rgba", "rgb"])
def test_batch_contract(data_dir, layout):
  config = tiny_config(data_dir, layout)
  lay = layers.get_layout(layout)
  batch = pipeline.make_dataset(config, "validation")[0]
  b, length = config.data.batch_size, config.text_encoder.max_length
  assert set(batch) == {"video", "tokens", "clip_valid", "motion_scale"}
  assert batch["video"].shape == (b, lay.num_clips * FRAMES, SIZE, SIZE, 3)
  assert batch["video"].dtype == np.float32
  assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0
  assert batch["tokens"].shape == (b, 3, length) and batch["tokens"].dtype == np.int32
  assert batch["clip_valid"].shape == (b, lay.num_clips) and batch["clip_valid"].dtype == np.bool_
  assert batch["clip_valid"].all()
  assert batch["motion_scale"].shape == (b,) and batch["motion_scale"].dtype == np.float32
  assert (batch["motion_scale"] == 0.0).all()

  # Validation is unshuffled: batch 0 is records 0..b-1, and its video is exactly pack(layers_to_clips(...)).
  source = layerflow_synthetic.load_source(config.data, "validation")
  recs = [source[i] for i in range(b)]
  stack = {k: np.stack([r[k] for r in recs]) for k in transforms.LAYER_KEYS}
  fg, bg, blend = (stack[k].astype(np.float32) / 127.5 - 1.0 for k in ("fg", "bg", "blend"))
  alpha = stack["alpha"].astype(np.float32) / 255.0
  expected = layers.pack(layers.layers_to_clips(fg, alpha, bg, blend, lay))
  np.testing.assert_allclose(batch["video"], expected, atol=1e-6)

  clips = layers.unpack(batch["video"], lay.num_clips)
  fg_clip = clips[:, lay.index(layers.FG)]
  assert (fg_clip[np.broadcast_to(alpha == 0.0, fg_clip.shape)] == 0.0).all()
  if lay.has_alpha:
    a_clip = clips[:, lay.index(layers.ALPHA)]
    assert a_clip.min() >= -1.0 and (a_clip == a_clip[..., :1]).all()

  for row, rec in zip(batch["tokens"], recs):
    prompts = [rec[k].decode() for k in transforms.PROMPT_KEYS]
    assert [_decode_tokens(r) for r in row] == [p[:length] for p in layers.format_prompts(*prompts)]


def test_train_dataset_repeats_and_reshuffles(data_dir):
  config = tiny_config(data_dir)
  ds = pipeline.make_dataset(config, "train")
  per_epoch = NUM_TRAIN // config.data.batch_size
  first = np.concatenate([ds[i]["tokens"] for i in range(per_epoch)])
  second = np.concatenate([ds[i]["tokens"] for i in range(per_epoch, 2 * per_epoch)])
  assert sorted(map(bytes, first)) == sorted(map(bytes, second))  # the same examples ...
  assert not np.array_equal(first, second)  # ... in another order
  val = pipeline.make_dataset(config, "validation")
  assert len(val) == 1  # no repeat


def test_process_blocks_are_the_global_batch_and_cover_an_epoch(data_dir):
  config = tiny_config(data_dir)
  whole = pipeline.make_dataset(config, "train")
  shards = [pipeline.make_dataset(config, "train", shard_index=i, shard_count=2) for i in (0, 1)]
  per_epoch = NUM_TRAIN // config.data.batch_size
  ids = []
  for step in range(per_epoch + 1):  # one epoch and the first batch of the next (reshuffled)
    rows = [s[step] for s in shards]
    assert all(len(r["tokens"]) == config.data.batch_size // 2 for r in rows)
    for key in whole[step]:
      np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), whole[step][key], err_msg=key)
    ids += [v.tobytes() for r in rows for v in r["video"]]
  assert len(set(ids[:NUM_TRAIN])) == NUM_TRAIN  # the first epoch: every example once
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_dataset(config, "train", shard_count=3)


def test_iterator_state_round_trip(data_dir):
  config = tiny_config(data_dir)
  it = pipeline.make_iterator(config, "train")
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]  # crosses an epoch boundary (4 batches per epoch)
  fresh = pipeline.make_iterator(config, "train")
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_multiprocess_workers_match_in_process(data_dir):
  config = tiny_config(data_dir)
  want = [next(pipeline.make_iterator(config, "validation"))]
  config.data.worker_count = 2
  it = pipeline.make_iterator(config, "validation")
  try:
    got = list(it)
  finally:
    it.close()
  assert len(got) == len(want) == 1
  for key in want[0]:
    np.testing.assert_array_equal(got[0][key], want[0][key])
