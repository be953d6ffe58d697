"""Training input from imported data: copy-paste synthesis, static clips, crop/temporal sampling, prompt dropout,
stage mixtures, exact resume through Orbax, each process's block of the global batch (in one process), and the
latent cache."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from configs import default
from data_pipelines import (
  layerflow_folder,
  layerflow_images,
  layerflow_videos,
  layout_writer,
  pipeline,
  synthetic,
  transforms,
)
from layerflow_jax import layers

FRAMES, H, W = 4, 16, 16
# 2 of each are held out for validation.
NUM_VIDEOS, NUM_IMAGES, NUM_BACKGROUNDS = 14, 10, 10


def _scenes(n, frames, offset):
  return [synthetic.make_scene(2000 + offset + i, frames, H, W) for i in range(n)]


def make_config(data_dir: pathlib.Path, roots: dict, mixture_entries=()) -> object:
  c = default.get_config()
  c.data.data_dir = str(data_dir)
  c.data.frames, c.data.height, c.data.width = FRAMES, H, W
  c.data.num_validation, c.data.batch_size = 2, 4
  c.data.background_frames = 2 * FRAMES  # room for random temporal windows
  c.data.max_frame_stride = 2
  c.data.cache_dir = str(data_dir.parent / "latents")
  for name, root in roots.items():
    c.data.manual_dirs[name] = str(root)
  c.data.mixture = list(mixture_entries)
  return c


STAGE3 = [
  dict(name="layerflow_images", weight=0.5, transform="static", motion_scale=1.0),
  dict(
    name="layerflow_folder", weight=0.5, transform="video", background="layerflow_videos", motion_scale=0.0
  ),
]
STAGE2 = [
  dict(
    name="layerflow_folder", weight=1.0, transform="static", background="layerflow_videos", motion_scale=1.0
  )
]
STAGE1 = [dict(name="layerflow_folder", weight=1.0, transform="video", motion_scale=0.0)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The three imported datasets (layered videos, every third without bg; layered images; plain videos)."""
  tmp = tmp_path_factory.mktemp("pipeline")
  roots = {
    "layerflow_folder": tmp / "layered",
    "layerflow_images": tmp / "images",
    "layerflow_videos": tmp / "videos",
  }
  entries = {}
  for i, s in enumerate(_scenes(NUM_VIDEOS, FRAMES + 2, 0)):
    entries[f"v{i:02d}"] = layout_writer.write_layered_video(
      roots["layerflow_folder"], f"v{i:02d}", s, fg=i % 2 == 0, bg=i % 3 != 0
    )
  layout_writer.write_meta(roots["layerflow_folder"] / "train.json", entries)
  layout_writer.write_layered_images(roots["layerflow_images"], _scenes(NUM_IMAGES, 1, 100))
  bgs = _scenes(NUM_BACKGROUNDS, 3 * FRAMES, 200)
  layout_writer.write_plain_videos(
    roots["layerflow_videos"], [s["bg"] for s in bgs], [s["bg_prompt"] for s in bgs]
  )
  c = make_config(tmp / "tfds", roots)
  for name, module in (
    ("layerflow_folder", layerflow_folder),
    ("layerflow_images", layerflow_images),
    ("layerflow_videos", layerflow_videos),
  ):
    module.build(pipeline.source_config(c, name).data)
  return tmp, roots


def config_for(data, entries=STAGE3, **data_overrides):
  tmp, roots = data
  c = make_config(tmp / "tfds", roots, entries)
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def assert_batches_equal(a: dict, b: dict) -> None:
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- transforms


def test_copy_paste_blend_is_the_composite_within_uint8_rounding():
  fg_scene, bg_scene = (synthetic.make_scene(s, FRAMES, 24, 32) for s in (1, 2))
  bg = {"id": b"b", "video": bg_scene["bg"], "prompt": b"green stripes"}
  for seed in range(8):
    out = transforms.copy_paste(
      (fg_scene, transforms.as_background(bg)),
      np.random.default_rng(seed),
      scale=(0.3, 1.4),
      flip=0.5,
      template="{fg} over {bg}",
    )
    a = out["alpha"].astype(np.float64) / 255.0
    want = a * out["fg"] + (1.0 - a) * out["bg"]
    assert np.abs(out["blend"].astype(np.float64) - want).max() <= 0.5 + 1e-9  # rounding only
    np.testing.assert_array_equal(out["bg"], bg_scene["bg"])
    assert out["alpha"].any() and out["blend_prompt"] == f"{fg_scene['fg_prompt']} over green stripes"
    assert out["bg_prompt"] == "green stripes" and out["has_bg"]


