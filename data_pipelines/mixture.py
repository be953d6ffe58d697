"""Stage data mixtures: weighted sources, each with its own transforms and motion-LoRA scale.

``config.data.mixture`` is a list of entries ``{name, weight, transform, motion_scale, background, split}``:

* ``name``: a dataset of :mod:`data_pipelines.registry` (layered: ``layerflow_synthetic``, ``layerflow_folder``,
  ``layerflow_images``);
* ``transform``: ``"video"`` (clips as stored) or ``"static"`` (one frame repeated over the clip — the paper's
  "frozen" videos and layered images repeated into static clips; one-frame image records are static anyway);
* ``background`` (optional, default none): a dataset whose clips (a plain video's frames, or a layered record's
  background) receive this entry's matted foreground by copy-paste synthesis (:func:`transforms.copy_paste`:
  random scale/position/flip from ``data.copy_paste``, blend recomputed, prompts composed);
* ``motion_scale``: the per-sample scale of the motion adapter (1 for static samples, 0 for video samples);
* ``split`` (optional, default ``"train"``).

Per example, in order: fit to the clip length (:func:`transforms.temporal_sample`: a random evenly spaced window of
stride ≤ ``data.max_frame_stride``; images repeated) → copy-paste → random crop + resize (area ≥
``data.random_crop``; 1 = centre crop) → static → per-layer prompt dropout (``data.prompt_dropout``) → normalise,
premultiply (a missing fg = the blend × alpha), pack and tokenise in one pass
(:func:`transforms.record_to_model_inputs`). Sources are mixed by weight with
``grain.MapDataset.mix``; everything is deterministic from ``config.data.shuffle_seed`` and the entry's
position, and every source is sharded by process (``shard_index``/``shard_count``).

An empty mixture means the plain pipeline of :mod:`data_pipelines.pipeline`. With ``data.cached`` the sources are
latent caches (``layerflow data cache``): only ``transform="video"`` entries without a background qualify,
since pixels are no longer there to transform.
"""

from __future__ import annotations

import functools

import grain
import ml_collections as mlc

from data_pipelines import pipeline, transforms
from layerflow_jax import layers
from layerflow_jax.text import make_text_encoder

TRANSFORMS = ("video", "static")
ENTRY_KEYS = ("name", "weight", "transform", "motion_scale", "background", "split")


def _records(config: mlc.ConfigDict, name: str, split: str, seed: int, *, shard_index: int,
             shard_count: int) -> grain.MapDataset:
  """Shuffled, repeated (each epoch reshuffled) records of one dataset, this process's shard."""
  c = pipeline.source_config(config, name)
  return pipeline.record_dataset(c, split, shard_index=shard_index, shard_count=shard_count, seed=seed,
                                 shuffle=True).repeat()


def _centre_fit(example: dict, *, height: int, width: int) -> dict:
  return transforms.random_crop_resize(example, None, height=height, width=width)


def entry_dataset(config: mlc.ConfigDict, entry, index: int, *, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
  """One mixture entry as an infinite dataset of model inputs (the batch contract, unbatched)."""
  unknown = sorted(set(entry) - set(ENTRY_KEYS))
  if unknown:
    raise ValueError(f"data.mixture[{index}]: unknown key(s) {unknown}; expected some of {ENTRY_KEYS}")
  transform = entry.get("transform", "video")
  if transform not in TRANSFORMS:
    raise ValueError(f"data.mixture[{index}].transform: {transform!r} unknown; expected one of {TRANSFORMS}")
  d = config.data
  name, split = entry.get("name", d.name), entry.get("split", "train")
  background = entry.get("background", "") or ""
  seed = int(d.shuffle_seed) + 1000 * index
  scale = float(entry.get("motion_scale", 0.0))
  set_scale = lambda e, s=scale: {**e, "motion_scale": s}
  ds = _records(config, name, split, seed, shard_index=shard_index, shard_count=shard_count)
  if d.get("cached", False):
    if transform != "video" or background:
      raise ValueError(f"data.mixture[{index}] ({name}, transform={transform!r}, background={background!r}) needs "
                       "pixels; a latent cache (data.cached=True) serves only transform='video' without background")
    return ds.map(pipeline.cached_inputs).map(set_scale)

  frames, height, width = int(d.frames), int(d.height), int(d.width)
  temporal = functools.partial(transforms.temporal_sample, frames=frames, max_stride=int(d.get("max_frame_stride", 1)))
  crop = functools.partial(transforms.random_crop_resize, height=height, width=width,
                           min_area=float(d.get("random_crop", 1.0)))
  ds = ds.random_map(temporal, seed=seed + 2)  # missing fg/bg stay missing (no resize for them below)
  if background:
    # Fit both sides to the clip size before pasting, then crop the composite like any clip.
    fit = functools.partial(_centre_fit, height=height, width=width)
    bg = _records(config, background, split, seed + 3, shard_index=shard_index, shard_count=shard_count)
    bg = bg.map(transforms.as_background).random_map(temporal, seed=seed + 4).map(fit)
    ds = ds.map(fit)
    cp = d.get("copy_paste", {}) or {}
    paste = functools.partial(
        transforms.copy_paste, scale=(float(cp.get("scale_min", 0.5)), float(cp.get("scale_max", 1.0))),
        flip=float(cp.get("flip", 0.5)), template=str(cp.get("prompt", "{fg} over {bg}")))
    ds = grain.experimental.ZipMapDataset([ds, bg]).random_map(paste, seed=seed + 5)
  ds = ds.random_map(crop, seed=seed + 6)
  if transform == "static":
    ds = ds.random_map(transforms.static_clip, seed=seed + 1)
  p = float(d.get("prompt_dropout", 0.0))
  if p > 0:
    ds = ds.random_map(functools.partial(transforms.drop_prompts, p=p), seed=seed + 7)
  # uint8 record → normalised, premultiplied, packed and tokenised in one pass (transforms.record_to_model_inputs).
  to_inputs = functools.partial(transforms.record_to_model_inputs, layout=layers.get_layout(config.layout),
                                tokenize=make_text_encoder(config.text_encoder).tokenize)
  return ds.map(set_scale).map(to_inputs)


def make_train_dataset(config: mlc.ConfigDict, *, shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  mixture = list(config.data.get("mixture", []) or [])
  if not mixture:
    return pipeline.make_dataset(config, "train", shard_index=shard_index, shard_count=shard_count)
  sources = [entry_dataset(config, e, i, shard_index=shard_index, shard_count=shard_count)
             for i, e in enumerate(mixture)]
  weights = [float(e.get("weight", 1.0)) for e in mixture]
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"data.mixture weights must be non-negative with a positive sum, got {weights}")
  keep = [i for i, w in enumerate(weights) if w > 0]
  sources, weights = [sources[i] for i in keep], [weights[i] for i in keep]
  ds = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, weights)
  return pipeline.batch(ds, config, shard_count=shard_count, repeat=False)


def make_train_iterator(config: mlc.ConfigDict, *, shard_index: int = 0, shard_count: int = 1):
  return pipeline.to_iterator(make_train_dataset(config, shard_index=shard_index, shard_count=shard_count), config)
