"""The Grain input pipeline: ArrayRecord source → shard → shuffle → layers → model inputs → batch → repeat.

Every batch is a dict of NumPy arrays (the batch contract):

* ``video`` float32 [B, num_clips·T, H, W, 3] in [-1, 1]: the layout's clips packed on the time axis,
  i.e. ``layers.pack(layers.layers_to_clips(fg, alpha, bg, blend, layout))``.
* ``tokens`` int32 [B, 3, max_length]: the index-prefixed fg, bg, blend prompts.
* ``clip_valid`` bool [B, num_clips]: False only where a clip's data is missing (bg when ``has_bg`` is False).
* ``motion_scale`` float32 [B]: 0 for video samples, 1 for static samples.

With ``data.cached`` (the latent cache of ``layerflow data cache``) ``latents`` float32 [B, num_clips·t, h, w, c]
and ``text`` float32 [B, 3·max_length, dim] replace ``video`` and ``tokens``; the train step then skips the
autoencoder and the text encoder.

Records come from any builder of :mod:`data_pipelines.registry` and are fitted to ``data.frames/height/width``
(:func:`fit_record`). Multi-host: each process reads only ``[shard_index::shard_count]`` of every source (the
trainer passes ``jax.process_index()``/``jax.process_count()``; tests pass them directly).

``B = config.data.batch_size // shard_count`` (the per-process share of the global batch).

Mixing sources (stage training, :mod:`data_pipelines.mixture`) composes the per-example pieces, e.g.::

  a = layer_dataset(config, "train", seed=1).repeat()
  b = layer_dataset(config, "train", seed=2).repeat().random_map(partial(transforms.drop_prompts, p=0.1), seed=3)
  ds = to_model_inputs(grain.MapDataset.mix([a, b], [0.7, 0.3]), config)
  ds = batch(ds, config, shard_count=n, repeat=False)  # already infinite
"""

from __future__ import annotations

import functools

import grain
import ml_collections as mlc
import numpy as np
from absl import flags

from data_pipelines import transforms
from layerflow_jax import layers
from layerflow_jax.text import make_text_encoder


def _is_train(split: str) -> bool:
  return split.split("[", 1)[0] == "train"


def source_config(config: mlc.ConfigDict, name: str | None = None, **overrides) -> mlc.ConfigDict:
  """``config`` with ``data.name`` (and other ``data`` keys) replaced: one mixture entry's dataset."""
  if name is None and not overrides:
    return config
  c = mlc.ConfigDict(config.to_dict())
  if name is not None:
    c.data.name = name
  for k, v in overrides.items():
    c.data[k] = v
  return c


def load_source(data_cfg: mlc.ConfigDict, split: str, config: mlc.ConfigDict | None = None):
  """The random-access record source named by ``data_cfg.name`` (TFDS ``as_data_source``); with
  ``data.cached`` the latent cache of that dataset (which needs the whole ``config``: codec and text encoder)."""
  from data_pipelines import registry

  if data_cfg.get("cached", False):
    from data_pipelines import layerflow_latents

    if config is None:
      raise ValueError("data.cached=True: reading the latent cache needs the whole config")
    return layerflow_latents.load_source(config, split)
  return registry.load_source(data_cfg, split)


def per_shard_batch_size(config: mlc.ConfigDict, shard_count: int) -> int:
  global_batch = int(config.data.batch_size)
  if shard_count <= 0 or global_batch % shard_count:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the {shard_count} data shards")
  return global_batch // shard_count


