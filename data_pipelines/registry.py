"""Dataset name → TFDS builder module (``layerflow data build NAME``)."""

from __future__ import annotations

import importlib

BUILDERS = {"layerflow_synthetic": "data_pipelines.layerflow_synthetic"}


def module(name: str):
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  return importlib.import_module(BUILDERS[name])


def build(data_cfg) -> str:
  """Builds (or reuses) the dataset in ``data_cfg.data_dir``; returns the dataset directory."""
  builder = module(data_cfg.name).build(data_cfg)
  return str(builder.data_dir)
