"""The one input pipeline: a config → this process's rows of each step's global batch (:mod:`data_pipelines.spec`).

Training reads ``config.data.mixture``, a list of entries ``{name, weight, transform, motion_scale, background,
split}``; an empty mixture is the one-entry mixture ``[{name: data.name, transform: "video", motion_scale: 0}]``
(what stage 1 writes out):

* ``name``: a dataset of :mod:`data_pipelines.registry` (layered: ``layerflow_synthetic``, ``layerflow_folder``,
  ``layerflow_images``);
* ``transform``: ``"video"`` (clips as stored) or ``"static"`` (one frame repeated over the clip — the paper's
  "frozen" videos and layered images repeated into static clips; one-frame image records are static anyway);
* ``background`` (optional, default none): a dataset whose clips (a plain video's frames, or a layered record's
  background) receive this entry's matted foreground by copy-paste synthesis (:func:`transforms.copy_paste`:
  random scale/position/flip from ``data.copy_paste``, blend recomputed, prompts composed);
* ``motion_scale``: the per-sample scale of the motion adapter (1 for static samples, 0 for video samples);
* ``split`` (optional, default ``"train"``).

Per example, in order: shuffled records (each epoch reshuffled; ``data.num_epochs`` epochs, None = forever) → fit
to the clip length (:func:`transforms.temporal_sample`: a random evenly spaced window of stride ≤
``data.max_frame_stride``; images repeated) → copy-paste → random crop + resize (area ≥ ``data.random_crop``; 1 =
centre crop) → static → per-layer prompt dropout (``data.prompt_dropout``) → normalise, premultiply, pack and
tokenise in one pass (:func:`transforms.record_to_model_inputs`). Entries are mixed by weight with
``grain.MapDataset.mix``. Evaluation splits read ``data.name`` unshuffled, once, fitted deterministically.

The example stream is global: everything is deterministic from ``config.data.shuffle_seed``, the entry's position
and the example's index, and no process count enters it. Process ``i`` of ``n`` takes block ``i`` of every global
batch of ``data.batch_size`` (:func:`process_batches`), so the global batch of every step — contents and order —
is the same for any number of processes, and on one process it is the stream cut into batches.

With ``data.cached`` the sources are latent caches (``layerflow data cache``): only ``transform="video"`` entries
without a background qualify, since pixels are no longer there to transform.
"""

from __future__ import annotations

import functools

import grain
import ml_collections as mlc
import numpy as np
from absl import flags

from data_pipelines import layerflow_latents, registry, spec, transforms
from layerflow_jax import layers
from layerflow_jax.text import make_text_encoder

TRANSFORMS = ("video", "static")
ENTRY_KEYS = ("name", "weight", "transform", "motion_scale", "background", "split")


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
  if data_cfg.get("cached", False):
    if config is None:
      raise ValueError("data.cached=True: reading the latent cache needs the whole config")
    return layerflow_latents.load_source(config, split)
  return registry.load_source(data_cfg, split)


def record_dataset(
  config: mlc.ConfigDict,
  split: str,
  *,
  seed: int | None = None,
  shuffle: bool | None = None,
  num_epochs: int | None = 1,
) -> grain.MapDataset:
  """Stored records of ``split``, shuffled (default: train splits only; each epoch reshuffled) and repeated
  ``num_epochs`` times (None = forever)."""
  ds = grain.MapDataset.source(load_source(config.data, split, config))
  if _is_train(split) if shuffle is None else shuffle:
    ds = ds.shuffle(seed=int(config.data.shuffle_seed if seed is None else seed))
  return ds if num_epochs == 1 else ds.repeat(num_epochs)


def layer_dataset(config: mlc.ConfigDict, split: str, **kwargs) -> grain.MapDataset:
  """Decoded float layers of :func:`record_dataset` (see :func:`transforms.decode`), fitted deterministically
  to the config's clip size (evaluation reads them; :func:`to_model_inputs` makes the model inputs)."""
  d = config.data
  fit = functools.partial(
    transforms.fit_record, frames=int(d.frames), height=int(d.height), width=int(d.width)
  )
  return record_dataset(config, split, **kwargs).map(fit).map(transforms.decode)


def to_model_inputs(ds: grain.MapDataset, config: mlc.ConfigDict) -> grain.MapDataset:
  """Layers → per-example ``video``, ``tokens``, ``clip_valid``, ``motion_scale`` in ``config.layout``."""
  fn = functools.partial(
    transforms.to_model_inputs,
    layout=layers.get_layout(config.layout),
    tokenize=make_text_encoder(config.text_encoder).tokenize,
  )
  return ds.map(fn)


