"""Everything a config implies, built once: encoders, model description, schedule, mesh, optimizer, state.

``Experiment(config)`` is shared by the trainer, the sampler, evaluation and export, so all of them interpret a
config the same way. The train state is a flat-dict pytree (see :mod:`layerflow_jax.train.partition`):

* ``frozen``  — parameters that are not (wholly) trainable, full leaves;
* ``trainable`` — the trainable values (whole leaves or selected block rows);
* ``opt_state`` — optax state for ``trainable`` only; ``ema`` — an EMA of ``trainable`` (or empty);
* ``fp8`` — the delayed-scaling state of the FP8 GEMMs (``model.precision``: scales and amax histories,
  :mod:`layerflow_jax.model.fp8`; empty without FP8 GEMMs), replicated;
* ``step`` and ``rng``.

Parameters are created already sharded: ``init_state`` is a ``jax.jit`` with ``out_shardings`` derived from the
logical names through the rules table.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import spec as spec_lib
from layerflow_jax import codec as codec_lib
from layerflow_jax import layers
from layerflow_jax import sharding as shd
from layerflow_jax import text as text_lib
from layerflow_jax.diffusion import schedule as schedule_lib
from layerflow_jax.model import dit
from layerflow_jax.model import fp8 as fp8_lib
from layerflow_jax.train import partition


@struct.dataclass
class TrainState:
  step: jax.Array
  frozen: dict
  trainable: dict
  opt_state: Any
  ema: dict
  rng: jax.Array
  fp8: dict


LR_SCHEDULES = ("cosine", "constant")


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warm-up, cosine (or constant) decay, global-norm clipping and a non-finite guard."""
  steps, warmup = int(train_cfg.steps), int(train_cfg.warmup_steps)
  if train_cfg.lr_schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
      0.0,
      train_cfg.lr,
      warmup_steps=max(warmup, 1),
      decay_steps=max(steps, warmup + 1),
      end_value=train_cfg.lr * train_cfg.min_lr_ratio,
    )
  elif train_cfg.lr_schedule == "constant":
    lr = optax.join_schedules(
      [optax.linear_schedule(0.0, train_cfg.lr, max(warmup, 1)), optax.constant_schedule(train_cfg.lr)],
      [max(warmup, 1)],
    )
  else:
    raise ValueError(f"train.lr_schedule={train_cfg.lr_schedule!r}: unknown; expected one of {LR_SCHEDULES}")
  chain = []
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  chain.append(optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay))
  opt = optax.chain(*chain)
  # Skip (and count) updates whose gradients are not finite. optax would apply updates again after its limit,
  # so its limit is never reached; the trainer stops the run itself (train.max_consecutive_nonfinite).
  opt = optax.apply_if_finite(opt, max_consecutive_errors=2**30)
  return opt, lr


