"""The batch contract, declared once: :func:`batch_spec` gives the arrays of one global batch of a config.

Every batch is a dict of arrays:

* ``video`` float32 [B, num_clips·T, H, W, 3] in [-1, 1]: the layout's clips packed on the time axis,
  i.e. ``layers.pack(layers.layers_to_clips(fg, alpha, bg, blend, layout))``.
* ``tokens`` int32 [B, 3, max_length]: the index-prefixed fg, bg, blend prompts.
* ``clip_valid`` bool [B, num_clips]: False only where a clip's data is missing (bg when ``has_bg`` is False).
* ``motion_scale`` float32 [B]: the mixture entry's motion-adapter scale (0 video samples, 1 static samples).

With ``data.cached`` (the latent cache of ``layerflow data cache``) ``latents`` float32 [B, num_clips·t, h, w, c]
and ``text`` float32 [B, 3·max_length, dim] replace ``video`` and ``tokens``; the train step then skips the
autoencoder and the text encoder.

The pipeline checks every example against it, ``trainer.global_batch`` assembles the global arrays with it, and
AOT compilation and the benchmarks lower the train step on it. This module needs no Grain or TFDS, so the model
side can import it cheaply.
"""

from __future__ import annotations

import jax
import ml_collections as mlc
import numpy as np
from jax.sharding import Mesh

from layerflow_jax import codec as codec_lib
from layerflow_jax import layers
from layerflow_jax import sharding as shd

NUM_PROMPTS = 3  # fg, bg, blend (data_pipelines.transforms.PROMPT_KEYS)
# Every key batch_spec gives: pixels and prompts, or (data.cached) latents and text embeddings; then per sample.
BATCH_KEYS = ("video", "tokens", "latents", "text", "clip_valid", "motion_scale")


def batch_spec(
  config: mlc.ConfigDict, mesh: Mesh | None = None, *, latent_shape: tuple[int, int, int, int] | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of ``config`` (``data.batch_size`` rows); with ``mesh`` each array carries the data
  sharding (:func:`layerflow_jax.sharding.data_sharding`). ``latent_shape`` (t, h, w, c per clip; data.cached
  only) saves building the autoencoder again where the caller has it."""
  d = config.data
  b, n = int(d.batch_size), layers.get_layout(config.layout).num_clips
  length = int(config.text_encoder.max_length)
  if d.get("cached", False):
    t, h, w, c = latent_shape or codec_lib.make_codec(config.autoencoder).latent_shape(
      d.frames, d.height, d.width
    )
    shapes = {
      "latents": ((b, n * t, h, w, c), np.float32),
      "text": ((b, NUM_PROMPTS * length, int(config.text_encoder.dim)), np.float32),
    }
  else:
    shapes = {
      "video": ((b, n * int(d.frames), int(d.height), int(d.width), 3), np.float32),
      "tokens": ((b, NUM_PROMPTS, length), np.int32),
    }
  shapes |= {"clip_valid": ((b, n), np.bool_), "motion_scale": ((b,), np.float32)}
  sharding = (lambda ndim: shd.data_sharding(mesh, ndim)) if mesh is not None else (lambda ndim: None)
  return {
    k: jax.ShapeDtypeStruct(s, np.dtype(dt), sharding=sharding(len(s))) for k, (s, dt) in shapes.items()
  }


def check_example(example: dict, *, spec: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """``example`` (one row) unchanged if it has exactly the spec's keys, each of its row shape and dtype; a
  ``ValueError`` naming the key otherwise (e.g. a dataset built for other ``data.frames``)."""
  if set(example) != set(spec):
    raise ValueError(f"example keys {sorted(example)}; the config's batch spec has {sorted(spec)}")
  for k, s in spec.items():
    x = np.asarray(example[k])
    if x.shape != s.shape[1:] or x.dtype != s.dtype:
      raise ValueError(
        f"batch key {k!r}: an example is {x.dtype}{list(x.shape)}, the config's batch spec "
        f"{s.dtype}{list(s.shape[1:])} (data.frames/height/width, layout, text_encoder)"
      )
  return example
