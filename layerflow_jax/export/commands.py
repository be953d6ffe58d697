"""``layerflow import-diffusers`` and ``layerflow export`` (PyTorch interop; see :mod:`.convert`).

Nothing heavy is imported here at module level (the CLI imports this module for every command): the converters,
which import jax, are imported inside the commands.
"""

from __future__ import annotations

import json
import pathlib
import sys

from layerflow_jax import cliargs, outputs
from layerflow_jax.config import load_config, split_spec

DEFAULT_BASE_CONFIG = "configs/default.py"


def _print(obj) -> None:
  print(json.dumps(obj, indent=2, default=str))


def _fail(e: Exception | str) -> int:
  print(f"error: {e}", file=sys.stderr)
  return 2


def _config_spec(spec: str) -> str:
  """A config spec relative to the current directory, else to the repository root of this package."""
  path, arg = split_spec(spec)
  if not pathlib.Path(path).is_file():
    repo = pathlib.Path(__file__).resolve().parents[2] / path
    if repo.is_file():
      path = str(repo)
  return path if arg is None else f"{path}:{arg}"


# ----------------------------------------------------------------------------- import-diffusers


def add_import_arguments(p) -> None:
  p.add_argument(
    "src", help="a diffusers CogVideoXTransformer3DModel folder (config.json + safetensors, sharded or not)"
  )
  p.add_argument("--out", required=True, help="the work dir to create (OUT/checkpoints/0)")
  p.add_argument(
    "--overwrite", action="store_true", help="replace a non-empty --out folder (default: refuse)"
  )
  p.add_argument(
    "--config",
    default=DEFAULT_BASE_CONFIG,
    help="base config whose data, encoders, layout and LayerFlow options are kept (model sizes come "
    "from config.json); configs/FILE.py[:ARG]",
  )


def run_import(args, overrides) -> int:
  from layerflow_jax.export import convert, diffusers_folder  # jax: the CLI imports this module on --help

  base = load_config(_config_spec(args.config), overrides)
  out = pathlib.Path(args.out).absolute()
  try:
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
      raise convert.ExportError(f"{args.out} already holds checkpoints; import into a new directory")
    with outputs.staged(out, overwrite=args.overwrite) as tmp:
      summary = outputs.relocate(convert.import_diffusers(args.src, tmp, base), tmp, out)
  except (convert.ExportError, diffusers_folder.FolderError, ValueError, FileNotFoundError) as e:
    return _fail(e)
  _print(summary)
  return 0


# ----------------------------------------------------------------------------- import-official


def add_import_official_arguments(p) -> None:
  p.add_argument(
    "src",
    help="an official LayerFlow SAT variant folder (latest + <iteration>/"
    "mp_rank_00_model_states.pt) or the .pt file",
  )
  p.add_argument("--out", required=True, help="the work dir to create (OUT/checkpoints/0)")
  p.add_argument(
    "--variant",
    default=None,
    help="gen_rgba, seg_rgba, fg2bg_rgba, bg2fg_rgba, gen_rgb, seg_rgb, "
    "fg2bg_rgb or bg2fg_rgb (default: detected from the keys and shapes)",
  )
  p.add_argument(
    "--pipeline",
    default="",
    help="a diffusers CogVideoX-2b pipeline folder: its text_encoder/ "
    "(T5) and vae/ are used for sampling (default: byte text encoder, latents-only codec)",
  )
  p.add_argument("--config", default=DEFAULT_BASE_CONFIG, help="base config whose other settings are kept")
  p.add_argument(
    "--overwrite", action="store_true", help="replace a non-empty --out folder (default: refuse)"
  )


def run_import_official(args, overrides) -> int:
  from layerflow_jax.export import official  # jax (CLI start-up)

  base = load_config(_config_spec(args.config), overrides)
  out = pathlib.Path(args.out).absolute()
  try:
    with outputs.staged(out, overwrite=args.overwrite) as tmp:  # a failed import leaves --out as it was
      summary = outputs.relocate(
        official.import_official(args.src, tmp, base, variant=args.variant, pipeline=args.pipeline), tmp, out
      )
  except (official.OfficialImportError, ValueError, FileNotFoundError) as e:
    return _fail(str(e).splitlines()[0] if str(e) else e)
  print(f"variant {summary['variant']} ({summary['network']}), decided by:", file=sys.stderr)
  for reason in summary["decided_by"]:
    print(f"  {reason}", file=sys.stderr)
  _print(summary)
  return 0


# ----------------------------------------------------------------------------- export


def add_export_arguments(p) -> None:
  p.add_argument(
    "--checkpoint",
    required=True,
    type=cliargs.checkpoint,
    help="a work dir with checkpoints/ (the newest readable step is exported; the step is printed)",
  )
  p.add_argument("--out", required=True, help="the diffusers folder to write")
  cliargs.add_overwrite(p)
  p.add_argument(
    "--merge-lora",
    action="store_true",
    help="fold the adapters kept at sampling into the base weights (at their sampling scale); "
    "adapters removed at sampling are still written as separate files",
  )
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default=None,
    help="cast every exported tensor (default: each parameter's own dtype)",
  )
  p.add_argument(
    "--max-shard-size",
    default="5GB",
    help="shard the weights above this size (e.g. 5GB, 200MB, or bytes), with an index file",
  )


def run_export(args, overrides) -> int:
  from layerflow_jax.export import convert  # jax (CLI start-up)

  size = int(args.max_shard_size) if str(args.max_shard_size).isdigit() else args.max_shard_size
  out = pathlib.Path(args.out).absolute()
  try:
    with outputs.staged(out, overwrite=args.overwrite) as tmp:  # a failed export leaves --out as it was
      summary = outputs.relocate(
        convert.export_checkpoint(
          args.checkpoint,
          tmp,
          overrides=overrides,
          merge_lora=args.merge_lora,
          dtype=args.dtype,
          max_shard_size=size,
        ),
        tmp,
        out,
      )
  except (convert.ExportError, ValueError, FileNotFoundError) as e:
    return _fail(str(e).splitlines()[0] if isinstance(e, convert.ExportError) else e)
  print(f"checkpoint: {summary['checkpoint']['used']}", file=sys.stderr)
  _print(summary)
  return 0


COMMANDS = {
  "import-diffusers": (
    "diffusers CogVideoX transformer folder → a LayerFlow checkpoint work dir",
    add_import_arguments,
    run_import,
  ),
  "import-official": (
    "an official LayerFlow SAT checkpoint (8 variants) → a LayerFlow checkpoint work dir",
    add_import_official_arguments,
    run_import_official,
  ),
  "export": (
    "checkpoint → diffusers folder + PEFT LoRA files + LayerFlow extras",
    add_export_arguments,
    run_export,
  ),
}
