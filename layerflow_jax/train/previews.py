"""Periodic samples during training (``train.sample_every``; 0 = off).

Every ``sample_every`` steps the current weights (the EMA where the run keeps one) sample every task the config
trains (a positive weight in ``diffusion.task_weights``, or in ``diffusion.curriculum_weights`` while a curriculum
runs) on the first validation clip with a fixed seed, so previews of successive steps differ only by the weights.
The sampling settings are the config's (``config.sampling``: steps, guidance, sampler; adapters removed as
``sampling.remove_adapters`` says). They go to

* TensorBoard: ``samples/<task>`` (the preview grid: frames × fg, alpha, bg, blend, recomposite) and
  ``samples/<task>/video`` (the same columns side by side as an animation);
* ``WORKDIR/samples/step_<N>/<task>/``: the files ``layerflow sample`` writes (``media.write_layers``: RGBA PNG
  frames, the layers as MP4 or GIF, ``preview.png``).

The sampler (:class:`~layerflow_jax.sampling.LayeredSampler`, the one ``layerflow sample`` uses) compiles once, at
the first preview; later previews load the new weights into it.
"""

from __future__ import annotations

import logging
import pathlib

import imageio.v3 as iio
import jax
import numpy as np

from layerflow_jax import evaluate, layers, media
from layerflow_jax.sampling import LayeredSampler
from layerflow_jax.train.experiment import Experiment
from layerflow_jax.train.hooks import Hook
from layerflow_jax.train.logging import MetricWriter

log = logging.getLogger(__name__)

SEED = 0  # the same noise at every preview
VIDEO_MIN_CELL = 64  # pixels per layer in the TensorBoard animation (nearest upscale)


def trained_tasks(config) -> tuple[str, ...]:
  """The tasks the config trains, in :data:`layers.TASK_NAMES` order."""
  weights = [dict(config.diffusion.task_weights)]
  if int(config.diffusion.curriculum_steps) > 0:
    weights.append(dict(config.diffusion.curriculum_weights))
  return tuple(t for t in layers.TASK_NAMES if any(float(w.get(t, 0.0)) > 0 for w in weights))


def preview_clip(config) -> dict:
  """The first validation clip (the first training clip when the split is empty): ``tokens``, ``video``."""
  for split in ("validation", "train"):
    try:
      return evaluate.eval_batches(config, split, num_batches=1, batch_size=1)[0]
    except ValueError:  # the split has no examples
      continue
  raise ValueError(f"{config.data.name} has no clip to sample previews for")


def strip(sample: dict) -> np.ndarray:
  """uint8 [T, H, W·columns, 3]: :func:`media.preview_columns` side by side, upscaled to VIDEO_MIN_CELL."""
  columns = media.preview_columns(sample)
  frames = np.concatenate([clip for _, clip in columns], axis=2)
  scale = max(1, -(-VIDEO_MIN_CELL // min(frames.shape[1:3])))
  return media.to_uint8(frames.repeat(scale, axis=1).repeat(scale, axis=2))


class SampleHook(Hook):
  """Renders previews after the steps that are multiples of ``train.sample_every``."""

  def __init__(self, exp: Experiment, writer: MetricWriter, workdir: str | pathlib.Path):
    self.exp, self.writer, self.root = exp, writer, pathlib.Path(workdir) / "samples"
    self.every = int(exp.config.train.sample_every)
    self.tasks = trained_tasks(exp.config)
    self._sampler: LayeredSampler | None = None
    self._clip: dict | None = None
    if self.every and jax.process_count() > 1:
      log.warning(
        "train.sample_every=%d: periodic samples are rendered by single-process runs only; "
        "this run has %d processes and renders none",
        self.every,
        jax.process_count(),
      )
      self.every = 0

  def after_step(self, step: int, state) -> None:
    self.render(step, self.exp.full_params(state))

  def render(self, step: int, params: dict) -> dict[str, dict]:
    """Samples every trained task with ``params``; returns task → the files written."""
    if self._sampler is None:
      self._sampler = LayeredSampler(self.exp.config, params, mesh=self.exp.mesh)
      self._clip = preview_clip(self.exp.config)
    else:
      self._sampler.load(params)
    sampler, clip = self._sampler, self._clip
    assert clip is not None  # set with the sampler above
    out = {}
    for task in self.tasks:
      video = sampler.sample(clip["tokens"], task, given_video=clip["video"], seed=SEED)
      sample = sampler.split_layers(video)[0]
      if not self.writer.enabled:
        continue
      files = media.write_layers(self.root / f"step_{step}" / task, sample)
      self.writer.image(step, f"samples/{task}", iio.imread(files["preview"])[..., :3])
      self.writer.video(step, f"samples/{task}/video", strip(sample))
      out[task] = files
    self.writer.flush()
    return out