def test_copy_paste_scale_position_and_flip():
  fg_scene, bg_scene = (synthetic.make_scene(s, FRAMES, 24, 32) for s in (3, 4))
  pair = (fg_scene, {"bg": bg_scene["bg"], "bg_prompt": "x"})
  # Scale 1 leaves no room to move: the paste is the foreground itself, mirrored when flipped.
  same = transforms.copy_paste(pair, np.random.default_rng(0), scale=(1.0, 1.0), flip=0.0)
  np.testing.assert_array_equal(same["alpha"], fg_scene["alpha"])
  flipped = transforms.copy_paste(pair, np.random.default_rng(0), scale=(1.0, 1.0), flip=1.0)
  np.testing.assert_array_equal(flipped["alpha"], fg_scene["alpha"][:, :, ::-1])
  np.testing.assert_array_equal(flipped["fg"], fg_scene["fg"][:, :, ::-1])
  # Half scale: the matte lies inside one 12 × 16 window, placed differently for different seeds.
  boxes = set()
  for seed in range(6):
    half = transforms.copy_paste(pair, np.random.default_rng(seed), scale=(0.5, 0.5), flip=0.0)
    ys, xs = np.nonzero(half["alpha"].max(axis=(0, 3)))
    assert ys.max() - ys.min() < 12 and xs.max() - xs.min() < 16
    boxes.add((ys.min(), xs.min()))
  assert len(boxes) > 1
  again = transforms.copy_paste(pair, np.random.default_rng(5), scale=(0.5, 0.5), flip=0.0)
  np.testing.assert_array_equal(again["blend"], half["blend"])  # deterministic by seed


def test_temporal_sample_windows_and_image_repeat():
  scene = synthetic.make_scene(5, 12, H, W)
  strides = set()
  for seed in range(10):
    out = transforms.temporal_sample(scene, np.random.default_rng(seed), frames=FRAMES, max_stride=3)
    idx = [
      next(t for t in range(12) if np.array_equal(out["blend"][i], scene["blend"][t])) for i in range(FRAMES)
    ]
    steps = set(np.diff(idx))
    assert len(steps) == 1 and 1 <= steps.pop() <= 3  # evenly spaced
    strides.add(idx[1] - idx[0])
    for key in ("fg", "alpha", "bg"):
      np.testing.assert_array_equal(out[key], scene[key][idx])  # every layer on the same frames
  assert len(strides) > 1
  image = {k: v[:1] for k, v in scene.items() if isinstance(v, np.ndarray)}
  rep = transforms.temporal_sample(image, np.random.default_rng(0), frames=FRAMES)
  assert rep["blend"].shape[0] == FRAMES and (rep["blend"] == image["blend"]).all()
  with pytest.raises(ValueError, match="fewer than data.frames"):
    transforms.temporal_sample(
      {k: v[:2] for k, v in scene.items() if isinstance(v, np.ndarray)}, None, frames=FRAMES
    )


def test_random_crop_resize_same_window_for_every_layer():
  scene = synthetic.make_scene(6, FRAMES, 32, 32)
  scene["fg"] = scene["bg"] = scene["blend"]  # identical layers …
  out = transforms.random_crop_resize(scene, np.random.default_rng(0), height=H, width=W, min_area=0.3)
  assert out["blend"].shape == (FRAMES, H, W, 3) and out["alpha"].shape == (FRAMES, H, W, 1)
  np.testing.assert_array_equal(out["fg"], out["blend"])  # … stay identical: one window for all
  np.testing.assert_array_equal(out["bg"], out["blend"])
  centre = transforms.random_crop_resize(scene, None, height=H, width=W)
  assert not np.array_equal(out["blend"], centre["blend"])
  same = transforms.random_crop_resize(centre, np.random.default_rng(1), height=H, width=W, min_area=1.0)
  assert same is centre  # right size, no crop: untouched


def test_prompt_dropout_gives_empty_prompts():
  scene = transforms.decode(synthetic.make_scene(7, FRAMES, H, W))
  from layerflow_jax.text import ByteTextEncoder

  tok = ByteTextEncoder(max_length=32).tokenize
  dropped = transforms.drop_prompts(scene, np.random.default_rng(0), p=1.0)
  assert (transforms.tokenize_prompts(dropped, tok) == 0).all()
  kept = transforms.drop_prompts(scene, np.random.default_rng(0), p=0.0)
  np.testing.assert_array_equal(
    transforms.tokenize_prompts(kept, tok), transforms.tokenize_prompts(scene, tok)
  )
  rates = [
    sum(
      transforms.drop_prompts(scene, np.random.default_rng(s), p=0.3)[k] == "" for k in transforms.PROMPT_KEYS
    )
    for s in range(200)
  ]
  assert 0.2 < np.mean(rates) / 3 < 0.4


