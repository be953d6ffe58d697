"""Periodic samples (``train.sample_every``): files under WORKDIR/samples and images + animations in TensorBoard."""

import pathlib
import struct

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from layerflow_jax import cli
from layerflow_jax.config import load_config
from layerflow_jax.train import previews, trainer

TINY = [
  "data.frames=4",
  "data.height=16",
  "data.width=16",
  "data.num_train=16",
  "data.num_validation=8",
  "data.batch_size=8",
  "train.log_every=1",
  "train.warmup_steps=1",
  "sampling.num_steps=2",
  "eval.num_batches=0",
  "train.checkpoint_every=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  flags = [f"--config.data.data_dir={d}"] + [f"--config.{o}" for o in TINY]
  assert cli.main(["data", "build", "layerflow_synthetic", "--config", "configs/default.py"] + flags) == 0
  return d


def _tb_images(logdir: pathlib.Path) -> dict[tuple[str, int], bytes]:
  """(tag, step) → encoded image of every image summary in the TensorBoard event files (TFRecord framing)."""
  out = {}
  for f in logdir.glob("events.out.tfevents.*"):
    data, i = f.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = Event.FromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("image"):
          out[(v.tag, event.step)] = v.image.encoded_image_string
  return out


def test_trained_tasks_follow_the_weights():
  c = load_config("configs/default.py", ["diffusion.task_weights.fg2bg=0"])
  assert previews.trained_tasks(c) == ("generate", "decompose", "bg2fg")
  c = load_config(
    "configs/default.py",
    [
      "diffusion.task_weights.decompose=0",
      "diffusion.curriculum_steps=5",
      "diffusion.curriculum_weights.generate=0",
    ],
  )
  assert previews.trained_tasks(c) == (
    "generate",
    "decompose",
    "fg2bg",
    "bg2fg",
  )  # decompose: the curriculum's


def test_sample_every_writes_previews_of_every_trained_task(data_dir, tmp_path):
  work = tmp_path / "run"
  config = load_config(
    "configs/default.py:size=tiny",
    [f"data.data_dir='{data_dir}'"]
    + TINY
    + ["train.steps=3", "train.sample_every=2", "diffusion.task_weights.fg2bg=0"],
  )
  trainer.train(config, work, progress=False)
  assert sorted(p.name for p in (work / "samples").iterdir()) == ["step_2"]  # steps 2 (not 1, not 3)
  step = work / "samples" / "step_2"
  assert sorted(p.name for p in step.iterdir()) == ["bg2fg", "decompose", "generate"]  # fg2bg is not trained
  for task in ("bg2fg", "decompose", "generate"):
    files = {p.name for p in (step / task).iterdir()}
    assert {"preview.png", "fg_rgba", "alpha.mp4", "bg.mp4", "blend.mp4"} <= files, files
    assert (step / task / "fg_rgba" / "0000.png").stat().st_size > 0
  images = _tb_images(work / "tb")
  for task in ("bg2fg", "decompose", "generate"):
    assert images[(f"samples/{task}", 2)].startswith(b"\x89PNG")
    assert images[(f"samples/{task}/video", 2)].startswith(b"GIF8")
  assert not any(tag.startswith("samples/fg2bg") for tag, _ in images)


def test_previews_use_the_current_weights(data_dir, tmp_path):
  """Two steps with sample_every=1: the same seed and clip, so the previews differ only by the weights (the
  warm-up step has lr 0, the second step moves them)."""
  work = tmp_path / "run"
  config = load_config(
    "configs/default.py:size=tiny",
    [f"data.data_dir='{data_dir}'"]
    + TINY
    + [
      "train.steps=2",
      "train.sample_every=1",
      "diffusion.task_weights.fg2bg=0",
      "diffusion.task_weights.bg2fg=0",
      "diffusion.task_weights.decompose=0",
    ],
  )
  trainer.train(config, work, progress=False)
  import imageio.v3 as iio

  first, second = (iio.imread(work / "samples" / f"step_{s}" / "generate" / "preview.png") for s in (1, 2))
  assert first.shape == second.shape and not np.array_equal(first, second)
