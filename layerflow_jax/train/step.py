"""The compiled train and eval steps (one of each for every stage: stages differ only by config).

Train step: encode text and clips → draw each example's task → noise the generated clips, keep the given ones
clean → model velocity → masked v-loss (given and missing clips excluded) → gradients of the trainable values only
(averaged over ``grad_accum`` micro-batches) → optax update (non-finite updates skipped) → EMA. With FP8 GEMMs
(``model.precision``) the state's ``fp8`` scales and amax histories come back as the "gradient" of that tree
(flax's overwrite-with-gradient) and replace it: micro-batch by micro-batch, and not on a non-finite step.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
import optax

from layerflow_jax import layers
from layerflow_jax import sharding as shd
from layerflow_jax.diffusion import loss as loss_lib
from layerflow_jax.model import fp8 as fp8_lib
from layerflow_jax.train import partition
from layerflow_jax.train.experiment import Experiment, TrainState


def _valid_frames(exp: Experiment, batch, frames_per_clip: int):
  valid = batch.get("clip_valid")
  if valid is None:
    return None
  return layers.clip_time_mask(valid.astype(bool), frames_per_clip)


def diffusion_loss(
  exp: Experiment,
  flat_params: dict,
  batch: dict,
  rng: jax.Array,
  *,
  train: bool,
  task_ids=None,
  step=None,
  fp8=None,
):
  """Loss and metrics for one (micro-)batch. ``task_ids`` [B] overrides the drawn tasks (evaluation); ``step``
  selects the task curriculum's weights while training; ``fp8`` is the FP8 GEMMs' delayed-scaling state (None:
  current scaling)."""
  cfg = exp.config
  rng_task, rng_drop, rng_noise = jax.random.split(rng, 3)
  # A latent-cache batch (data.cached) carries the encoder outputs already.
  x0 = batch["latents"] if "latents" in batch else exp.encode_video(batch["video"])
  x0 = shd.constrain(x0, ("batch", None, None, None, None))
  text = batch["text"] if "text" in batch else exp.encode_text(batch["tokens"])
  if train and cfg.diffusion.prompt_dropout > 0:
    text = loss_lib.drop_prompts(rng_drop, text, float(cfg.diffusion.prompt_dropout))
  b = x0.shape[0]
  if task_ids is None:
    probs = exp.task_probs if step is None else exp.task_probs_at(step)
    task_ids = loss_lib.sample_tasks(rng_task, b, probs)
  given = jnp.asarray(exp.given_frame_table, bool)[task_ids]  # per frame: lead frames, frame overrides
  loss_frames = loss_lib.loss_frames_for(given, _valid_frames(exp, batch, exp.latent_frames))
  x_t, t, eps = loss_lib.noisy_input(
    rng_noise, x0, given, exp.schedule, timestep_power=float(cfg.diffusion.timestep_power) if train else 1.0
  )
  model = exp.model(flat_params)
  v = model(x_t, t, text, adapter_scales=exp.adapter_scales(batch), given_frames=given, fp8=fp8)
  out = loss_lib.masked_v_loss(v, x0, eps, t, loss_frames, sched=exp.schedule, num_clips=exp.layout.num_clips)
  metrics = {"loss": out.loss}
  for i, name in enumerate(exp.layout.clips):
    metrics[f"loss_{name}"] = out.per_clip[i]
    metrics[f"count_{name}"] = out.clip_counts[i]
  return out.loss, metrics


def _micro_batches(batch: dict, k: int) -> dict:
  return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def train_step(exp: Experiment, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  k = int(exp.config.train.grad_accum)
  rng, step_rng = jax.random.split(state.rng)

  # The FP8 state of the frozen blocks before the first trained one stays out of the gradient: differentiating it
  # would run those blocks' backward only to record their output gradients' amax (stage 3: 5 of 30 blocks).
  held, fp8_state = fp8_lib.split_at(state.fp8, exp.first_backward_block)
  held = jax.lax.stop_gradient(held)

  def loss_fn(trainable, fp8, micro, r):
    params = partition.combine(state.frozen, trainable, exp.selection)
    return diffusion_loss(
      exp, params, micro, r, train=True, step=state.step, fp8=fp8_lib.for_model(held, fp8)
    )

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  if k == 1:
    (_, metrics), (grads, fp8_new) = grad_fn(state.trainable, fp8_state, batch, step_rng)
    fp8 = fp8_lib.updated(fp8_state, fp8_new)
  else:
    micro = _micro_batches(batch, k)

    def acc(carry, xs):
      g_sum, m_sum, fp8 = carry
      mb, r = xs
      (_, m), (g, fp8_new) = grad_fn(state.trainable, fp8, mb, r)
      return (
        jax.tree.map(jnp.add, g_sum, g),
        jax.tree.map(jnp.add, m_sum, m),
        fp8_lib.updated(fp8, fp8_new),
      ), None

    zeros_g = jax.tree.map(jnp.zeros_like, state.trainable)
    m_shape = jax.eval_shape(
      lambda: grad_fn(state.trainable, fp8_state, jax.tree.map(lambda x: x[0], micro), step_rng)[0][1]
    )
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, metrics, fp8), _ = jax.lax.scan(
      acc, (zeros_g, zeros_m, fp8_state), (micro, jax.random.split(step_rng, k))
    )
    grads = jax.tree.map(lambda g: g / k, grads)
    metrics = {n: (v / k if not n.startswith("count_") else v) for n, v in metrics.items()}

  updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  ema = state.ema
  if exp.use_ema:
    d = float(exp.config.train.ema_decay)
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, trainable)
  metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
  # A skipped (non-finite) step keeps the FP8 scales too: an Inf amax would hold them for a whole history.
  fp8 = jax.tree.map(lambda new, old: jnp.where(jnp.isfinite(metrics["grad_norm"]), new, old), fp8, fp8_state)
  fp8 = fp8_lib.stacked(held, fp8)
  metrics["param_norm"] = optax.tree_utils.tree_norm(trainable)
  metrics["lr"] = exp.lr_schedule(state.step)
  finite_state = typing.cast(
    optax.ApplyIfFiniteState, opt_state
  )  # the optimizer is wrapped in apply_if_finite
  metrics["skipped_nonfinite"] = finite_state.total_notfinite
  metrics["nonfinite_in_a_row"] = finite_state.notfinite_count
  new_state = dataclasses.replace(
    state, step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema, rng=rng, fp8=fp8
  )
  return new_state, metrics


def eval_losses(exp: Experiment, flat_params: dict, batch: dict, rng: jax.Array) -> dict:
  """Validation loss per task with fixed noise (``rng``), so values are comparable across checkpoints."""
  b = batch["video"].shape[0]
  out = {}
  total = 0.0
  for i, task in enumerate(layers.TASK_NAMES):
    ids = jnp.full((b,), i, jnp.int32)
    loss, _ = diffusion_loss(exp, flat_params, batch, jax.random.fold_in(rng, i), train=False, task_ids=ids)
    out[f"val_loss_{task}"] = loss
    total = total + loss * exp.task_probs[i]
  out["val_loss"] = total
  return out


def compile_train_step(exp: Experiment, state_shardings, batch_shardings):
  return jax.jit(
    functools.partial(train_step, exp),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )


def compile_eval(exp: Experiment):
  return jax.jit(functools.partial(eval_losses, exp))
