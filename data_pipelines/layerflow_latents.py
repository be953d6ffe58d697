"""TFDS builder ``layerflow_latents``: a dataset's clips and prompts run once through the autoencoder and the text
encoder (``layerflow data cache``), so training reads latents and embeddings instead of encoding every step.

One record per source record: ``id``, ``latents`` [num_clips·t, h, w, c] (the packed latent clips exactly as the
train step's ``Experiment.encode_video`` makes them), ``text`` [3·max_length, dim] (``Experiment.encode_text``),
``tokens`` [3, max_length] and ``clip_valid`` [num_clips]. Records are the source's, fitted deterministically to
``data.frames/height/width`` (no augmentation: a cache holds what ``transform="video"`` entries read).

The builder config is named ``<source>__<source config>__<fingerprint>``, the fingerprint hashing the layout, the
autoencoder, the text encoder and the stored dtype, so a cache made for one codec is never read by another.
Training reads it with ``--config.data.cached=True`` (``data.cache_dir`` holds it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Iterator

import jax
import ml_collections as mlc
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import importing, registry, transforms
from layerflow_jax import codec as codec_lib
from layerflow_jax import layers
from layerflow_jax import text as text_lib

log = logging.getLogger(__name__)

NAME = "layerflow_latents"
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclasses.dataclass(eq=False)
class LayerflowLatentsConfig(tfds.core.BuilderConfig):
  config_json: str = "{}"  # the LayerFlow config (JSON) whose data, codec and text encoder are cached
  latent_shape: tuple = ()
  text_shape: tuple = ()
  num_clips: int = 4
  max_length: int = 32
  dtype: str = "float32"
  batch_size: int = 8


def fingerprint(config: mlc.ConfigDict) -> str:
  keys = {
    "layout": config.layout,
    "autoencoder": config.autoencoder.to_dict(),
    "text_encoder": config.text_encoder.to_dict(),
    "dtype": config.data.get("cache_dtype", "float32"),
  }
  return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:10]


def make_config(config: mlc.ConfigDict) -> LayerflowLatentsConfig:
  d = config.data
  dtype = d.get("cache_dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"data.cache_dtype: {dtype!r} unknown; expected one of {sorted(DTYPES)}")
  raw = mlc.ConfigDict(config.to_dict())
  raw.data.cached = False
  source = registry.module(d.name).make_builder(raw.data).builder_config.name
  layout = layers.get_layout(config.layout)
  t, h, w, c = codec_lib.make_codec(config.autoencoder).latent_shape(d.frames, d.height, d.width)
  text = text_lib.make_text_encoder(config.text_encoder)
  return LayerflowLatentsConfig(
    name=f"{d.name}__{source}__{fingerprint(config)}",
    description=f"latent cache of {d.name}/{source}",
    config_json=raw.to_json_best_effort(sort_keys=True),
    latent_shape=(layout.num_clips * t, h, w, c),
    text_shape=(3 * text.max_length, text.dim),
    num_clips=layout.num_clips,
    max_length=text.max_length,
    dtype=dtype,
    batch_size=int(d.batch_size),
  )


class LayerflowLatents(tfds.core.GeneratorBasedBuilder):
  """Latents and text embeddings of another dataset (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  code_path = tfds.core.utils.classproperty(classmethod(importing.local_code_path))

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    dtype = DTYPES[c.dtype]
    raw = lambda shape, dt: tfds.features.Tensor(
      shape=tuple(shape), dtype=dt, encoding=tfds.features.Encoding.BYTES
    )
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "latents": raw(c.latent_shape, dtype),
          "text": raw(c.text_shape, dtype),
          "tokens": raw((3, c.max_length), np.int32),
          "clip_valid": raw((c.num_clips,), np.bool_),
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    config = mlc.ConfigDict(json.loads(self.builder_config.config_json))
    splits = list(registry.module(config.data.name).make_builder(config.data).info.splits)
    return {split: self._generate_examples(config, split) for split in splits}

  def _generate_examples(self, config: mlc.ConfigDict, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from encode_split(config, split, DTYPES[self.builder_config.dtype], self.builder_config.batch_size)


def encode_split(
  config: mlc.ConfigDict, split: str, dtype=np.float32, batch_size: int = 8
) -> Iterator[tuple[str, dict[str, Any]]]:
  """(id, cache record) of every record of ``split``, encoded ``batch_size`` at a time by the Experiment's own
  ``encode_video``/``encode_text`` functions (so a cached batch equals what the train step would compute)."""
  layout = layers.get_layout(config.layout)
  codec = codec_lib.make_codec(config.autoencoder)
  text_encoder = text_lib.make_text_encoder(config.text_encoder)
  encode_video = jax.jit(lambda v: codec_lib.encode_clips(codec, v, layout.num_clips))
  encode_text = jax.jit(lambda t: text_encoder.encode(t).reshape(t.shape[0], -1, text_encoder.dim))
  d = config.data
  source = registry.load_source(config.data, split)  # the stored records, in order
  n = len(source)
  for start in range(0, n, batch_size):
    ids, inputs = [], []
    for i in range(start, min(start + batch_size, n)):
      record = source[i]
      ids.append(transforms._text(record["id"]))
      layers_ = transforms.decode(
        transforms.fit_record(record, frames=int(d.frames), height=int(d.height), width=int(d.width))
      )
      inputs.append(transforms.to_model_inputs(layers_, layout=layout, tokenize=text_encoder.tokenize))
    video = np.stack([x["video"] for x in inputs])
    tokens = np.stack([x["tokens"] for x in inputs])
    latents = np.asarray(encode_video(video), np.float32)
    text = np.asarray(encode_text(tokens), np.float32)
    for j, key in enumerate(ids):
      yield (
        key,
        {
          "id": key,
          "latents": latents[j].astype(dtype),
          "text": text[j].astype(dtype),
          "tokens": tokens[j],
          "clip_valid": inputs[j]["clip_valid"],
        },
      )
    log.info("%s %s: encoded %d of %d", NAME, split, min(start + batch_size, n), n)


def make_builder(config: mlc.ConfigDict) -> LayerflowLatents:
  return LayerflowLatents(
    config=make_config(config), data_dir=str(config.data.cache_dir), file_format="array_record"
  )


def build(config: mlc.ConfigDict) -> LayerflowLatents:
  """Encodes ``config.data.name`` (all its splits) into ``config.data.cache_dir`` (a no-op when already there)."""
  builder = make_builder(config)
  builder.download_and_prepare(file_format="array_record")
  return builder


def load_source(config: mlc.ConfigDict, split: str):
  builder = make_builder(config)
  return importing.prepared_source(
    builder,
    NAME,
    split,
    f"run `layerflow data cache --config … ` for dataset {config.data.name!r} first "
    f"(or set data.cached=False)",
  )
