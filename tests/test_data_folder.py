"""Importing user data: the official layered-video layout, layered images, plain videos; malformed layouts and
corrupt records; ``layerflow data import``."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import numpy as np
import pytest

from configs import default
from data_pipelines import (
  importing,
  layerflow_folder,
  layerflow_images,
  layerflow_videos,
  layout_writer,
  pipeline,
  synthetic,
  transforms,
)
from layerflow_jax import layers

SRC_FRAMES, FRAMES, H, W = 10, 5, 16, 24
# Evenly spaced over the whole clip, as the paper samples.
PICKED = np.round(np.linspace(0, SRC_FRAMES - 1, FRAMES)).astype(int)


def scenes(n: int, frames: int = SRC_FRAMES, h: int = H, w: int = W, offset: int = 0) -> list[dict]:
  return [synthetic.make_scene(1000 + offset + i, frames, h, w) for i in range(n)]


def data_config(tmp: pathlib.Path, **manual) -> object:
  c = default.get_config()
  c.data.data_dir = str(tmp / "tfds")
  c.data.frames, c.data.height, c.data.width = FRAMES, H, W
  c.data.num_validation, c.data.batch_size = 1, 2
  for name, path in manual.items():
    c.data.manual_dirs[name] = str(path)
  return c


def by_id(source) -> dict:
  return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}


# ----------------------------------------------------------------------------- layered videos (official layout)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """6 train videos: 0 has fg and bg, 1 has neither, 2 only fg, the rest only bg; plus a validation meta."""
  tmp = tmp_path_factory.mktemp("folder")
  root = tmp / "layered"
  sc = scenes(7)
  entries = {}
  for i, s in enumerate(sc[:6]):
    entries[f"clip{i}"] = layout_writer.write_layered_video(
      root, f"clip{i}", s, fg=i in (0, 2), bg=i != 1 and i != 2
    )
  layout_writer.write_meta(root / "train_meta.json", entries)
  layout_writer.write_meta(
    root / "val.json", {"held": layout_writer.write_layered_video(root, "held", sc[6])}
  )
  c = data_config(tmp, layerflow_folder=root)
  c.data.name = "layerflow_folder"
  builder = layerflow_folder.build(c.data)
  return c, builder, sc


def test_folder_builds_and_reads_back_exact_values(folder):
  c, builder, sc = folder
  assert builder.info.splits["train"].num_examples == 6
  assert builder.info.splits["validation"].num_examples == 1  # val.json → "validation"
  assert builder.info.metadata["skipped"] == {"train": {}, "validation": {}}
  train = by_id(layerflow_folder.load_source(c.data, "train"))
  for i in range(6):
    r, s = train[f"clip{i}"], sc[i]
    np.testing.assert_array_equal(r["blend"], s["blend"][PICKED])  # PNG is lossless: exact
    np.testing.assert_array_equal(r["alpha"], s["alpha"][PICKED])
    assert bool(r["has_fg"]) == (i in (0, 2)) and bool(r["has_bg"]) == (i not in (1, 2))
    if r["has_fg"]:
      np.testing.assert_array_equal(r["fg"], s["fg"][PICKED])
    else:
      assert r["fg"].shape[0] == 0  # not stored: derived as bl × mask downstream
    if r["has_bg"]:
      np.testing.assert_array_equal(r["bg"], s["bg"][PICKED])
    assert r["fg_prompt"].decode() == s["fg_prompt"] and r["blend_prompt"].decode() == s["blend_prompt"]
  held = by_id(layerflow_folder.load_source(c.data, "validation"))["held"]
  np.testing.assert_array_equal(held["bg"], sc[6]["bg"][PICKED])


def test_folder_missing_fg_is_bl_times_mask_and_missing_bg_leaves_the_loss(folder):
  c, _, sc = folder
  source = layerflow_folder.load_source(c.data, "train")
  index = {source[i]["id"].decode(): i for i in range(len(source))}
  ds = pipeline.to_model_inputs(pipeline.layer_dataset(c, "train", shuffle=False), c)
  lay = layers.get_layout(c.layout)
  ex = ds[index["clip1"]]  # neither fg nor bg
  clips = layers.unpack(ex["video"][None], lay.num_clips)[0]
  bl = transforms.normalize_rgb(sc[1]["blend"][PICKED])
  a = transforms.normalize_alpha(sc[1]["alpha"][PICKED])
  np.testing.assert_allclose(clips[lay.index(layers.FG)], bl * a, atol=1e-6)  # official: fg = bl × mask
  np.testing.assert_allclose(clips[lay.index(layers.BLEND)], bl, atol=1e-6)
  assert ex["clip_valid"].tolist() == [name != layers.BG for name in lay.clips]
  assert ds[index["clip0"]]["clip_valid"].all()


def test_folder_resizes_and_samples_a_window(tmp_path):
  root = tmp_path / "layered"
  big = scenes(2, frames=12, h=32, w=64)  # 2:1 source, 2:3 target → centre crop of width 48
  layout_writer.write_layered_videos(root, big)
  c = data_config(tmp_path, layerflow_folder=root)
  c.data.num_validation, c.data.frame_window = 0, 6
  layerflow_folder.build(c.data)
  r = by_id(layerflow_folder.load_source(c.data, "train"))["video_0000"]
  assert r["blend"].shape == (FRAMES, H, W, 3) and r["alpha"].shape == (FRAMES, H, W, 1)
  idx = np.round(np.linspace(0, 5, FRAMES)).astype(int)  # evenly spaced over the first 6 frames
  want = importing.resize(big[0]["blend"][idx], H, W)
  np.testing.assert_array_equal(r["blend"], want)
  # The crop is centred: a resize of the window of columns 8..56 of the source.
  from PIL import Image

  ref = np.asarray(Image.fromarray(big[0]["blend"][idx[2]]).resize((W, H), Image.BICUBIC, box=(8, 0, 56, 32)))
  np.testing.assert_array_equal(r["blend"][2], ref)


@pytest.mark.parametrize("case", ["no_meta", "bad_json", "no_videos_key", "missing_root"])
def test_folder_malformed_layout_names_the_file(tmp_path, case):
  root = tmp_path / "layered"
  layout_writer.write_layered_videos(root, scenes(2))
  meta = root / "train.json"
  if case == "no_meta":
    meta.unlink()
    match = f"{root}: no meta JSON"
  elif case == "bad_json":
    meta.write_text("{not json")
    match = f"{meta}: not readable JSON"
  elif case == "no_videos_key":
    meta.write_text(json.dumps({"clips": {}}))
    match = f'{meta}: expected an object with a "videos" object'
  else:
    shutil.rmtree(root)
    match = f"{root}: no such folder"
  c = data_config(tmp_path, layerflow_folder=root)
  with pytest.raises(importing.LayoutError, match=match.replace("(", r"\(").replace("[", r"\[")):
    layerflow_folder.build(c.data)


def _corrupt_folder(root: pathlib.Path) -> dict[str, str]:
  """10 videos, 4 of them bad in different ways; returns id → a fragment of the expected reason."""
  layout_writer.write_layered_videos(root, scenes(10))
  (root / "video_0001" / "bl" / "0004.png").write_bytes(b"not a png")  # a sampled frame (PICKED)
  shutil.rmtree(root / "video_0003" / "mask")
  (root / "video_0005" / "mask" / "0009.png").unlink()
  from PIL import Image

  Image.new("RGB", (W + 4, H)).save(root / "video_0007" / "bl" / "0002.png")
  return {
    "video_0001": "0004.png: unreadable image",
    "video_0003": "mask: missing",
    "video_0005": "frame counts differ between layers (bl 10, mask 9",
    "video_0007": "0002.png: wrong size 28x16",
  }


def test_corrupt_records_are_skipped_counted_and_logged(tmp_path, caplog):
  root = tmp_path / "layered"
  bad = _corrupt_folder(root)
  c = data_config(tmp_path, layerflow_folder=root)
  c.data.num_validation, c.data.max_bad_fraction = 0, 0.5
  with caplog.at_level(logging.WARNING, logger="data_pipelines.importing"):
    builder = layerflow_folder.build(c.data)
  assert builder.info.splits["train"].num_examples == 6
  skipped = builder.info.metadata["skipped"]["train"]
  assert sorted(skipped) == sorted(bad)
  for key, fragment in bad.items():
    assert fragment in skipped[key], (key, skipped[key])
    assert any(key in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
  ids = set(by_id(layerflow_folder.load_source(c.data, "train")))
  assert ids == {f"video_{i:04d}" for i in range(10)} - set(bad)


def test_too_many_corrupt_records_stop_the_import(tmp_path):
  root = tmp_path / "layered"
  _corrupt_folder(root)
  c = data_config(tmp_path, layerflow_folder=root)
  c.data.num_validation, c.data.max_bad_fraction = 0, 0.2
  with pytest.raises(Exception, match=r"records are bad, more than max_bad_fraction=0.2") as info:
    layerflow_folder.build(c.data)
  assert "video_0001" in str(info.value)
  assert not layerflow_folder.make_builder(c.data).is_prepared()


# ----------------------------------------------------------------------------- layered images


def test_layered_images_build_with_missing_background_and_bad_records(tmp_path):
  root = tmp_path / "images"
  sc = scenes(4, frames=1)
  layout_writer.write_layered_images(root, sc)
  meta = json.loads((root / "train.json").read_text())
  meta["image_0001"]["images_bg"] = ""  # background missing → has_bg False
  from PIL import Image

  Image.fromarray(sc[3]["fg"][0]).save(root / "fg" / "image_0003.png")  # RGB: no alpha → bad record
  (root / "train.json").write_text(json.dumps(meta))
  c = data_config(tmp_path, layerflow_images=root)
  c.data.num_validation, c.data.max_bad_fraction = 0, 0.3
  builder = layerflow_images.build(c.data)
  assert list(builder.info.metadata["skipped"]["train"]) == ["image_0003"]
  assert "has no alpha channel" in builder.info.metadata["skipped"]["train"]["image_0003"]
  recs = by_id(layerflow_images.load_source(c.data, "train"))
  assert sorted(recs) == ["image_0000", "image_0001", "image_0002"]
  r, s = recs["image_0000"], sc[0]
  for key in ("fg", "alpha", "bg", "blend"):
    np.testing.assert_array_equal(r[key], s[key])  # one-frame records, exact
  assert r["blend_prompt"].decode() == s["blend_prompt"] and bool(r["has_bg"])
  assert not recs["image_0001"]["has_bg"] and recs["image_0001"]["bg"].shape[0] == 0
  # Fitted to a clip: the image is repeated over data.frames (a static clip).
  fitted = transforms.fit_record(r, frames=FRAMES, height=H, width=W)
  assert fitted["blend"].shape == (FRAMES, H, W, 3) and (fitted["blend"] == r["blend"][0]).all()


# ----------------------------------------------------------------------------- plain videos


def test_plain_videos_build_and_skip_unreadable(tmp_path):
  root = tmp_path / "videos"
  sc = scenes(3)
  layout_writer.write_plain_videos(root, [s["bg"] for s in sc], [s["bg_prompt"] for s in sc])
  (root / "broken.mp4").write_bytes(b"\x00" * 64)
  (root / "broken.txt").write_text("a caption for a file that is no video")
  c = data_config(tmp_path, layerflow_videos=root)
  c.data.num_validation, c.data.max_bad_fraction = 0, 0.5
  builder = layerflow_videos.build(c.data)
  skipped = builder.info.metadata["skipped"]["train"]
  assert list(skipped) == ["broken.mp4"] and "unreadable video" in skipped["broken.mp4"]
  recs = by_id(layerflow_videos.load_source(c.data, "train"))
  assert sorted(recs) == [f"clip_{i:04d}.mp4" for i in range(3)]
  for i, s in enumerate(sc):
    r = recs[f"clip_{i:04d}.mp4"]
    assert r["video"].shape == (FRAMES, H, W, 3) and r["prompt"].decode() == s["bg_prompt"]
    err = np.abs(r["video"].astype(float) - s["bg"][PICKED]).mean()
    assert err < 4.0, err  # H.264 at crf 12, 4:4:4: near-lossless


# ----------------------------------------------------------------------------- command line


def test_cli_import_reports_examples_and_skips(tmp_path, capsys):
  from layerflow_jax import cli

  root = tmp_path / "layered"
  _corrupt_folder(root)
  args = [
    "data",
    "import",
    "layerflow_folder",
    "--manual_dir",
    str(root),
    "--data_dir",
    str(tmp_path / "tfds"),
    "--max_bad_fraction",
    "0.5",
    "--config.data.frames=5",
    "--config.data.height=16",
    "--config.data.width=24",
    "--config.data.num_validation=2",
  ]
  assert cli.main(args) == 0
  text = capsys.readouterr().out
  out = json.loads(text[text.index("{\n") :])  # after TFDS's progress lines
  # The last 2 listed (good) videos are held out; 4 of the other 8 are bad.
  assert out["examples"] == {"train": 4, "validation": 2}
  assert out["skipped"] == {"train": 4, "validation": 0}
  assert (
    cli.main(
      [
        "data",
        "import",
        "layerflow_folder",
        "--manual_dir",
        str(tmp_path),
        "--data_dir",
        str(tmp_path / "tfds2"),
      ]
    )
    == 2
  )  # bad input: one line, exit 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "no meta JSON" in err and "\n" not in err