def cached_inputs(record: dict) -> dict:
  """A latent-cache record → the cached batch contract: ``latents`` [n·t, h, w, c] and ``text`` [P·L, D]
  (float32) in place of ``video`` and ``tokens``, plus ``clip_valid`` and ``motion_scale``."""
  return {
    "latents": np.asarray(record["latents"], np.float32),
    "text": np.asarray(record["text"], np.float32),
    "clip_valid": np.asarray(record["clip_valid"], bool),
    "motion_scale": np.float32(record.get("motion_scale", 0.0)),
  }


def mixture_entries(config: mlc.ConfigDict) -> list:
  """``data.mixture``, or the one-entry mixture of ``data.name`` when it is empty."""
  entries = list(config.data.get("mixture", []) or [])
  return entries or [dict(name=config.data.name, weight=1.0, transform="video", motion_scale=0.0)]


def _set_scale(example: dict, *, scale: float) -> dict:
  return {
    **example,
    "motion_scale": np.float32(scale),
  }  # float32 as the batch spec says (a float batches to f64)


def _centre_fit(example: dict, *, height: int, width: int) -> dict:
  return transforms.random_crop_resize(example, None, height=height, width=width)


def entry_dataset(config: mlc.ConfigDict, entry, index: int, *, train: bool = True) -> grain.MapDataset:
  """One mixture entry as a dataset of model inputs (the batch contract, unbatched), global (every process
  builds the same one). ``train``: shuffled, ``data.num_epochs`` epochs, augmented; otherwise one unshuffled
  epoch fitted deterministically (no copy-paste, static clips or prompt dropout)."""
  unknown = sorted(set(entry) - set(ENTRY_KEYS))
  if unknown:
    raise ValueError(f"data.mixture[{index}]: unknown key(s) {unknown}; expected some of {ENTRY_KEYS}")
  transform = entry.get("transform", "video")
  if transform not in TRANSFORMS:
    raise ValueError(f"data.mixture[{index}].transform: {transform!r} unknown; expected one of {TRANSFORMS}")
  d = config.data
  name, split = entry.get("name", d.name), entry.get("split", "train")
  background = entry.get("background", "") or ""
  if not train and (transform != "video" or background):
    raise ValueError(f"data.mixture[{index}] ({name}): evaluation reads transform='video' without background")
  seed = int(d.shuffle_seed) + 1000 * index
  set_scale = functools.partial(_set_scale, scale=float(entry.get("motion_scale", 0.0)))
  num_epochs = d.get("num_epochs") if train else 1
  records = lambda name, seed: record_dataset(
    source_config(config, name), split, seed=seed, shuffle=train, num_epochs=num_epochs
  )
  ds = records(name, seed)
  if d.get("cached", False):
    if transform != "video" or background:
      raise ValueError(
        f"data.mixture[{index}] ({name}, transform={transform!r}, background={background!r}) needs "
        "pixels; a latent cache (data.cached=True) serves only transform='video' without background"
      )
    return ds.map(cached_inputs).map(set_scale)

  def random_map(ds, fn, offset):  # evaluation: the same function without randomness (rng=None)
    return ds.random_map(fn, seed=seed + offset) if train else ds.map(functools.partial(fn, rng=None))

  frames, height, width = int(d.frames), int(d.height), int(d.width)
  temporal = functools.partial(transforms.temporal_sample, frames=frames, max_stride=int(d.max_frame_stride))
  crop = functools.partial(
    transforms.random_crop_resize, height=height, width=width, min_area=float(d.get("random_crop", 1.0))
  )
  ds = random_map(ds, temporal, 2)  # missing fg/bg stay missing (no resize for them below)
  if background:
    # Fit both sides to the clip size before pasting, then crop the composite like any clip.
    fit = functools.partial(_centre_fit, height=height, width=width)
    bg = (
      records(background, seed + 3).map(transforms.as_background).random_map(temporal, seed=seed + 4).map(fit)
    )
    ds = ds.map(fit)
    cp = d.get("copy_paste", {}) or {}
    paste = functools.partial(
      transforms.copy_paste,
      scale=(float(cp.get("scale_min", 0.5)), float(cp.get("scale_max", 1.0))),
      flip=float(cp.get("flip", 0.5)),
      template=str(cp.get("prompt", "{fg} over {bg}")),
    )
    ds = grain.experimental.ZipMapDataset([ds, bg]).random_map(paste, seed=seed + 5)
  ds = random_map(ds, crop, 6)
  if transform == "static":
    ds = ds.random_map(transforms.static_clip, seed=seed + 1)
  p = float(d.get("prompt_dropout", 0.0))
  if p > 0 and train:
    ds = ds.random_map(functools.partial(transforms.drop_prompts, p=p), seed=seed + 7)
  # uint8 record → normalised, premultiplied, packed and tokenised in one pass (transforms.record_to_model_inputs).
  to_inputs = functools.partial(
    transforms.record_to_model_inputs,
    layout=layers.get_layout(config.layout),
    tokenize=make_text_encoder(config.text_encoder).tokenize,
  )
  return ds.map(set_scale).map(to_inputs)


