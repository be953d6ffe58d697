"""Metrics to JSONL and TensorBoard, written by process 0 only."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Mapping

import imageio.v3 as iio
import jax
import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        # tensorboardX imports torch where it is installed (2.5 s): only with TensorBoard on
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  def write(self, step: int, metrics: Mapping, prefix: str = "") -> dict:
    row = {"step": int(step), "time": time.time(), **{prefix + k: _scalar(v) for k, v in metrics.items()}}
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(row) + "\n")
      if self._tb is not None:
        for k, v in row.items():
          if k not in ("step", "time") and isinstance(v, (int, float)):
            self._tb.add_scalar(k, v, int(step))
    return row

  def image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, image_hwc_uint8, int(step), dataformats="HWC")

  def video(self, step: int, name: str, frames_thwc_uint8: np.ndarray, fps: float = 8.0) -> None:
    """An animation in TensorBoard's image dashboard (an animated GIF, as ``add_video`` writes, without moviepy)."""
    if not (self.enabled and self._tb is not None):
      return
    from tensorboardX.proto.summary_pb2 import Summary  # as SummaryWriter above  # pyright: ignore[reportAttributeAccessIssue]  (generated protobuf)

    frames = np.asarray(frames_thwc_uint8, np.uint8)
    gif = iio.imwrite("<bytes>", frames, extension=".gif", plugin="pillow", duration=1000.0 / fps, loop=0)
    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif)
    self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
