"""TFDS builder ``layerflow_folder``: layered videos in the official LayerFlow layout (a folder the user brings).

Layout (``data.manual_dirs.layerflow_folder`` = ROOT)::

  ROOT/<split>.json   {"videos": {NAME: {"objects": {"1": {"frames": ["0000", …]}}, "fg_prompt": …,
                                         "bg_prompt": …, "bl_prompt": …, "max_id": "1"}}}
  ROOT/NAME/bl/0000.png …     blended RGB (required)
  ROOT/NAME/mask/0000.png …   8-bit grayscale alpha (required)
  ROOT/NAME/fg/0000.png …     foreground RGB (optional: without it fg = bl, premultiplied by the mask downstream,
                              i.e. bl × mask as the official loader does)
  ROOT/NAME/bg/0000.png …     background RGB (optional: without it ``has_bg`` is False and the bg clip is left out
                              of the loss through ``clip_valid``)

Every meta JSON file is a split named after it (``train.json``/``train_meta.json`` → ``train``, ``val*.json`` →
``validation``); without a validation file the last ``num_validation`` videos of ``train`` are held out as
``validation``. Frames are PNG or JPG; ``frames`` of them are taken evenly spaced over the first ``frame_window``
listed frames (0 = all, as the paper samples), centre-cropped to the target aspect ratio and resized to
``height × width`` (``resize="stretch"`` skips the crop). Bad videos are skipped, counted and logged
(:mod:`data_pipelines.importing`); the skipped ids and reasons are kept in the dataset's metadata.

Build: ``layerflow data import layerflow_folder --manual_dir ROOT --data_dir data/tfds --config …``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import import_builder, importing
from data_pipelines.importing import BadRecord, LayoutError

NAME = "layerflow_folder"
LAYERS = ("bl", "mask", "fg", "bg")


@dataclasses.dataclass(eq=False)
class LayerflowFolderConfig(tfds.core.BuilderConfig):
  height: int = 480
  width: int = 720
  frames: int = 16
  frame_window: int = 0  # source frames the evenly spaced indices span (0 = all listed frames)
  resize: str = "crop"  # "crop" (centre crop to the aspect ratio, then resize) | "stretch"
  fg_premultiplied: bool = False  # fg/ frames are stored premultiplied (matted on black)
  num_validation: int = 0  # videos held out of train as "validation" when ROOT has no validation meta
  max_bad_fraction: float = 0.05  # not part of the dataset's identity (see make_config)
  threads: int = 4


def make_config(
  height: int = 480,
  width: int = 720,
  frames: int = 16,
  frame_window: int = 0,
  resize: str = "crop",
  fg_premultiplied: bool = False,
  num_validation: int = 0,
  max_bad_fraction: float = 0.05,
  threads: int = 4,
) -> LayerflowFolderConfig:
  if resize not in importing.RESIZE_MODES:
    raise ValueError(f"resize {resize!r} unknown; expected one of {importing.RESIZE_MODES}")
  name = f"h{height}_w{width}_f{frames}_win{frame_window}_{resize}_v{num_validation}" + (
    "_pm" if fg_premultiplied else ""
  )
  return LayerflowFolderConfig(
    name=name,
    description="official LayerFlow layout",
    height=int(height),
    width=int(width),
    frames=int(frames),
    frame_window=int(frame_window),
    resize=resize,
    fg_premultiplied=bool(fg_premultiplied),
    num_validation=int(num_validation),
    max_bad_fraction=float(max_bad_fraction),
    threads=int(threads),
  )


def _prompt(entry: dict, key: str, where: str) -> str:
  value = entry.get(key)
  if not isinstance(value, str) or not value.strip():
    raise BadRecord(f"{where}: {key!r} is missing or empty")
  return importing.text(value.strip(), f"{where}: {key!r}")


def _frame_names(entry: dict, bl_dir: pathlib.Path, where: str) -> list[str]:
  objects = entry.get("objects")
  if isinstance(objects, dict) and objects:
    key = "1" if "1" in objects else sorted(objects)[0]
    frames = objects[key].get("frames") if isinstance(objects[key], dict) else None
    if not isinstance(frames, list) or not frames or not all(isinstance(f, str) for f in frames):
      raise BadRecord(f"{where}: objects[{key!r}].frames must be a non-empty list of frame names")
    return frames
  return importing.list_frames(bl_dir)


def _unpremultiply(fg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  a = alpha.astype(np.float32)
  straight = np.where(a > 0, fg.astype(np.float32) * 255.0 / np.maximum(a, 1.0), 0.0)
  return np.clip(np.rint(straight), 0, 255).astype(np.uint8)


def load_video(
  root: pathlib.Path, meta_file: pathlib.Path, name: str, entry: Any, c: LayerflowFolderConfig
) -> dict[str, Any]:
  """One video of the layout → a layered record; :class:`BadRecord` naming the file when it cannot be read."""
  where = f"{meta_file} videos[{name!r}]"
  if not isinstance(entry, dict):
    raise BadRecord(f"{where}: expected an object, got {type(entry).__name__}")
  prompts = {
    "fg_prompt": _prompt(entry, "fg_prompt", where),
    "bg_prompt": _prompt(entry, "bg_prompt", where),
    "blend_prompt": _prompt(entry, "bl_prompt", where),
  }
  vdir = root / name
  if not vdir.is_dir():
    raise BadRecord(f"{vdir}: no such folder (listed in {meta_file})")
  dirs = {k: vdir / k for k in LAYERS if (vdir / k).is_dir()}
  for required in ("bl", "mask"):
    if required not in dirs:
      raise BadRecord(f"{vdir / required}: missing (every video needs bl/ and mask/)")
  counts = {k: len(importing.list_frames(d)) for k, d in dirs.items()}
  if len(set(counts.values())) > 1:
    raise BadRecord(
      f"{vdir}: frame counts differ between layers ({', '.join(f'{k} {n}' for k, n in counts.items())})"
    )
  names = _frame_names(entry, dirs["bl"], where)
  try:
    picked = [names[i] for i in importing.evenly_spaced(len(names), c.frames, c.frame_window)]
  except BadRecord as e:
    raise BadRecord(f"{vdir}: {e}") from None
  modes = {"bl": "RGB", "mask": "L", "fg": "RGB", "bg": "RGB"}
  layers: dict[str, np.ndarray] = {}
  size = None
  for key, folder in dirs.items():
    frames = []
    for frame in picked:
      path = importing.find_frame(folder, frame)
      if path is None:
        raise BadRecord(f"{folder / frame}.png: missing frame ({key}/ has no {frame!r} as PNG or JPG)")
      img = importing.read_image(path, modes[key])
      if size is None:
        size = img.shape[:2]
      elif img.shape[:2] != size:
        raise BadRecord(
          f"{path}: wrong size {img.shape[1]}x{img.shape[0]} (WxH); the video's other frames are "
          f"{size[1]}x{size[0]}"
        )
      frames.append(img)
    layers[key] = importing.resize(np.stack(frames), c.height, c.width, mode=c.resize)
  alpha = layers["mask"]
  fg = layers.get("fg")
  if fg is not None and c.fg_premultiplied:
    fg = _unpremultiply(fg, alpha)
  empty = importing.empty_frames(c.height, c.width)
  return {
    "id": name,
    "blend": layers["bl"],
    "alpha": alpha,
    "fg": empty if fg is None else fg,
    "has_fg": fg is not None,
    "bg": layers.get("bg", empty),
    "has_bg": "bg" in layers,
    **prompts,
  }


def read_layout(
  root: pathlib.Path, num_validation: int = 0
) -> dict[str, list[tuple[pathlib.Path, str, Any]]]:
  """split → [(meta file, video name, meta entry)], with clear errors for a malformed layout."""
  if not root.is_dir():
    raise LayoutError(f"{root}: no such folder (the official layout's root: data.manual_dirs.{NAME})")
  metas = sorted(root.glob("*.json"))
  if not metas:
    raise LayoutError(f'{root}: no meta JSON file (expected ROOT/<split>.json with {{"videos": {{…}}}})')
  splits: dict[str, list] = {}
  for meta in metas:
    data = importing.read_json(meta)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
      raise LayoutError(
        f'{meta}: expected an object with a "videos" object (NAME → entry), got '
        f"{type(data).__name__} with keys {sorted(data)[:5] if isinstance(data, dict) else '-'}"
      )
    split = importing.split_name(meta)
    if split in splits:
      raise LayoutError(f"{meta}: a second meta file for split {split!r}")
    splits[split] = [(meta, str(k), v) for k, v in sorted(data["videos"].items())]
  return importing.hold_out_validation(
    splits, num_validation, root, "videos", "add a validation meta file or lower data.num_validation"
  )


class LayerflowFolder(import_builder.ManualImportBuilder):
  """Layered videos (bl, mask, optional fg/bg, three prompts) from the official layout in the manual dir."""

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
      features=importing.layered_features(c.frames, c.height, c.width),
      metadata=tfds.core.MetadataDict(),
    )

  def read_layout(self, root: pathlib.Path) -> dict[str, list]:
    return read_layout(root, self.builder_config.num_validation)

  def load_item(self, root: pathlib.Path, item) -> dict[str, Any]:
    meta, name, entry = item
    return load_video(root, meta, name, entry, self.builder_config)


def config_from_data(data_cfg) -> LayerflowFolderConfig:
  return make_config(
    data_cfg.height,
    data_cfg.width,
    data_cfg.frames,
    data_cfg.get("frame_window", 0),
    data_cfg.get("resize", "crop"),
    data_cfg.get("fg_premultiplied", False),
    data_cfg.get("num_validation", 0),
    data_cfg.get("max_bad_fraction", 0.05),
  )


def make_builder(data_cfg) -> LayerflowFolder:
  config = config_from_data(data_cfg)
  return importing.make_array_record_builder(LayerflowFolder, config, data_cfg.data_dir)


def build(data_cfg) -> LayerflowFolder:
  """Imports ``data.manual_dirs.layerflow_folder`` into ``data.data_dir`` (a no-op when already built)."""
  return make_builder(data_cfg).prepare(data_cfg)


def load_source(data_cfg, split: str):
  return make_builder(data_cfg).source(split)
