"""What both sides of the benchmark share: the shapes, the model-FLOP formulas, peaks and the results file.

Imports nothing heavy (no jax, no torch): ``train_step.py`` must set ``XLA_FLAGS`` before jax is imported, and
``torch_peer.py`` must not import jax at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import statistics
import sys
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "benchmarks" / "results.jsonl"


def ensure_repo_on_path() -> None:
  """Lets ``python benchmarks/x.py`` import ``layerflow_jax`` and ``configs`` without an installed package."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark input: packed latents [B, clips·frames, h, w, c] (patch p) and P prompts × L text tokens.

  The model fields describe the transformer both sides build (JAX checks its config agrees; the peer builds it).
  """

  name: str
  num_clips: int = 4
  frames_per_clip: int = 4  # latent frames per sub-clip
  channels: int = 16
  height: int = 60  # latent rows
  width: int = 90  # latent columns
  patch: int = 2
  num_prompts: int = 3
  text_len: int = 226  # tokens per prompt
  text_dim: int = 4096  # T5-XXL width
  batch: int = 1
  num_layers: int = 30
  num_heads: int = 30
  head_dim: int = 64
  time_embed_dim: int = 512
  config_size: str = "2b"  # the configs/common.py MODEL_SIZES entry with these model fields

  @property
  def latent_frames(self) -> int:
    return self.num_clips * self.frames_per_clip

  @property
  def video_tokens(self) -> int:
    return self.latent_frames * (self.height // self.patch) * (self.width // self.patch)

  @property
  def text_tokens(self) -> int:
    return self.num_prompts * self.text_len

  @property
  def tokens(self) -> int:
    return self.video_tokens + self.text_tokens

  @property
  def hidden(self) -> int:
    return self.num_heads * self.head_dim

  def describe(self) -> str:
    return (
      f"{self.num_clips} clips x {self.frames_per_clip} frames x {self.channels} ch x {self.height}x{self.width}"
      f" (patch {self.patch}) + {self.num_prompts} x {self.text_len} text tokens (dim {self.text_dim}), "
      f"batch {self.batch}; N = {self.tokens} tokens; {self.num_layers} blocks, d = {self.hidden}"
    )


SHAPES = {
  # The shape: LayerFlow RGBA at 2B (21,600 video + 678 text tokens).
  "2b": Shape("2b"),
  # The same clips at 5B (CogVideoX-5b: 42 blocks, 48 heads; RoPE). Compiled for TPU only (tpu_aot.py).
  "5b": Shape("5b", num_layers=42, num_heads=48, head_dim=64, time_embed_dim=512, config_size="5b"),
  # CPU validation: the tiny model size (configs/common.py) on a few dozen tokens.
  "tiny": Shape(
    "tiny",
    frames_per_clip=1,
    height=8,
    width=8,
    text_len=8,
    text_dim=64,
    num_layers=2,
    num_heads=4,
    head_dim=32,
    time_embed_dim=128,
    config_size="tiny",
  ),
}


# ----------------------------------------------------------------------------- model FLOPs


def train_flops(num_layers: int, n: int, d: int, batch: int = 1) -> float:
  """The issue's model FLOPs of one training step: L · (72·N·d² + 12·N²·d) per sample (remat recompute not
  counted). Forward per block: 24·N·d² (q, k, v, out: 8; 4× MLP: 16) + 4·N²·d (QKᵀ and PV); backward: twice."""
  return float(batch) * num_layers * (72.0 * n * d * d + 12.0 * n * n * d)


def forward_flops(num_layers: int, n: int, d: int, batch: int = 1) -> float:
  """One forward pass: a third of :func:`train_flops`."""
  return float(batch) * num_layers * (24.0 * n * d * d + 4.0 * n * n * d)


def lora_flops(num_layers: int, first_trained: int, n: int, d: int, batch: int = 1) -> float:
  """Model FLOPs of a LoRA step with a frozen base: blocks before the first block holding a trained adapter run
  forward only; later blocks run forward and input gradients (no weight gradients: 48·N·d², attention 12·N²·d).
  The low-rank matmuls themselves are not counted."""
  later = num_layers - first_trained
  per_later = 48.0 * n * d * d + 12.0 * n * n * d
  return float(batch) * (forward_flops(first_trained, n, d) + later * per_later)


# Dense bf16 tensor-core peaks (datasheet, FLOP/s) by device-kind substring, most specific first.
SPEC_PEAK_BF16 = (
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("GH200", 989e12),
  ("B200", 2250e12),
  ("A100", 312e12),
)


def spec_peak(device_kind: str) -> float | None:
  for key, peak in SPEC_PEAK_BF16:
    if key.lower() in device_kind.lower():
      return peak
  return None


# ----------------------------------------------------------------------------- timing and results


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_results(path: str | pathlib.Path | None, results: list[dict[str, Any]]) -> None:
  """Rewrites ``path`` with every result so far (a killed run keeps the parts that finished)."""
  if not path:
    return
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(results, indent=1, default=str))
  tmp.replace(path)


def append_jsonl(path: str | pathlib.Path, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, default=str) + "\n")


def sig(x: float | None, digits: int = 4) -> float | None:
  """``x`` rounded to ``digits`` significant digits (tiny CPU numbers stay readable next to GPU ones)."""
  if x is None or x == 0 or x != x:
    return x
  import math

  return round(float(x), digits - 1 - int(math.floor(math.log10(abs(float(x))))))


def gib(nbytes: float | None) -> float | None:
  return None if nbytes is None else round(float(nbytes) / 2**30, 2)