def examples(config: mlc.ConfigDict, split: str = "train") -> grain.MapDataset:
  """The global example stream of ``split``: the mixture by weight (train) or ``data.name`` (evaluation),
  each example checked against the config's batch spec."""
  if _is_train(split):
    entries = mixture_entries(config)
    weights = [float(e.get("weight", 1.0)) for e in entries]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
      raise ValueError(f"data.mixture weights must be non-negative with a positive sum, got {weights}")
    keep = [i for i, w in enumerate(weights) if w > 0]
    sources = [entry_dataset(config, entries[i], i) for i in keep]
    ds = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, [weights[i] for i in keep])
  else:
    ds = entry_dataset(config, dict(name=config.data.name, split=split), 0, train=False)
  return ds.map(functools.partial(spec.check_example, spec=spec.batch_spec(config)))


def per_process_batch_size(config: mlc.ConfigDict, shard_count: int) -> int:
  global_batch = int(config.data.batch_size)
  if shard_count <= 0 or global_batch % shard_count:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the {shard_count} data shards")
  return global_batch // shard_count


def process_batches(
  ds: grain.MapDataset,
  config: mlc.ConfigDict,
  *,
  shard_index: int = 0,
  shard_count: int = 1,
  drop_remainder: bool = True,
) -> grain.MapDataset:
  """Process ``shard_index``'s rows of every global batch of ``ds``: batches of ``b = data.batch_size //
  shard_count`` (batch ``q`` holds rows ``[q·b, (q+1)·b)``), of which global batch ``j`` is ``j·n … j·n + n-1``,
  so this process takes every ``n``-th from ``shard_index``. Several processes see whole global batches only (the
  incomplete last one is dropped); one process keeps it unless ``drop_remainder``."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} out of range for shard_count {shard_count}")
  b = per_process_batch_size(config, shard_count)
  if shard_count == 1:
    return ds.batch(b, drop_remainder=drop_remainder)
  whole = len(ds) // int(config.data.batch_size) * shard_count
  if whole == 0:
    raise ValueError(
      f"data.batch_size {config.data.batch_size}: {len(ds)} examples, fewer than one global batch"
    )
  return ds.batch(b, drop_remainder=True)[:whole][shard_index::shard_count]


def make_dataset(
  config: mlc.ConfigDict, split: str = "train", *, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
  """This process's batches of ``split``: train batches of the mixture (as long as ``data.num_epochs`` lasts),
  evaluation batches of ``data.name`` in stored order (one process: with the incomplete last one)."""
  return process_batches(
    examples(config, split),
    config,
    shard_index=shard_index,
    shard_count=shard_count,
    drop_remainder=_is_train(split),
  )


def to_iterator(ds: grain.MapDataset, config: mlc.ConfigDict) -> grain.DatasetIterator:
  """A checkpointable iterator (``get_state`` / ``set_state``), multiprocess if ``data.worker_count > 0``."""
  read = grain.ReadOptions(
    num_threads=int(config.data.get("read_threads", 2)),
    prefetch_buffer_size=int(config.data.get("prefetch_batches", 4)),
  )
  it_ds = ds.to_iter_dataset(read)
  workers = int(config.data.worker_count)
  if workers > 0:
    # Grain's worker processes read absl flags, which raise unless parsed (we are not under absl.app).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it_ds)


def make_iterator(config: mlc.ConfigDict, split: str = "train", **kwargs) -> grain.DatasetIterator:
  """:func:`make_dataset` (same keyword arguments) as a checkpointable iterator."""
  return to_iterator(make_dataset(config, split, **kwargs), config)
