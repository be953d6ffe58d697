"""Dataset name → TFDS builder module (``layerflow data build NAME`` / ``layerflow data import NAME``).

Every module defines ``NAME``, ``make_builder(data_cfg)``, ``build(data_cfg)`` and ``load_source(data_cfg, split)``.
"""

from __future__ import annotations

import importlib

BUILDERS = {
    "layerflow_synthetic": "data_pipelines.layerflow_synthetic",  # generated layered videos
    "layerflow_folder": "data_pipelines.layerflow_folder",  # layered videos, official layout
    "layerflow_images": "data_pipelines.layerflow_images",  # layered images, official image schema
    "layerflow_videos": "data_pipelines.layerflow_videos",  # plain captioned videos (copy-paste backgrounds)
}
# Builders that import a folder the user brings (``data.manual_dirs.NAME``).
MANUAL = ("layerflow_folder", "layerflow_images", "layerflow_videos")


def module(name: str):
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  return importlib.import_module(BUILDERS[name])


def build(data_cfg) -> str:
  """Builds (or reuses) the dataset in ``data_cfg.data_dir``; returns the dataset directory."""
  builder = module(data_cfg.name).build(data_cfg)
  return str(builder.data_dir)


def load_source(data_cfg, split: str):
  """Random-access source of ``split`` of the dataset ``data_cfg.name`` (``len`` and ``[i]`` → dict)."""
  return module(data_cfg.name).load_source(data_cfg, split)
