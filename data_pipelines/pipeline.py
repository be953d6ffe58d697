"""The Grain input pipeline: ArrayRecord source → shard → shuffle → layers → model inputs → batch → repeat.

Every batch is a dict of NumPy arrays (the batch contract):

* ``video`` float32 [B, num_clips·T, H, W, 3] in [-1, 1]: the layout's clips packed on the time axis,
  i.e. ``layers.pack(layers.layers_to_clips(fg, alpha, bg, blend, layout))``.
* ``tokens`` int32 [B, 3, max_length]: the index-prefixed fg, bg, blend prompts.
* ``clip_valid`` bool [B, num_clips]: False only where a clip's data is missing (bg when ``has_bg`` is False).
* ``motion_scale`` float32 [B]: 0 for video samples, 1 for static samples.

``B = config.data.batch_size // shard_count`` (the per-process share of the global batch).

Mixing sources (stage training, :mod:`data_pipelines.mixture`) composes the per-example pieces, e.g.::

  a = layer_dataset(config, "train", seed=1).repeat()
  b = layer_dataset(config, "train", seed=2).repeat().random_map(transforms.static_clip, seed=3)
  b = b.map(lambda e: {**e, "motion_scale": 1.0})
  ds = to_model_inputs(grain.MapDataset.mix([a, b], [0.7, 0.3]), config)
  ds = batch(ds, config, shard_count=n, repeat=False)  # already infinite
"""

from __future__ import annotations

import functools

import grain
import ml_collections as mlc
from absl import flags

from data_pipelines import transforms
from layerflow_jax import layers
from layerflow_jax.text import make_text_encoder


def _is_train(split: str) -> bool:
  return split.split("[", 1)[0] == "train"


def load_source(data_cfg: mlc.ConfigDict, split: str):
  """The random-access record source named by ``data_cfg.name`` (TFDS ``as_data_source``)."""
  if data_cfg.name == "layerflow_synthetic":
    from data_pipelines import layerflow_synthetic

    return layerflow_synthetic.load_source(data_cfg, split)
  raise ValueError(f"data.name: unknown dataset {data_cfg.name!r}; expected 'layerflow_synthetic'")


def per_shard_batch_size(config: mlc.ConfigDict, shard_count: int) -> int:
  global_batch = int(config.data.batch_size)
  if shard_count <= 0 or global_batch % shard_count:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the {shard_count} data shards")
  return global_batch // shard_count


def record_dataset(config: mlc.ConfigDict, split: str, *, shard_index: int = 0, shard_count: int = 1,
                   seed: int | None = None, shuffle: bool | None = None) -> grain.MapDataset:
  """Stored records of this process's shard (``[shard_index::shard_count]``), optionally shuffled."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} out of range for shard_count {shard_count}")
  ds = grain.MapDataset.source(load_source(config.data, split))
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  do_shuffle = _is_train(split) if shuffle is None else shuffle
  if do_shuffle:
    ds = ds.shuffle(seed=int(config.data.shuffle_seed if seed is None else seed))
  return ds


def layer_dataset(config: mlc.ConfigDict, split: str, **kwargs) -> grain.MapDataset:
  """Decoded float layers of :func:`record_dataset` (see :func:`transforms.decode`); the hook for
  layer-level augmentations and source mixtures, before :func:`to_model_inputs`."""
  return record_dataset(config, split, **kwargs).map(transforms.decode)


def to_model_inputs(ds: grain.MapDataset, config: mlc.ConfigDict) -> grain.MapDataset:
  """Layers → per-example ``video``, ``tokens``, ``clip_valid``, ``motion_scale`` in ``config.layout``."""
  fn = functools.partial(transforms.to_model_inputs, layout=layers.get_layout(config.layout),
                         tokenize=make_text_encoder(config.text_encoder).tokenize)
  return ds.map(fn)


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
  ds = layer_dataset(config, split, shard_index=shard_index, shard_count=shard_count, seed=seed,
                     shuffle=shuffle)
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
