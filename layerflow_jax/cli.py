"""``layerflow`` command line: train, train-stages, sample, evaluate, data, export, sweep, compile, demo.

Config overrides follow ml_collections style: ``--config configs/default.py:size=tiny --config.train.steps=100``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pathlib
import sys
from typing import Sequence

# Light modules only (the standard library and ml_collections): ``layerflow --help`` and the parser import no jax,
# TensorFlow or numpy; each command imports what it runs inside its function.
from data_pipelines import registry
from layerflow_jax import cliargs, errors, outputs, platform
from layerflow_jax.config import apply_overrides, load_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` from the other arguments."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config.") :]
      if "=" in body:
        overrides.append(body)
      else:
        if i + 1 >= len(argv):
          raise SystemExit(f"error: {a} needs a value")
        overrides.append(f"{body}={argv[i + 1]}")
        i += 1
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _load(spec: str, overrides: Sequence[str]):
  return load_config(spec, overrides)


def _print(obj) -> None:
  print(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------- commands


def cmd_train(args, overrides) -> int:
  from layerflow_jax.train import trainer  # jax: commands import what they run (CLI start-up)

  config = _load(args.config, overrides)
  summary = trainer.train(config, args.workdir, stop_after=args.stop_after, progress=not args.no_progress)
  _print({k: v for k, v in summary.items() if k != "last"})
  return 0


def cmd_train_stages(args, overrides) -> int:
  from layerflow_jax import stages  # jax (CLI start-up)

  results = stages.train_stages(
    args.config, args.workdir, overrides, progress=not args.no_progress, only=args.only
  )
  _print(results)
  return 0


def cmd_data_build(args, overrides) -> int:
  config = _load(args.config, overrides)
  if args.data_dir:
    config.data.data_dir = args.data_dir
  if args.name != config.data.name:
    config.data.name = args.name
  path = registry.build(config.data)
  print(f"built {args.name} in {path}")
  return 0


def _prompts_required(args, num_prompts: int = 3):
  missing = [n for n in ("fg_prompt", "bg_prompt", "blend_prompt")[:num_prompts] if not getattr(args, n)]
  if missing:
    flags = ", ".join("--" + m.replace("_", "-") for m in missing)
    raise SystemExit(f"error: prompts missing for layer(s): {flags} (every layer needs a prompt)")


def cmd_sample(args, overrides) -> int:
  # numpy and jax (CLI start-up)
  import numpy as np

  from layerflow_jax import layers, media
  from layerflow_jax.sampling import LayeredSampler
  from layerflow_jax.train import trainer

  try:
    layers.check_task(args.task)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  outputs.check_destination(args.out, overwrite=args.overwrite)
  params, config, used = trainer.load_checkpoint(args.checkpoint)
  print(f"checkpoint: {used['used']}")
  apply_overrides(config, overrides)
  sampler = LayeredSampler(config, params, keep_adapters=("motion",) if args.keep_motion_adapter else ())
  d = config.data
  layout = sampler.layout
  n, t = layout.num_clips, d.frames
  given = np.zeros((1, n * t, d.height, d.width, 3), np.float32)

  def put(clip: str, video: np.typing.ArrayLike):
    i = layout.index(clip)
    given[0, i * t : (i + 1) * t] = video

  if args.from_validation is not None:
    from data_pipelines import pipeline  # Grain, TFDS and jax (CLI start-up)

    ds = pipeline.layer_dataset(config, "validation")
    ds = pipeline.to_model_inputs(ds, config)
    ex = ds[int(args.from_validation)]
    assert ex is not None  # grain gives None only for filtered-out elements; these datasets are only mapped
    given[0] = ex["video"]
    tokens = ex["tokens"][None]
  else:
    _prompts_required(args, sampler.exp.model_cfg.num_prompts)  # the official decomposition models take 2
    tokens = sampler.tokenize(args.fg_prompt, args.bg_prompt, args.blend_prompt)
    read = lambda p: media.read_video(p, frames=t, height=d.height, width=d.width)
    needs = {
      "decompose": ["video"],
      "fg2bg": ["fg_video"] + (["alpha_video"] if layout.has_alpha else []),
      "bg2fg": ["bg_video"],
      "generate": [],
    }[args.task]
    missing = [f"--{k.replace('_', '-')}" for k in needs if not getattr(args, k)]
    if missing:
      raise SystemExit(f"error: task {args.task!r} needs {', '.join(missing)}")
    try:
      if args.video:
        put(layers.BLEND, read(args.video))
      if args.bg_video:
        put(layers.BG, read(args.bg_video))
      if args.fg_video:
        fg = read(args.fg_video)
        if layout.has_alpha:
          alpha = layers.clip_to_alpha(read(args.alpha_video))
          put(layers.ALPHA, layers.alpha_to_clip(alpha))
          fg = layers.premultiply(fg, alpha)
        put(layers.FG, fg)
    except (ValueError, FileNotFoundError) as e:
      raise SystemExit(f"error: {e}") from None
  video = sampler.sample(
    tokens, args.task, given_video=given, seed=args.seed, num_steps=args.steps, guidance_scale=args.guidance
  )
  with outputs.staged(args.out, overwrite=args.overwrite) as tmp:
    written = outputs.relocate(
      media.write_layers(tmp, sampler.split_layers(video)[0], fps=args.fps),
      tmp,
      pathlib.Path(args.out).absolute(),
    )
  print(f"task {args.task}: wrote {len(written)} outputs to {args.out} (step {used['step']})")
  for k, v in written.items():
    print(f"  {k}: {v}")
  return 0


def cmd_evaluate(args, overrides) -> int:
  # jax (CLI start-up)
  from layerflow_jax import evaluate as eval_lib
  from layerflow_jax.sampling import LayeredSampler
  from layerflow_jax.train import trainer

  outputs.check_destination(args.out, overwrite=args.overwrite)
  params, config, used = trainer.load_checkpoint(args.checkpoint)
  print(f"checkpoint: {used['used']}")
  if args.config:  # the evaluation's data and sampling settings; the model stays the checkpoint's
    other = _load(args.config, ())
    for section in ("data", "sampling", "eval"):
      if section in other:
        config[section] = other[section]
  apply_overrides(config, overrides)
  tasks = args.tasks
  sampler = LayeredSampler(config, params)
  try:  # an unknown --split or an empty one is bad input (exit 2), like an unknown task
    batches = eval_lib.eval_batches(config, args.split, num_batches=args.num_batches)
    result, previews = eval_lib.evaluate(
      sampler,
      batches,
      num_steps=args.steps,
      guidance_scale=args.guidance,
      **({"tasks": tasks} if tasks else {}),
    )
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if config.eval.multistage:
    registry.build_eval(config)
    result.update(
      eval_lib.multistage_metrics(
        config, params, num_batches=args.num_batches, num_steps=args.steps, guidance_scale=args.guidance
      )
    )
  result["checkpoint_step"] = used["step"]
  with outputs.staged(args.out, overwrite=args.overwrite) as tmp:
    paths = outputs.relocate(
      eval_lib.write_report(
        tmp, result, previews, title=f"{args.checkpoint} (step {used['step']}) on {args.split}"
      ),
      tmp,
      pathlib.Path(args.out).absolute(),
    )
  print(eval_lib.markdown_table({"value": result}))
  for k, v in paths.items():
    print(f"{k}: {v}")
  return 0


def cmd_demo(args, overrides) -> int:
  from layerflow_jax import demo  # jax (CLI start-up)

  return demo.run(args.workdir, overrides, config_spec=args.config)


# ----------------------------------------------------------------------------- commands in other modules

# Modules that add their own subcommands. Each defines ``COMMANDS = {name: (help, add_arguments, run)}`` where
# ``add_arguments(parser)`` declares the flags and ``run(args, overrides) -> int`` does the work; it may also define
# ``DATA_COMMANDS`` (the same shape) for ``layerflow data NAME``. Such modules import nothing heavy at module level.
COMMAND_MODULES = (
  "layerflow_jax.export.commands",  # import-diffusers, export
  "layerflow_jax.sweep",  # sweep, sweep-report
  "layerflow_jax.aot",  # compile
  "data_pipelines.commands",  # data cache, data build-folder …
)


def _command_modules():
  for name in COMMAND_MODULES:
    yield importlib.import_module(name)


def _add_module_commands(sub, table) -> None:
  for name, (help_text, add_arguments, run) in table.items():
    p = sub.add_parser(name, help=help_text)
    add_arguments(p)
    p.set_defaults(fn=run)


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
  """argparse with the CLI's one-line error format (``error: …``, exit 2) instead of a usage block."""

  def error(self, message):
    print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
  doc = __doc__ or "layerflow"  # python -OO strips docstrings
  p = _Parser(prog="layerflow", description=doc.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train one stage from a config (auto-resumes from --workdir)")
  t.add_argument("--config", required=True, help="configs/FILE.py[:ARG]")
  t.add_argument("--workdir", required=True)
  t.add_argument("--stop-after", type=int, default=None, help="stop after this many more steps (for tests)")
  t.add_argument("--no-progress", action="store_true")
  t.set_defaults(fn=cmd_train)

  s = sub.add_parser("train-stages", help="run stage 1 → 2 → 3, each from the previous one's parameters")
  s.add_argument("--config", default="configs/stages.py", help="a stages config file[:ARG]")
  s.add_argument("--workdir", required=True)
  s.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
  s.add_argument("--no-progress", action="store_true")
  s.set_defaults(fn=cmd_train_stages)

  sm = sub.add_parser("sample", help="sample a task with a trained checkpoint")
  sm.add_argument("--checkpoint", required=True, type=cliargs.checkpoint, help="a work dir with checkpoints/")
  sm.add_argument("--task", required=True, type=cliargs.task, help="generate | decompose | fg2bg | bg2fg")
  sm.add_argument("--fg-prompt")
  sm.add_argument("--bg-prompt")
  sm.add_argument("--blend-prompt")
  sm.add_argument(
    "--video", type=cliargs.existing, help="decompose: the blended video (mp4/gif/webp or a folder of frames)"
  )
  sm.add_argument("--fg-video", type=cliargs.existing, help="fg2bg: the straight-colour foreground video")
  sm.add_argument("--alpha-video", type=cliargs.existing, help="fg2bg: the matte video (grayscale)")
  sm.add_argument("--bg-video", type=cliargs.existing, help="bg2fg: the background video")
  sm.add_argument(
    "--from-validation",
    type=cliargs.index,
    default=None,
    help="take prompts and given clips from validation example N instead",
  )
  sm.add_argument("--out", required=True)
  cliargs.add_overwrite(sm)
  sm.add_argument("--steps", type=cliargs.steps, default=None, help="sampling steps (default: the config's)")
  sm.add_argument("--guidance", type=cliargs.guidance, default=None, help="CFG scale (default: the config's)")
  sm.add_argument("--seed", type=cliargs.seed, default=0)
  sm.add_argument("--fps", type=cliargs.fps, default=8)
  sm.add_argument("--keep-motion-adapter", action="store_true", help="do not remove the motion LoRA")
  sm.set_defaults(fn=cmd_sample)

  e = sub.add_parser("evaluate", help="layer metrics of a checkpoint on held-out clips (JSON, Markdown, PNG)")
  e.add_argument("--checkpoint", required=True, type=cliargs.checkpoint)
  e.add_argument("--config", default=None, help="take data/sampling/eval settings from this config[:ARG]")
  e.add_argument("--split", default="validation")
  e.add_argument("--out", required=True)
  cliargs.add_overwrite(e)
  e.add_argument(
    "--tasks",
    type=cliargs.tasks,
    default=None,
    help="comma-separated subset of generate,decompose,fg2bg,bg2fg",
  )
  e.add_argument("--num-batches", type=cliargs.count, default=None, help="default: the whole split")
  e.add_argument("--steps", type=cliargs.steps, default=None, help="sampling steps (default: the config's)")
  e.add_argument("--guidance", type=cliargs.guidance, default=None, help="CFG scale (default: the config's)")
  e.set_defaults(fn=cmd_evaluate)

  d = sub.add_parser("data", help="datasets")
  dsub = d.add_subparsers(dest="data_command", required=True)
  b = dsub.add_parser("build", help="build a TFDS dataset (array_record)")
  b.add_argument("name", help="layerflow_synthetic")
  b.add_argument("--config", default="configs/default.py")
  b.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None)
  b.set_defaults(fn=cmd_data_build)

  for module in _command_modules():
    _add_module_commands(sub, getattr(module, "COMMANDS", {}))
    _add_module_commands(dsub, getattr(module, "DATA_COMMANDS", {}))

  dm = sub.add_parser("demo", help="the whole path on a tiny config: data, three stages, samples, table")
  dm.add_argument("--workdir", default="demo_out")
  dm.add_argument("--config", default="configs/stages.py:demo")
  dm.set_defaults(fn=cmd_demo)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command. Errors a user can cause print one line ``error: …`` (exit 2: bad input, 1: a failed
  run; see :mod:`layerflow_jax.errors`); ``LAYERFLOW_DEBUG=1`` lets them raise with the full traceback
  instead."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    platform.skip_absent_tpu()  # libtpu installed on a host without TPU chips: no TPU init error at start-up
    logging.basicConfig(
      level=logging.INFO if os.environ.get("LAYERFLOW_VERBOSE") else logging.WARNING,
      format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.fn(args, overrides) or 0)
  except SystemExit as e:  # argparse's refusal (already printed) or a command's ``SystemExit("error: …")``
    if e.code == errors.BAD_INPUT:
      return errors.BAD_INPUT
    if isinstance(e.code, str) and e.code.startswith("error: ") and not errors.debug():
      print(e.code.splitlines()[0], file=sys.stderr)
      return errors.BAD_INPUT
    raise
  except BaseException as e:
    described = None if errors.debug() else errors.describe(e)
    if described is None:
      raise
    code, line = described
    print(f"error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(main())
