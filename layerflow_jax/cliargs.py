"""Typed, range-checked command-line arguments (argparse ``type=`` functions) for sample, evaluate and export.

Each refuses a bad value at parse time, before anything heavy is imported, with one line naming the flag, the
value and the allowed range (``error: layerflow sample: argument --steps: -1 is out of range; expected …``).
Zero is a value like any other: it is never read as "use the default" (leave the flag out for that).
"""

from __future__ import annotations

import argparse
import math
import pathlib

MAX_STEPS = 10_000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**32 - 1
MAX_FPS = 240


def in_range(kind: type, low, high):
  """An argparse ``type=``: ``kind`` (int or float) parsed from the text, finite and within [low, high]."""
  noun = "an integer" if kind is int else "a number"

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"{text!r} is not {noun}; expected {noun} in [{low}, {high}]"
      ) from None
    if not math.isfinite(value) or not low <= value <= high:
      raise argparse.ArgumentTypeError(f"{value} is out of range; expected {noun} in [{low}, {high}]")
    return value

  parse.__name__ = noun.split()[-1]  # argparse names the type in its messages: "integer" / "number"
  return parse


steps = in_range(int, 1, MAX_STEPS)
guidance = in_range(float, 0.0, MAX_GUIDANCE)
seed = in_range(int, 0, MAX_SEED)
fps = in_range(int, 1, MAX_FPS)
count = in_range(int, 1, 1_000_000)
index = in_range(int, 0, 1_000_000_000)


def task(text: str) -> str:
  from layerflow_jax import layers  # jax: the CLI parser imports this module, --help stays without jax

  if text not in layers.TASK_NAMES:
    raise argparse.ArgumentTypeError(f"unknown task {text!r}; expected one of {', '.join(layers.TASK_NAMES)}")
  return text


def tasks(text: str) -> tuple[str, ...]:
  names = tuple(t.strip() for t in text.split(",") if t.strip())
  if not names:
    raise argparse.ArgumentTypeError(f"{text!r} names no task; expected a comma-separated subset of tasks")
  return tuple(task(t) for t in names)


def existing(text: str) -> str:
  """A file or folder that exists (an input video, a frames folder)."""
  if not pathlib.Path(text).exists():
    raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
  return text


def checkpoint(text: str) -> str:
  """A training work dir (or its ``checkpoints/``) holding at least one finished step."""
  from layerflow_jax.train import checkpoint as ckpt_lib  # orbax and jax: as layers above

  path = pathlib.Path(text)
  if not path.exists():
    raise argparse.ArgumentTypeError(
      f"{text}: no such folder; expected a training work dir with checkpoints/"
    )
  if not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text}: not a folder; expected a training work dir with checkpoints/")
  work = path.parent if path.name == "checkpoints" else path
  if not ckpt_lib.has_checkpoints(work):
    where = work / "checkpoints"
    problem = "holds no finished checkpoint" if where.is_dir() else "does not exist"
    raise argparse.ArgumentTypeError(
      f"{where}: {problem}; expected checkpoints/<step>/ written by layerflow train"
    )
  return text


def add_overwrite(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--overwrite", action="store_true", help="replace a non-empty --out folder (default: refuse)"
  )