def test_fused_record_to_model_inputs_equals_decode_then_pack():
  from layerflow_jax.text import ByteTextEncoder

  tok = ByteTextEncoder(max_length=32).tokenize
  scene = synthetic.make_scene(8, FRAMES, H, W)
  empty = np.zeros((0, H, W, 3), np.uint8)
  for layout in ("rgba", "rgb"):
    lay = layers.get_layout(layout)
    for has_fg, has_bg in ((True, True), (False, True), (True, False), (False, False)):
      rec = {
        **scene,
        "has_fg": has_fg,
        "has_bg": has_bg,
        "fg": scene["fg"] if has_fg else empty,
        "bg": scene["bg"] if has_bg else empty,
        "motion_scale": 1.0,
      }
      fused = transforms.record_to_model_inputs(rec, layout=lay, tokenize=tok)
      ref = transforms.to_model_inputs(
        {**transforms.decode(rec), "motion_scale": 1.0}, layout=lay, tokenize=tok
      )
      assert set(fused) == set(ref)
      np.testing.assert_allclose(fused["video"], ref["video"], rtol=0, atol=1e-6)
      for k in ("tokens", "clip_valid", "motion_scale"):
        np.testing.assert_array_equal(fused[k], ref[k])


# ----------------------------------------------------------------------------- stage mixtures


def test_stage_mixtures_batch_contract_static_and_motion_scale(data):
  lay = layers.get_layout("rgba")
  for entries in (STAGE1, STAGE2, STAGE3):
    c = config_for(data, entries, random_crop=0.5, prompt_dropout=0.1)
    batch = pipeline.make_dataset(c)[0]
    assert batch["video"].shape == (4, lay.num_clips * FRAMES, H, W, 3) and batch["tokens"].shape == (
      4,
      3,
      32,
    )
    assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0
    clips = layers.unpack(batch["video"], lay.num_clips)
    for i, scale in enumerate(batch["motion_scale"]):
      static = (clips[i] == clips[i][:, :1]).all()
      assert static == (scale == 1.0), (entries, i)  # static samples: identical frames in every clip
    if entries is STAGE3:
      assert sorted(batch["motion_scale"].tolist()) == [0.0, 0.0, 1.0, 1.0]


def test_missing_background_leaves_the_loss_but_copy_paste_fills_it(data):
  c = config_for(data, STAGE1)
  valid = np.concatenate([pipeline.make_dataset(c)[i]["clip_valid"] for i in range(6)])
  assert not valid[:, 2].all() and valid[:, [0, 1, 3]].all()  # bg (clip 2) missing for every third video
  c = config_for(data, STAGE2)
  assert all(pipeline.make_dataset(c)[i]["clip_valid"].all() for i in range(6))


def test_mixture_is_deterministic_by_seed(data):
  c = config_for(data, STAGE3, random_crop=0.5, prompt_dropout=0.2)
  a, b = (
    pipeline.make_dataset(c),
    pipeline.make_dataset(config_for(data, STAGE3, random_crop=0.5, prompt_dropout=0.2)),
  )
  for i in range(5):
    assert_batches_equal(a[i], b[i])
  other = pipeline.make_dataset(config_for(data, STAGE3, random_crop=0.5, prompt_dropout=0.2, shuffle_seed=1))
  assert not np.array_equal(a[0]["video"], other[0]["video"])


def test_resume_exact_through_the_orbax_checkpoint(data, tmp_path):
  import jax
  import jax.numpy as jnp

  from layerflow_jax.train import checkpoint as ckpt_lib

  c = config_for(data, STAGE3, random_crop=0.5, prompt_dropout=0.1)
  state = {"x": jnp.arange(3.0)}
  it = pipeline.make_iterator(c)
  for _ in range(3):
    next(it)
  ck = ckpt_lib.Checkpointer(tmp_path)
  ck.save(3, state, iterator=it, meta={"step": 3})
  ck.wait()
  uninterrupted = [next(it) for _ in range(6)]  # past an epoch of the 8 training backgrounds
  ck.close()

  fresh = pipeline.make_iterator(c)
  next(fresh)  # a fresh run that has moved on elsewhere: restoring must override its position
  ck = ckpt_lib.Checkpointer(tmp_path)
  abstract = jax.eval_shape(lambda: state)
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
  restored, meta = ck.restore(3, abstract, shardings, iterator=fresh)
  ck.close()
  assert meta["step"] == 3
  for want in uninterrupted:
    assert_batches_equal(next(fresh), want)


@pytest.mark.slow
def test_resume_exact_with_worker_processes(data):
  c = config_for(data, STAGE3, random_crop=0.5)
  c.data.worker_count = 2
  it = pipeline.make_iterator(c)
  try:
    for _ in range(2):
      next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
  finally:
    it.close()
  fresh = pipeline.make_iterator(c)
  try:
    fresh.set_state(state)
    for w in want:
      assert_batches_equal(next(fresh), w)
  finally:
    fresh.close()


