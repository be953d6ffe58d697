"""``layerflow data import`` (a folder the user brings → TFDS) and ``layerflow data cache`` (latents + embeddings).

  layerflow data import layerflow_folder --manual_dir /data/layered --data_dir data/tfds \\
      --config configs/default.py --config.data.height=480 --config.data.width=720 --config.data.frames=16
  layerflow data import layerflow_images --manual_dir /data/mulan --data_dir data/tfds --config …
  layerflow data import layerflow_videos --manual_dir /data/backgrounds --data_dir data/tfds --config …
  layerflow data cache --config configs/default.py --data_dir data/tfds --cache_dir data/latents
  layerflow train --config configs/default.py --config.data.cached=True …   # reads the cache

The CLI imports this module for its parser on every command, so the dataset modules (TFDS, Grain, jax) are
imported inside the two commands that use them, not at the top.
"""

from __future__ import annotations

import argparse
import json

from data_pipelines import registry
from layerflow_jax.config import load_config


def _load(args, overrides):
  config = load_config(args.config, overrides)
  if getattr(args, "data_dir", None):
    config.data.data_dir = args.data_dir
  return config


# ----------------------------------------------------------------------------- import


def add_import_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("name", help="layerflow_folder | layerflow_images | layerflow_videos")
  p.add_argument(
    "--manual_dir",
    "--manual-dir",
    dest="manual_dir",
    default=None,
    help="the folder to import (default: data.manual_dirs.NAME of the config)",
  )
  p.add_argument("--config", default="configs/default.py", help="configs/FILE.py[:ARG] (sizes from data.*)")
  p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None, help="TFDS data_dir to write")
  p.add_argument(
    "--max_bad_fraction",
    "--max-bad-fraction",
    dest="max_bad_fraction",
    type=float,
    default=None,
    help="skipped records allowed before the import stops (default data.max_bad_fraction)",
  )


def run_import(args, overrides) -> int:
  from data_pipelines import importing  # TFDS and Pillow: only for this command (module docstring)

  if args.name not in registry.MANUAL:
    raise SystemExit(
      f"error: {args.name!r} does not import a folder; expected one of {registry.MANUAL} "
      f"(generated datasets: `layerflow data build NAME`)"
    )
  config = _load(args, overrides)
  config.data.name = args.name
  if args.manual_dir:
    config.data.manual_dirs[args.name] = args.manual_dir
  if args.max_bad_fraction is not None:
    config.data.max_bad_fraction = float(args.max_bad_fraction)
  try:
    builder = registry.module(args.name).build(config.data)
  except (importing.LayoutError, importing.TooManyBadRecords) as e:
    raise SystemExit(f"error: {e}") from None
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  skipped = {k: len(v) for k, v in (builder.info.metadata or {}).get("skipped", {}).items()}
  print(
    json.dumps(
      {
        "dataset": f"{args.name}/{builder.builder_config.name}",
        "data_dir": str(builder.data_dir),
        "examples": splits,
        "skipped": skipped,
      },
      indent=2,
    )
  )
  return 0


# ----------------------------------------------------------------------------- cache


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--config", default="configs/default.py", help="configs/FILE.py[:ARG]: dataset, codec, text encoder"
  )
  p.add_argument("--name", default=None, help="dataset to cache (default data.name)")
  p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None, help="where the dataset is built")
  p.add_argument(
    "--cache_dir",
    "--cache-dir",
    dest="cache_dir",
    default=None,
    help="TFDS data_dir of the cache (default data.cache_dir)",
  )


def run_cache(args, overrides) -> int:
  from data_pipelines import layerflow_latents  # TFDS and jax: only for this command (module docstring)

  config = _load(args, overrides)
  config.data.cached = False
  if args.name:
    config.data.name = args.name
  if args.cache_dir:
    config.data.cache_dir = args.cache_dir
  builder = layerflow_latents.build(config)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(
    json.dumps(
      {
        "cache": f"{layerflow_latents.NAME}/{builder.builder_config.name}",
        "data_dir": str(builder.data_dir),
        "examples": splits,
        "train with": "--config.data.cached=True"
        + (f" --config.data.cache_dir={args.cache_dir}" if args.cache_dir else ""),
      },
      indent=2,
    )
  )
  return 0


DATA_COMMANDS = {
  "import": (
    "import a folder (official layered-video layout, layered images, plain videos) as TFDS",
    add_import_arguments,
    run_import,
  ),
  "cache": (
    "encode a dataset once (autoencoder + text encoder) into a TFDS latent cache",
    add_cache_arguments,
    run_cache,
  ),
}