def record_dataset(config: mlc.ConfigDict, split: str, *, shard_index: int = 0, shard_count: int = 1,
                   seed: int | None = None, shuffle: bool | None = None,
                   by_global_batch: bool = False) -> grain.MapDataset:
  """Stored records of this process's shard (``[shard_index::shard_count]``), optionally shuffled.

  ``by_global_batch`` (the plain training pipeline): the records are shuffled globally first and process ``i``
  takes block ``i`` of every global batch, so the global batches (contents and order) are the same for any number
  of processes — a run is reproducible across topologies (see :func:`global_batch_blocks`).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} out of range for shard_count {shard_count}")
  ds = grain.MapDataset.source(load_source(config.data, split, config))
  blocks = by_global_batch and shard_count > 1
  if shard_count > 1 and not blocks:
    ds = ds[shard_index::shard_count]
  do_shuffle = _is_train(split) if shuffle is None else shuffle
  if do_shuffle:
    ds = ds.shuffle(seed=int(config.data.shuffle_seed if seed is None else seed))
  if blocks:
    ds = global_batch_blocks(ds, int(config.data.batch_size), shard_index, shard_count, split=split)
  return ds


def global_batch_blocks(ds: grain.MapDataset, global_batch: int, shard_index: int, shard_count: int, *,
                        split: str = "") -> grain.MapDataset:
  """Process ``shard_index``'s rows of every global batch of ``ds``: rows ``[i·b, (i+1)·b)`` of each batch of
  ``global_batch`` (``b = global_batch // shard_count``), in order; the incomplete last batch is dropped.

  Built from grain slices (one per row position, stride ``global_batch``) mixed round-robin, all of which pass
  indices past the end on to the upstream shuffle, so later epochs are reshuffled exactly as with one process.
  """
  b = global_batch // shard_count
  usable = len(ds) // global_batch * global_batch
  if b * shard_count != global_batch or usable == 0:
    raise ValueError(f"data.batch_size {global_batch}: split {split!r} has {len(ds)} records, fewer than one "
                     f"global batch, or the batch is not divisible by {shard_count} processes")
  ds = ds[:usable]
  rows = [ds[shard_index * b + k::global_batch] for k in range(b)]
  return rows[0] if b == 1 else grain.MapDataset.mix(rows, [1.0] * b)


def fit_record(record: dict, *, frames: int, height: int, width: int) -> dict:
  """A stored layered record, completed (:func:`transforms.complete_record`) and fitted to ``frames`` (evenly
  spaced; images repeated) and ``height × width`` (centre crop + resize); the identity on matching records."""
  record = transforms.complete_record(record)
  record = transforms.temporal_sample(record, None, frames=frames)
  return transforms.random_crop_resize(record, None, height=height, width=width)


def layer_dataset(config: mlc.ConfigDict, split: str, **kwargs) -> grain.MapDataset:
  """Decoded float layers of :func:`record_dataset` (see :func:`transforms.decode`), fitted deterministically
  to the config's clip size; the hook for layer-level augmentations and source mixtures, before
  :func:`to_model_inputs`."""
  d = config.data
  fit = functools.partial(fit_record, frames=int(d.frames), height=int(d.height), width=int(d.width))
  return record_dataset(config, split, **kwargs).map(fit).map(transforms.decode)


def to_model_inputs(ds: grain.MapDataset, config: mlc.ConfigDict) -> grain.MapDataset:
  """Layers → per-example ``video``, ``tokens``, ``clip_valid``, ``motion_scale`` in ``config.layout``."""
  fn = functools.partial(transforms.to_model_inputs, layout=layers.get_layout(config.layout),
                         tokenize=make_text_encoder(config.text_encoder).tokenize)
  return ds.map(fn)


def cached_inputs(record: dict) -> dict:
  """A latent-cache record → the cached batch contract: ``latents`` [n·t, h, w, c] and ``text`` [P·L, D]
  (float32) in place of ``video`` and ``tokens``, plus ``clip_valid`` and ``motion_scale``."""
  return {"latents": np.asarray(record["latents"], np.float32), "text": np.asarray(record["text"], np.float32),
          "clip_valid": np.asarray(record["clip_valid"], bool),
          "motion_scale": np.float32(record.get("motion_scale", 0.0))}


def batch(ds: grain.MapDataset, config: mlc.ConfigDict, *, shard_count: int = 1, drop_remainder: bool = True,
          num_epochs: int | None = None, repeat: bool = True) -> grain.MapDataset:
  """Batches of ``batch_size // shard_count``; repeated ``num_epochs`` times (None = forever) if ``repeat``.

  Each epoch is reshuffled: an upstream ``shuffle`` folds the epoch into its seed.
  """
  ds = ds.batch(per_shard_batch_size(config, shard_count), drop_remainder=drop_remainder)
  return ds.repeat(num_epochs) if repeat else ds


def make_dataset(config: mlc.ConfigDict, split: str, *, shard_index: int = 0, shard_count: int = 1,
                 seed: int | None = None, repeat: bool | None = None,
                 shuffle: bool | None = None) -> grain.MapDataset:
  """The batched dataset of ``split`` for one process (repeat, shuffle and drop_remainder: train only)."""
  train = _is_train(split)
  # train: every process count sees the same global batches (incomplete ones are dropped in training anyway)
  if config.data.get("cached", False):
    ds = record_dataset(config, split, shard_index=shard_index, shard_count=shard_count, seed=seed,
                        shuffle=shuffle, by_global_batch=train).map(cached_inputs)
  else:
    ds = layer_dataset(config, split, shard_index=shard_index, shard_count=shard_count, seed=seed,
                       shuffle=shuffle, by_global_batch=train)
    ds = to_model_inputs(ds, config)
  return batch(ds, config, shard_count=shard_count, drop_remainder=train, num_epochs=config.data.num_epochs,
               repeat=train if repeat is None else repeat)


def to_iterator(ds: grain.MapDataset, config: mlc.ConfigDict) -> grain.DatasetIterator:
  """A checkpointable iterator (``get_state`` / ``set_state``), multiprocess if ``data.worker_count > 0``."""
  read = grain.ReadOptions(num_threads=int(config.data.get("read_threads", 2)),
                           prefetch_buffer_size=int(config.data.get("prefetch_batches", 4)))
  it_ds = ds.to_iter_dataset(read)
  workers = int(config.data.get("worker_count", 0))
  if workers > 0:
    # Grain's worker processes read absl flags, which raise unless parsed (we are not under absl.app).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it_ds)


def make_iterator(config: mlc.ConfigDict, split: str, **kwargs) -> grain.DatasetIterator:
  """:func:`make_dataset` (same keyword arguments) as a checkpointable iterator."""
  return to_iterator(make_dataset(config, split, **kwargs), config)
