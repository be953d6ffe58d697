"""Dataset name → TFDS builder module (``layerflow data build NAME`` / ``layerflow data import NAME``).

Every module defines ``NAME``, ``make_builder(data_cfg)``, ``build(data_cfg)`` and ``load_source(data_cfg, split)``.
"""

from __future__ import annotations

import importlib

BUILDERS = {
  "layerflow_synthetic": "data_pipelines.layerflow_synthetic",  # generated layered videos
  # the same builder's quality-gap kinds (data_pipelines/synthetic.py: KINDS)
  "layerflow_synthetic_lowq": "data_pipelines.layerflow_synthetic",  # stage 1: annotation artifacts
  "layerflow_synthetic_images": "data_pipelines.layerflow_synthetic",  # stage 3: high-quality layered images
  "layerflow_synthetic_copypaste": "data_pipelines.layerflow_synthetic",  # stage 2/3: copy-paste videos
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


def build_all(config) -> list[str]:
  """Builds every dataset a config reads: ``data.name``, each mixture entry's source and background, and with
  ``eval.multistage`` the held-out sets of ``eval.image_data`` / ``eval.video_data`` (each once)."""
  names = [config.data.name]
  for e in config.data.get("mixture", []) or []:
    names += [e.get("name", config.data.name)] + ([e["background"]] if e.get("background") else [])
  return [build(_named(config, n)) for n in dict.fromkeys(names + _eval_names(config))]


def build_eval(config) -> list[str]:
  """The multistage evaluation's held-out sets (``eval.image_data``, ``eval.video_data``) when it is on."""
  return [build(_named(config, n)) for n in dict.fromkeys(_eval_names(config))]


def _eval_names(config) -> list[str]:
  ev = config.get("eval", {})
  return [ev.image_data, ev.video_data] if ev.get("multistage", False) else []


def _named(config, name: str):
  d = config.data.copy_and_resolve_references()
  d.name = name
  return d
