"""TFDS builder ``layerflow_images``: layered images (RGBA foreground, background, composite, three prompts).

The official image schema (``data.manual_dirs.layerflow_images`` = ROOT; every ``ROOT/*.json`` is a split named
after it, as for :mod:`data_pipelines.layerflow_folder`)::

  {ID: {"prompt_fg": str, "prompt_bg": str, "prompt": str,
        "images": "composite.png", "images_bg": "bg.png", "images_fg": "fg_rgba.png"}}

Paths are relative to the JSON file (or absolute); a value may also be a one-element list. ``images_fg`` must
carry an alpha channel (the matte). Without ``images_bg`` the background is marked missing (``has_bg`` False);
without ``images`` the composite is computed from fg, alpha and bg; without both the record is bad.
Records are stored as one-frame clips of the layered-record schema (``importing.layered_features``), so the
pipeline repeats them into static clips (stage 3's layered images, motion scale 1).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import import_builder, importing
from data_pipelines.importing import BadRecord, LayoutError

NAME = "layerflow_images"


@dataclasses.dataclass(eq=False)
class LayerflowImagesConfig(tfds.core.BuilderConfig):
  height: int = 480
  width: int = 720
  resize: str = "crop"
  num_validation: int = 0
  max_bad_fraction: float = 0.05
  threads: int = 4


def make_config(
  height: int = 480,
  width: int = 720,
  resize: str = "crop",
  num_validation: int = 0,
  max_bad_fraction: float = 0.05,
  threads: int = 4,
) -> LayerflowImagesConfig:
  if resize not in importing.RESIZE_MODES:
    raise ValueError(f"resize {resize!r} unknown; expected one of {importing.RESIZE_MODES}")
  return LayerflowImagesConfig(
    name=f"h{height}_w{width}_{resize}_v{num_validation}",
    description="layered images",
    height=int(height),
    width=int(width),
    resize=resize,
    num_validation=int(num_validation),
    max_bad_fraction=float(max_bad_fraction),
    threads=int(threads),
  )


def _path(base: pathlib.Path, value: Any, key: str, where: str) -> pathlib.Path | None:
  if value is None or value == "" or value == []:
    return None
  if isinstance(value, list):
    if len(value) != 1 or not isinstance(value[0], str):
      raise BadRecord(f"{where}: {key!r} must be a path or a one-element list of paths, got {value!r}")
    value = value[0]
  if not isinstance(value, str):
    raise BadRecord(f"{where}: {key!r} must be a path, got {type(value).__name__}")
  p = pathlib.Path(value)
  return p if p.is_absolute() else base / p


def _read(path: pathlib.Path, mode: str) -> np.ndarray:
  if not path.is_file():
    raise BadRecord(f"{path}: no such file")
  return importing.read_image(path, mode)


def load_image(meta_file: pathlib.Path, key: str, entry: Any, c: LayerflowImagesConfig) -> dict[str, Any]:
  where = f"{meta_file} [{key!r}]"
  if not isinstance(entry, dict):
    raise BadRecord(f"{where}: expected an object, got {type(entry).__name__}")
  prompts = {}
  for ours, theirs in (("fg_prompt", "prompt_fg"), ("bg_prompt", "prompt_bg"), ("blend_prompt", "prompt")):
    v = entry.get(theirs)
    if not isinstance(v, str) or not v.strip():
      raise BadRecord(f"{where}: {theirs!r} is missing or empty")
    prompts[ours] = importing.text(v.strip(), f"{where}: {theirs!r}")
  base = meta_file.parent
  paths = {k: _path(base, entry.get(k), k, where) for k in ("images", "images_bg", "images_fg")}
  if paths["images_fg"] is None:
    raise BadRecord(f"{where}: 'images_fg' (the RGBA foreground) is missing")
  rgba = _read(paths["images_fg"], "RGBA")
  size = rgba.shape[:2]
  others = {}
  for k in ("images", "images_bg"):
    if paths[k] is not None:
      img = _read(paths[k], "RGB")
      if img.shape[:2] != size:
        raise BadRecord(
          f"{paths[k]}: wrong size {img.shape[1]}x{img.shape[0]} (WxH); the foreground "
          f"{paths['images_fg']} is {size[1]}x{size[0]}"
        )
      others[k] = img
  if "images" not in others and "images_bg" not in others:
    raise BadRecord(f"{where}: neither 'images' (composite) nor 'images_bg' is given")
  fit = lambda x: importing.resize(x[None], c.height, c.width, mode=c.resize)
  fg, alpha = fit(rgba[..., :3]), fit(rgba[..., 3:])
  bg = fit(others["images_bg"]) if "images_bg" in others else importing.empty_frames(c.height, c.width)
  if "images" in others:
    blend = fit(others["images"])
  else:  # composite from the resized layers: blend = α·fg + (1 − α)·bg
    a = alpha.astype(np.float32) / 255.0
    blend = np.clip(np.rint(a * fg + (1.0 - a) * bg), 0, 255).astype(np.uint8)
  return {
    "id": key,
    "fg": fg,
    "alpha": alpha,
    "bg": bg,
    "blend": blend,
    "has_fg": True,
    "has_bg": "images_bg" in others,
    **prompts,
  }


def read_layout(
  root: pathlib.Path, num_validation: int = 0
) -> dict[str, list[tuple[pathlib.Path, str, Any]]]:
  if not root.is_dir():
    raise LayoutError(f"{root}: no such folder (the layered-image root: data.manual_dirs.{NAME})")
  metas = sorted(root.glob("*.json"))
  if not metas:
    raise LayoutError(f"{root}: no meta JSON file (expected ROOT/<split>.json with {{ID: {{prompt_fg, …}}}})")
  splits: dict[str, list] = {}
  for meta in metas:
    data = importing.read_json(meta)
    if not isinstance(data, dict) or not data:
      raise LayoutError(
        f"{meta}: expected a non-empty object ID → {{prompt_fg, prompt_bg, prompt, images, "
        f"images_bg, images_fg}}, got {type(data).__name__}"
      )
    split = importing.split_name(meta)
    if split in splits:
      raise LayoutError(f"{meta}: a second meta file for split {split!r}")
    splits[split] = [(meta, str(k), v) for k, v in sorted(data.items())]
  return importing.hold_out_validation(
    splits, num_validation, root, "images", "add a validation meta file or lower data.num_validation"
  )


class LayerflowImages(import_builder.ManualImportBuilder):
  """Layered images as one-frame layered records."""

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
      features=importing.layered_features(1, c.height, c.width),
      metadata=tfds.core.MetadataDict(),
    )

  def read_layout(self, root: pathlib.Path) -> dict[str, list]:
    return read_layout(root, self.builder_config.num_validation)

  def load_item(self, root: pathlib.Path, item) -> dict[str, Any]:
    meta, key, entry = item
    return load_image(meta, key, entry, self.builder_config)


def make_builder(data_cfg) -> LayerflowImages:
  config = make_config(
    data_cfg.height,
    data_cfg.width,
    data_cfg.get("resize", "crop"),
    data_cfg.get("num_validation", 0),
    data_cfg.get("max_bad_fraction", 0.05),
  )
  return importing.make_array_record_builder(LayerflowImages, config, data_cfg.data_dir)


def build(data_cfg) -> LayerflowImages:
  """Imports ``data.manual_dirs.layerflow_images`` into ``data.data_dir`` (a no-op when already built)."""
  return make_builder(data_cfg).prepare(data_cfg)


def load_source(data_cfg, split: str):
  return make_builder(data_cfg).source(split)
