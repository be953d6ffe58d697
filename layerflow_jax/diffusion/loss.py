"""Training-side diffusion: task sampling, noising with given clips kept clean, masked v-loss, prompt dropout.

Packed latents are [B, F, h, w, c] with F = num_clips * frames_per_clip; ``given_frames`` [B, F] marks the
frames of clips the example's task gives (they stay clean and are left out of the loss).
"""

from __future__ import annotations

from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from layerflow_jax import layers
from layerflow_jax.diffusion.schedule import Schedule, add_noise, v_target


def sample_tasks(rng: jax.Array, batch_size: int, task_probs) -> jnp.ndarray:
  """int32 [B] task ids drawn from ``task_probs`` [num_tasks] (``layers.TASK_NAMES`` order; zeros allowed)."""
  probs = jnp.asarray(task_probs, jnp.float32)
  logits = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
  return jax.random.categorical(rng, logits, shape=(batch_size,)).astype(jnp.int32)


def given_frames_for(task_ids: jnp.ndarray, given_table, frames_per_clip: int) -> jnp.ndarray:
  """bool [B, num_clips * frames_per_clip]: the frames of the clips each example's task gives.

  ``given_table`` is ``layers.given_table(layout)``, bool [num_tasks, num_clips].
  """
  per_clip = jnp.asarray(given_table, bool)[task_ids]
  return cast(jnp.ndarray, layers.clip_time_mask(per_clip, frames_per_clip))  # jnp in, jnp out


def loss_frames_for(
  given_frames: jnp.ndarray, valid_frames: jnp.ndarray | np.ndarray | None = None
) -> jnp.ndarray:
  """bool [B, F]: frames in the loss = not given (and valid, when a validity mask is passed)."""
  out = ~given_frames
  return out if valid_frames is None else out & valid_frames


def _frame_mask(frames: jnp.ndarray, ndim: int) -> jnp.ndarray:
  return frames.reshape(frames.shape + (1,) * (ndim - frames.ndim))


def keep_given(x: jnp.ndarray, clean: jnp.ndarray, given_frames: jnp.ndarray) -> jnp.ndarray:
  """x with the given frames replaced by ``clean`` (exact copies)."""
  return jnp.where(_frame_mask(given_frames, x.ndim), clean, x)


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int, power: float = 1.0) -> jnp.ndarray:
  """int32 [B] timesteps in {0..N-1}: t = floor(N · u^(1/power)), u ~ U[0, 1). ``power`` 1 is uniform (the
  paper); above 1 the density of t/N is power · x^(power-1), i.e. weighted towards high noise, where a sample's
  layout and motion are decided (stage 2: stillness)."""
  if power == 1.0:  # the same draws as before the option existed: a default run's trajectory is unchanged
    return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  u = jax.random.uniform(rng, (batch_size,), jnp.float32) ** (1.0 / power)
  return jnp.minimum(jnp.floor(u * num_timesteps), num_timesteps - 1).astype(jnp.int32)


def noisy_input(
  rng: jax.Array, x0: jnp.ndarray, given_frames: jnp.ndarray, sched: Schedule, *, timestep_power: float = 1.0
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(x_t, t, eps): t from :func:`sample_timesteps` int32 [B], eps ~ N(0, 1), x_t = add_noise(x0, eps, t).

  The given frames of x_t are exact copies of x0 (no noise).
  """
  rng_t, rng_eps = jax.random.split(rng)
  t = sample_timesteps(rng_t, x0.shape[0], sched.num_train_timesteps, timestep_power)
  eps = jax.random.normal(rng_eps, x0.shape, jnp.float32).astype(x0.dtype)
  x_t = add_noise(x0, eps, t, sched).astype(x0.dtype)
  return keep_given(x_t, x0, given_frames), t, eps


class MaskedLoss(NamedTuple):
  """``loss``: scalar; ``per_clip`` [num_clips]: mean loss per clip over the examples where it is in the loss
  (0 where none is); ``clip_counts`` [num_clips] int32: how many examples have that clip in the loss."""

  loss: jnp.ndarray
  per_clip: jnp.ndarray
  clip_counts: jnp.ndarray


def masked_v_loss(
  v_pred: jnp.ndarray,
  x0: jnp.ndarray,
  eps: jnp.ndarray,
  t: jnp.ndarray,
  loss_frames: jnp.ndarray,
  *,
  sched: Schedule,
  num_clips: int,
) -> MaskedLoss:
  """Mean squared v error over the elements of frames where ``loss_frames`` [B, F] is True.

  Equals CogVideoX's x0 loss weighted by 1 / (1 - a_t): with x0_hat = sqrt(a) x_t - sqrt(1 - a) v_pred and the
  same identity for the true x0 and v, x0_hat - x0 = -sqrt(1 - a) (v_pred - v), so
  |x0_hat - x0|^2 / (1 - a) = |v_pred - v|^2. The v form never divides by 1 - a_t (tiny at t = 0).
  Computed in float32; elements are weighted equally across the batch.
  """
  b, f = loss_frames.shape
  v = v_target(x0.astype(jnp.float32), eps.astype(jnp.float32), t, sched)
  sq = jnp.square(v_pred.astype(jnp.float32) - v)
  per_frame = sq.reshape(b, f, -1).mean(axis=-1)  # [B, F]
  m = loss_frames.astype(jnp.float32)
  loss = jnp.sum(per_frame * m) / jnp.maximum(jnp.sum(m), 1.0)
  clip_sum = (per_frame * m).reshape(b, num_clips, f // num_clips).sum(axis=(0, 2))
  clip_frames = m.reshape(b, num_clips, f // num_clips)
  per_clip = clip_sum / jnp.maximum(clip_frames.sum(axis=(0, 2)), 1.0)
  clip_counts = jnp.any(clip_frames > 0, axis=2).sum(axis=0).astype(jnp.int32)
  return MaskedLoss(loss, per_clip, clip_counts)


def drop_prompts(rng: jax.Array, text_emb: jnp.ndarray, p: float) -> jnp.ndarray:
  """Zero each example's whole text embedding [B, T, D] with probability ``p`` (unconditional = zeros)."""
  keep = jax.random.bernoulli(rng, 1.0 - p, (text_emb.shape[0],))
  return jnp.where(_frame_mask(keep, text_emb.ndim), text_emb, jnp.zeros_like(text_emb))


def task_probs_from_config(diffusion_cfg) -> np.ndarray:
  """float32 [num_tasks] probabilities from ``config.diffusion.task_weights`` (TASK_NAMES order)."""
  return layers.task_weights_vector(dict(diffusion_cfg.task_weights))