class Experiment:
  """The objects a config describes. ``mesh`` defaults to one built from ``config.mesh`` over all devices."""

  def __init__(self, config: mlc.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.layout = layers.get_layout(config.layout)
    self.text_encoder = text_lib.make_text_encoder(config.text_encoder)
    self.codec = codec_lib.make_codec(config.autoencoder)
    d = config.data
    self.latent_shape = self.codec.latent_shape(d.frames, d.height, d.width)  # (t, h, w, c) per clip
    self.model_cfg = dit.DiTConfig.from_config(config)
    p = self.model_cfg.patch_size
    if self.latent_shape[1] % p or self.latent_shape[2] % p:
      raise ValueError(
        f"data.height/width {d.height}x{d.width}: latent size {self.latent_shape[1]}x"
        f"{self.latent_shape[2]} is not divisible by model.patch_size {p}"
      )
    self.schedule = schedule_lib.make_schedule(config.diffusion)
    self.task_probs = layers.task_weights_vector(dict(config.diffusion.task_weights))
    # A curriculum: the first `curriculum_steps` steps draw tasks from `curriculum_weights` instead.
    self.curriculum_steps = int(config.diffusion.curriculum_steps)
    self.curriculum_probs = (
      layers.task_weights_vector(dict(config.diffusion.curriculum_weights))
      if self.curriculum_steps > 0
      else self.task_probs
    )
    self.given_table = layers.given_table(self.layout)
    # bool [num_tasks, packed latent frames]: what each task gives, frame by frame (lead frames, overrides)
    self.given_frame_table = layers.given_frame_table(
      self.layout,
      self.latent_shape[0],
      self.model_cfg.lead_frames,
      {k: list(v) for k, v in dict(config.diffusion.given_latent_frames).items()},
    )
    self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
    self.optimizer, self.lr_schedule = make_optimizer(config.train)

    self.derive_from_model_cfg()

  def derive_from_model_cfg(self) -> None:
    """Everything that follows from ``self.model_cfg``: graph, abstract parameters, their partition specs and
    the trainable selection (again after a subclass changes the model description)."""
    self.graphdef, abstract_state = nnx.split(dit.abstract_model(self.model_cfg))
    self.abstract_params = partition.flatten(abstract_state.to_pure_dict())
    logical = partition.flatten(nnx.get_partition_spec(abstract_state).to_pure_dict())
    self.param_specs = {k: shd.logical_to_spec(tuple(v), shd.LOGICAL_AXIS_RULES) for k, v in logical.items()}
    self.selection = partition.select(
      self.abstract_params,
      self.config.train.trainable,
      num_layers=self.model_cfg.num_layers,
      adapters=list(self.config.train.trainable_adapters),
    )

  @property
  def first_backward_block(self) -> int:
    """The first block a training step runs backward through: the lowest block with a trainable value, or 0 when
    something before the blocks trains (embeddings, projections). Blocks before it are frozen and their inputs need
    no gradient, so the FP8 state of their GEMMs (and the text projection's) stays out of the gradient."""
    blocks = {a.name: min(a.blocks) for a in self.model_cfg.adapters}
    first = self.model_cfg.num_layers
    for path, rows in self.selection.items():
      parts = path.split(partition.SEP)
      if parts[0] == "blocks":
        first = min(first, 0 if rows is None else min(rows))
      elif parts[0] == "adapters":
        first = min(first, blocks[parts[1]])
      else:
        return 0
    return first

  # ------------------------------------------------------------------ shapes and shardings

  @property
  def latent_frames(self) -> int:
    return self.latent_shape[0]

  @property
  def use_ema(self) -> bool:
    return float(self.config.train.ema_decay) > 0

  @functools.cached_property
  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch (:func:`data_pipelines.spec.batch_spec`), sharded over this mesh's batch axes."""
    return spec_lib.batch_spec(self.config, self.mesh, latent_shape=self.latent_shape)

  def _sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def state_shardings(self, abstract_state: TrainState) -> TrainState:
    ps = {k: self._sharding(v) for k, v in self.param_specs.items()}
    rep = self._sharding(P())
    trainable = {k: ps[k] for k in abstract_state.trainable}
    opt = optax.tree_map_params(
      self.optimizer, lambda _, s: s, abstract_state.opt_state, trainable, transform_non_params=lambda _: rep
    )
    # The same tree with shardings for leaves (a TrainState is a pytree; its annotations name the arrays).
    return TrainState(
      step=rep,  # pyright: ignore[reportArgumentType]
      frozen={k: ps[k] for k in abstract_state.frozen},
      trainable=trainable,
      opt_state=opt,
      ema={k: ps[k] for k in abstract_state.ema},
      rng=rep,  # pyright: ignore[reportArgumentType]
      fp8=jax.tree.map(lambda _: rep, abstract_state.fp8),
    )

  # ------------------------------------------------------------------ state

  def split_params(self, flat_params: dict) -> tuple[dict, dict]:
    """(frozen, trainable) from a full flat parameter dict."""
    whole = {p for p, rows in self.selection.items() if rows is None}
    frozen = {k: v for k, v in flat_params.items() if k not in whole}
    return frozen, partition.split(flat_params, self.selection)

  def full_params(self, state: TrainState, use_ema: bool | None = None) -> dict:
    use_ema = self.use_ema if use_ema is None else use_ema
    trainable = state.ema if (use_ema and state.ema) else state.trainable
    return partition.combine(state.frozen, trainable, self.selection)

  def _init_params(self, seed: int) -> dict:
    with nnx.use_eager_sharding(False):
      model = dit.LayerFlowDiT(self.model_cfg, rngs=nnx.Rngs(seed))
    return partition.flatten(nnx.state(model).to_pure_dict())

  def state_from_params(self, flat_params: dict, rng: jax.Array) -> TrainState:
    frozen, trainable = self.split_params(flat_params)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      frozen=frozen,
      trainable=trainable,
      opt_state=self.optimizer.init(trainable),
      ema=dict(trainable) if self.use_ema else {},
      rng=rng,
      fp8=fp8_lib.init_state(self.model_cfg.precision, self.model_cfg.num_layers),
    )

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(lambda: self.state_from_params(self._init_params(0), jax.random.key(0)))

  def init_state(self, seed: int | None = None, params: dict | None = None) -> TrainState:
    """A fresh sharded state (parameters from ``params`` when given, e.g. the previous stage's)."""
    seed = int(self.config.seed if seed is None else seed)
    shardings = self.state_shardings(self.abstract_state())

    if params is None:
      fn = lambda: self.state_from_params(self._init_params(seed), jax.random.key(seed))
      with shd.use_mesh(self.mesh):
        return jax.jit(fn, out_shardings=shardings)()
    missing = sorted(set(self.abstract_params) - set(params))
    if missing:
      init = self._init_params(seed)  # parameters the source lacks (e.g. new adapters) start at init
      params = {**{k: init[k] for k in missing}, **params}
    extra = sorted(set(params) - set(self.abstract_params))
    if extra:
      raise ValueError(f"parameters not in this model: {extra[:8]}{' …' if len(extra) > 8 else ''}")
    for k, v in params.items():
      want = self.abstract_params[k].shape
      if tuple(v.shape) != tuple(want):
        raise ValueError(f"parameter {k}: shape {tuple(v.shape)} does not match the model's {tuple(want)}")
    with shd.use_mesh(self.mesh):
      return jax.jit(lambda p: self.state_from_params(p, jax.random.key(seed)), out_shardings=shardings)(
        params
      )

  def model(self, flat_params: dict) -> dit.LayerFlowDiT:
    """An NNX model view over (possibly traced) flat parameters."""
    return nnx.merge(self.graphdef, partition.unflatten(flat_params))

  # ------------------------------------------------------------------ conditioning

  def task_probs_at(self, step):
    """Task probabilities at (possibly traced) ``step``: the curriculum's before ``curriculum_steps``."""
    if self.curriculum_steps <= 0:
      return jnp.asarray(self.task_probs)
    return jnp.where(
      step < self.curriculum_steps, jnp.asarray(self.curriculum_probs), jnp.asarray(self.task_probs)
    )

  def encode_text(self, tokens):
    """int32 [B, P, L] → [B, P·L, D] (each prompt encoded on its own, concatenated)."""
    b, p, l = tokens.shape
    return self.text_encoder.encode(tokens).reshape(b, p * l, -1)

  def encode_video(self, video, rng=None):
    """Packed pixels [B, n·T, H, W, 3] → packed latents [B, lead + n·t, h, w, c]; lead latent frames (the official
    fg2bg/bg2fg RGBA layout) encode the first pixel frame on its own, as the VAE's causal first frame does.

    ``autoencoder.packed_pass``: the whole stack (after ``lead`` copies of its first frame) in one pass, as the
    official code does; ``autoencoder.sample_posterior`` (with it) draws the posterior with ``rng``."""
    ae, lead = self.config.autoencoder, self.model_cfg.lead_frames
    if ae.packed_pass:
      video = jnp.concatenate([video[:, :1]] * lead + [video], axis=1) if lead else video
      if not isinstance(self.codec, codec_lib.PackedAutoencoder):
        return self.codec.encode(video)
      return self.codec.encode_packed(video, rng if ae.sample_posterior else None)
    if ae.sample_posterior:
      raise ValueError("autoencoder.sample_posterior needs autoencoder.packed_pass=True")
    z = codec_lib.encode_clips(self.codec, video, self.layout.num_clips)
    lead = self.model_cfg.lead_frames
    if lead:
      first = self.codec.encode(video[:, :1])
      z = jnp.concatenate([first] * lead + [z], axis=1)
    return z

  def decode_video(self, latents):
    """Packed latents [B, lead + n·t, …] → packed pixels [B, n·T, …] (lead frames dropped)."""
    return codec_lib.decode_clips(self.codec, latents[:, self.model_cfg.lead_frames :], self.layout.num_clips)

  def adapter_scales(self, batch: dict) -> dict:
    """Per-sample adapter scales from the batch, as ``config.train.adapter_scale_keys`` maps them."""
    keys = dict(self.config.train.adapter_scale_keys)
    present = {a.name for a in self.model_cfg.adapters}
    return {name: batch[key] for name, key in keys.items() if name in present}
