"""Writes synthetic scenes in the official layouts (layered videos, layered images, plain videos).

Used by the tests and the throughput benchmark to produce data exactly as a user would bring it, and handy for
checking an import end to end: ``write_layered_videos(root, scenes)`` then ``layerflow data import``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import imageio.v3 as iio
import numpy as np
from PIL import Image


def _save(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def write_layered_video(
  root: pathlib.Path, name: str, scene: dict[str, Any], *, fg: bool = True, bg: bool = True, ext: str = ".png"
) -> dict[str, Any]:
  """Frames of ``scene`` (uint8 ``blend``, ``alpha``, ``fg``, ``bg``) under ``root/name/{bl,mask,fg,bg}``;
  returns the video's meta entry."""
  root = pathlib.Path(root)
  t = scene["blend"].shape[0]
  frames = [f"{i:04d}" for i in range(t)]
  layers = {"bl": scene["blend"], "mask": scene["alpha"]}
  if fg:
    layers["fg"] = scene["fg"]
  if bg:
    layers["bg"] = scene["bg"]
  for key, video in layers.items():
    for i, frame in enumerate(frames):
      _save(root / name / key / f"{frame}{'.png' if key == 'mask' else ext}", video[i])
  return {
    "objects": {"1": {"frames": frames}},
    "fg_prompt": scene["fg_prompt"],
    "bg_prompt": scene["bg_prompt"],
    "bl_prompt": scene["blend_prompt"],
    "max_id": "1",
  }


def write_meta(path: pathlib.Path, entries: dict[str, dict]) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"videos": entries}, indent=1))
  return path


def write_layered_videos(
  root: pathlib.Path, scenes: Sequence[dict], split: str = "train", **kwargs
) -> pathlib.Path:
  entries = {
    f"video_{i:04d}": write_layered_video(root, f"video_{i:04d}", s, **kwargs) for i, s in enumerate(scenes)
  }
  return write_meta(pathlib.Path(root) / f"{split}.json", entries)


def write_layered_images(
  root: pathlib.Path, scenes: Sequence[dict], *, frame: int = 0, meta_name: str = "train.json"
) -> pathlib.Path:
  """Frame ``frame`` of each scene as an RGBA foreground, a background and a composite, with the official image
  schema ``{id: {prompt_fg, prompt_bg, prompt, images, images_bg, images_fg}}`` (paths relative to ``root``)."""
  root = pathlib.Path(root)
  meta = {}
  for i, s in enumerate(scenes):
    key = f"image_{i:04d}"
    _save(root / "images" / f"{key}.png", s["blend"][frame])
    _save(root / "bg" / f"{key}.png", s["bg"][frame])
    _save(root / "fg" / f"{key}.png", np.concatenate([s["fg"][frame], s["alpha"][frame]], axis=-1))
    meta[key] = {
      "prompt_fg": s["fg_prompt"],
      "prompt_bg": s["bg_prompt"],
      "prompt": s["blend_prompt"],
      "images": f"images/{key}.png",
      "images_bg": f"bg/{key}.png",
      "images_fg": f"fg/{key}.png",
    }
  path = root / meta_name
  path.write_text(json.dumps(meta, indent=1))
  return path


def write_plain_videos(
  root: pathlib.Path, videos: Sequence[np.ndarray], prompts: Sequence[str], *, fps: int = 8, ext: str = ".mp4"
) -> pathlib.Path:
  """uint8 [T, H, W, 3] videos as ``root/clip_NNNN.mp4`` (imageio) plus ``root/prompts.json``."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  table = {}
  for i, (video, prompt) in enumerate(zip(videos, prompts)):
    name = f"clip_{i:04d}{ext}"
    if ext == ".mp4":
      iio.imwrite(
        root / name,
        video,
        fps=fps,
        codec="libx264",
        macro_block_size=1,
        pixelformat="yuv444p",
        output_params=["-crf", "12"],
        ffmpeg_log_level="error",
      )
    else:
      iio.imwrite(root / name, video, duration=1000 / fps, loop=0)
    table[name] = prompt
  (root / "prompts.json").write_text(json.dumps(table, indent=1))
  return root
