"""Stage data mixtures: weighted sources, each with its own transform and motion-LoRA scale.

``config.data.mixture`` is a list of entries ``{name, weight, transform, motion_scale}``:

* ``transform``: ``"video"`` (clips as stored) or ``"static"`` (one frame repeated over the clip — the paper's
  "frozen" videos and layered images repeated into static clips);
* ``motion_scale``: the per-sample scale of the motion adapter (1 for static samples, 0 for video samples).

An empty mixture means the plain pipeline of :mod:`data_pipelines.pipeline`. Mixing uses
``grain.MapDataset.mix``; everything is deterministic from ``config.data.shuffle_seed``.
"""

from __future__ import annotations

import grain
import ml_collections as mlc

from data_pipelines import pipeline, transforms

TRANSFORMS = ("video", "static")


def _source(config: mlc.ConfigDict, entry, index: int, *, shard_index: int, shard_count: int) -> grain.MapDataset:
  transform = entry.get("transform", "video")
  if transform not in TRANSFORMS:
    raise ValueError(f"data.mixture[{index}].transform: {transform!r} unknown; expected one of {TRANSFORMS}")
  seed = int(config.data.shuffle_seed) + 1000 * index
  ds = pipeline.layer_dataset(config, "train", shard_index=shard_index, shard_count=shard_count, seed=seed)
  ds = ds.repeat()
  if transform == "static":
    ds = ds.random_map(transforms.static_clip, seed=seed + 1)
  scale = float(entry.get("motion_scale", 0.0))
  return ds.map(lambda e, s=scale: {**e, "motion_scale": s})


def make_train_dataset(config: mlc.ConfigDict, *, shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  mixture = list(config.data.get("mixture", []) or [])
  if not mixture:
    return pipeline.make_dataset(config, "train", shard_index=shard_index, shard_count=shard_count)
  sources = [_source(config, e, i, shard_index=shard_index, shard_count=shard_count) for i, e in enumerate(mixture)]
  weights = [float(e.get("weight", 1.0)) for e in mixture]
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"data.mixture weights must be non-negative with a positive sum, got {weights}")
  ds = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, weights)
  ds = pipeline.to_model_inputs(ds, config)
  return pipeline.batch(ds, config, shard_count=shard_count, repeat=False)


def make_train_iterator(config: mlc.ConfigDict, *, shard_index: int = 0, shard_count: int = 1):
  return pipeline.to_iterator(make_train_dataset(config, shard_index=shard_index, shard_count=shard_count), config)