# ----------------------------------------------------------------------------- process blocks


@pytest.mark.parametrize("entries", [STAGE1, STAGE3], ids=["stage1", "stage3"])
def test_process_blocks_make_up_the_one_process_global_batch(data, entries):
  """Process i's rows of step j are block i of the one-process batch j, for 2 and 4 processes (in one process;
  tests/test_data_topology.py runs real JAX processes)."""
  c = config_for(data, entries, random_crop=0.5, prompt_dropout=0.1)
  whole = pipeline.make_dataset(c)
  for n in (2, 4):
    shards = [pipeline.make_dataset(c, shard_index=i, shard_count=n) for i in range(n)]
    for step in (0, 1, 7):  # step 7: past an epoch of every source
      assert all(len(s[step]["motion_scale"]) == 4 // n for s in shards)
      joined = {k: np.concatenate([s[step][k] for s in shards]) for k in whole[step]}
      assert_batches_equal(joined, whole[step])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_dataset(c, shard_count=3)


# ----------------------------------------------------------------------------- latent cache


@pytest.fixture(scope="module")
def cache(data):
  """``layerflow data cache`` of the layered videos; returns (raw config, cached config)."""
  from layerflow_jax import cli

  tmp, roots = data
  c = config_for(data, STAGE1)
  c.data.name = "layerflow_folder"
  args = (
    [
      "data",
      "cache",
      "--config",
      "configs/default.py",
      "--name",
      "layerflow_folder",
      "--data_dir",
      c.data.data_dir,
      "--cache_dir",
      c.data.cache_dir,
    ]
    + [
      f"--config.data.{k}={c.data[k]}"
      for k in ("frames", "height", "width", "num_validation", "batch_size", "background_frames")
    ]
    + [f"--config.data.manual_dirs.layerflow_folder={roots['layerflow_folder']}"]
  )
  assert cli.main(args) == 0
  cached = config_for(data, STAGE1, cached=True)
  cached.data.name = "layerflow_folder"
  return c, cached


def test_latent_cache_equals_the_encoders_and_is_read_by_config(cache):
  from layerflow_jax.train.experiment import Experiment

  c, cached_cfg = cache
  exp = Experiment(c)
  raw = pipeline.to_model_inputs(pipeline.layer_dataset(c, "train", shuffle=False), c)
  source = pipeline.load_source(c.data, "train")
  raw_by_id = {source[i]["id"].decode(): raw[i] for i in range(len(source))}
  store = pipeline.load_source(cached_cfg.data, "train", cached_cfg)
  assert len(store) == NUM_VIDEOS - 2
  for i in range(len(store)):
    rec = store[i]
    want = raw_by_id[rec["id"].decode()]
    np.testing.assert_allclose(rec["latents"], exp.encode_video(want["video"][None])[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rec["text"], exp.encode_text(want["tokens"][None])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rec["clip_valid"], want["clip_valid"])
  # Training reads the cache by config: latents and embeddings in place of pixels and tokens.
  t, h, w, ch = exp.latent_shape  # per clip
  batch = next(pipeline.make_iterator(cached_cfg))
  assert set(batch) == {"latents", "text", "clip_valid", "motion_scale"}
  assert batch["latents"].shape == (4, 4 * t, h, w, ch) and batch["text"].shape == (4, 3 * 32, 64)
  with pytest.raises(ValueError, match="needs pixels"):
    pipeline.make_dataset(
      config_for(data=(pathlib.Path(c.data.data_dir).parent, {}), entries=STAGE2, cached=True)
    )


@pytest.mark.slow
def test_cached_batches_give_the_train_step_the_same_loss(cache):
  import jax

  from layerflow_jax.train import step as step_lib
  from layerflow_jax.train.experiment import Experiment

  c, cached_cfg = cache
  exp = Experiment(c)
  params = exp.full_params(exp.init_state())
  tasks = jax.numpy.zeros((2,), "int32")
  loss = jax.jit(
    lambda b: step_lib.diffusion_loss(exp, params, b, jax.random.key(0), train=False, task_ids=tasks)[0]
  )
  raw_ids = [r["id"] for r in pipeline.load_source(c.data, "validation")]
  cached_ids = [r["id"] for r in pipeline.load_source(cached_cfg.data, "validation", cached_cfg)]
  order = [cached_ids.index(i) for i in raw_ids]  # the cache stores records in its own order
  cached_batch = {k: v[order] for k, v in pipeline.make_dataset(cached_cfg, "validation")[0].items()}
  raw_batch = pipeline.make_dataset(c, "validation")[0]
  np.testing.assert_allclose(float(loss(cached_batch)), float(loss(raw_batch)), rtol=1e-5)
