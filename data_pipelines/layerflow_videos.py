"""TFDS builder ``layerflow_videos``: plain videos (mp4 and friends) with captions, the copy-paste backgrounds.

``data.manual_dirs.layerflow_videos`` = ROOT holds video files (``.mp4 .mov .avi .mkv .webm .m4v .gif .webp``,
searched recursively) and their captions: ``ROOT/prompts.json`` (``{relative path or file stem: caption}``) or a
``NAME.txt`` beside each video. Each video becomes one record ``{id, video uint8 [frames, H, W, 3], prompt}``:
``frames`` evenly spaced over the first ``frame_window`` frames (0 = the whole video), centre-cropped and
resized. Unreadable or too short videos and videos without a caption are skipped, counted and logged. Everything
is split ``train``; ``num_validation`` > 0 holds the last ones out as ``validation``.

Decoding uses imageio (its ffmpeg plugin, ``imageio-ffmpeg``; GIF/WebP through Pillow).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import imageio.v3 as iio
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import import_builder, importing
from data_pipelines.importing import BadRecord, LayoutError

NAME = "layerflow_videos"


@dataclasses.dataclass(eq=False)
class LayerflowVideosConfig(tfds.core.BuilderConfig):
  height: int = 480
  width: int = 720
  frames: int = 16
  frame_window: int = 0
  resize: str = "crop"
  num_validation: int = 0
  max_bad_fraction: float = 0.05
  threads: int = 2


def make_config(
  height: int = 480,
  width: int = 720,
  frames: int = 16,
  frame_window: int = 0,
  resize: str = "crop",
  num_validation: int = 0,
  max_bad_fraction: float = 0.05,
  threads: int = 2,
) -> LayerflowVideosConfig:
  if resize not in importing.RESIZE_MODES:
    raise ValueError(f"resize {resize!r} unknown; expected one of {importing.RESIZE_MODES}")
  return LayerflowVideosConfig(
    name=f"h{height}_w{width}_f{frames}_win{frame_window}_{resize}_v{num_validation}",
    description="plain videos",
    height=int(height),
    width=int(width),
    frames=int(frames),
    frame_window=int(frame_window),
    resize=resize,
    num_validation=int(num_validation),
    max_bad_fraction=float(max_bad_fraction),
    threads=int(threads),
  )


def read_frames(path: pathlib.Path) -> np.ndarray:
  """All frames of a video file as uint8 [T, H, W, 3]; BadRecord naming the file when it cannot be decoded."""
  try:
    frames = [np.asarray(f) for f in iio.imiter(path)]
  except Exception as e:  # noqa: BLE001 — decoders raise many types
    raise BadRecord(
      f"{path}: unreadable video ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from None
  if not frames:
    raise BadRecord(f"{path}: no frames")
  out = []
  for i, f in enumerate(frames):
    if f.ndim == 2:
      f = f[..., None]
    if f.ndim != 3 or f.shape[:2] != frames[0].shape[:2]:
      raise BadRecord(f"{path}: frame {i} has shape {f.shape}, frame 0 {frames[0].shape}")
    out.append(np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f[..., :3])
  return np.stack(out).astype(np.uint8)


def read_layout(
  root: pathlib.Path, num_validation: int = 0
) -> dict[str, list[tuple[pathlib.Path, str, str | None]]]:
  if not root.is_dir():
    raise LayoutError(f"{root}: no such folder (the plain-video root: data.manual_dirs.{NAME})")
  files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in importing.VIDEO_EXTS)
  if not files:
    raise LayoutError(f"{root}: no video files (expected one of {', '.join(importing.VIDEO_EXTS)})")
  table = {}
  if (root / "prompts.json").is_file():
    table = importing.read_json(root / "prompts.json")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
      raise LayoutError(f"{root / 'prompts.json'}: expected an object {{video path or stem: caption}}")
  items = []
  for p in files:
    rel = p.relative_to(root).as_posix()
    prompt = table.get(rel, table.get(p.stem))
    txt = p.with_suffix(".txt")
    if prompt is None and txt.is_file():
      prompt = txt.read_bytes().decode("utf-8", errors="surrogateescape").strip()  # checked per record
    items.append((p, rel, prompt))
  return importing.hold_out_validation({"train": items}, num_validation, root, "videos")


def load_video(path: pathlib.Path, key: str, prompt: str | None, c: LayerflowVideosConfig) -> dict[str, Any]:
  if not prompt or not prompt.strip():
    raise BadRecord(f"{path}: no caption (add it to prompts.json or {path.with_suffix('.txt').name})")
  prompt = importing.text(prompt, f"{path}: caption")
  video = read_frames(path)
  try:
    idx = importing.evenly_spaced(len(video), c.frames, c.frame_window)
  except BadRecord as e:
    raise BadRecord(f"{path}: {e}") from None
  return {
    "id": key,
    "video": importing.resize(video[idx], c.height, c.width, mode=c.resize),
    "prompt": prompt.strip(),
  }


class LayerflowVideos(import_builder.ManualImportBuilder):
  """Plain captioned videos (backgrounds for copy-paste synthesis)."""

  NAME = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [make_config()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      metadata=tfds.core.MetadataDict(),
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "video": tfds.features.Tensor(
            shape=(c.frames, c.height, c.width, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
          ),
          "prompt": tfds.features.Text(),
        }
      ),
    )

  def read_layout(self, root: pathlib.Path) -> dict[str, list]:
    return read_layout(root, self.builder_config.num_validation)

  def load_item(self, root: pathlib.Path, item) -> dict[str, Any]:
    path, key, prompt = item
    return load_video(path, key, prompt, self.builder_config)


def make_builder(data_cfg) -> LayerflowVideos:
  config = make_config(
    data_cfg.height,
    data_cfg.width,
    data_cfg.background_frames or data_cfg.frames,
    data_cfg.get("frame_window", 0),
    data_cfg.get("resize", "crop"),
    data_cfg.get("num_validation", 0),
    data_cfg.get("max_bad_fraction", 0.05),
  )
  return importing.make_array_record_builder(LayerflowVideos, config, data_cfg.data_dir)


def build(data_cfg) -> LayerflowVideos:
  """Imports ``data.manual_dirs.layerflow_videos`` into ``data.data_dir`` (a no-op when already built)."""
  return make_builder(data_cfg).prepare(data_cfg)


def load_source(data_cfg, split: str):
  return make_builder(data_cfg).source(split)
