"""The CogVideoX noise schedule and v-prediction conversions.

Order of operations (checked against diffusers 0.42 ``CogVideoXDDIMScheduler.__init__`` and
``CogVideoXDPMScheduler.__init__``, which agree):

1. scaled-linear betas: ``linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2`` (float64),
2. ``alphas_cumprod = cumprod(1 - betas)``,
3. SNR shift on ``alphas_cumprod``: ``a' = a / (s + (1 - s) a)`` with ``s = snr_shift``,
4. zero terminal SNR: Algorithm 1 of Lin et al. 2023 applied to the *shifted* ``alphas_cumprod``
   (shift ``sqrt(a)`` so its last value is 0, scale so its first value is unchanged, square).

So diffusers shifts first and then rescales (as LAYERFLOW.md says); it does not rescale betas before the
shift. Because the rescale comes last, ``alphas_cumprod[N - 1]`` is exactly 0.0. Everything is computed in
float64 (as diffusers does) and stored as float32.

Conventions: ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` and ``v = sqrt(a) eps - sqrt(1 - a) x0`` with
``a = alphas_cumprod[t]``; ``t`` is an int32 [B] array broadcast over the remaining dims.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Cumulative alpha products [num_train_timesteps] (float32 NumPy).

  Hashed by identity so it can be a static argument of ``jax.jit``. ``final_alpha_cumprod`` is the alpha
  product used after the last sampling step (diffusers ``set_alpha_to_one=True`` → 1.0).
  """

  alphas_cumprod: np.ndarray
  num_train_timesteps: int
  final_alpha_cumprod: float = 1.0
  # float64 alpha products after the SNR shift and before the zero-SNR rescale (the official SAT sampler
  # rescales its sub-sampled steps itself); None when the schedule was built from alpha products alone.
  shifted_alphas_cumprod: np.ndarray | None = None


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def alphas_cumprod_f64(
  num_train_timesteps: int = 1000,
  beta_start: float = 0.00085,
  beta_end: float = 0.012,
  snr_shift: float = 3.0,
  zero_terminal_snr: bool = True,
) -> np.ndarray:
  """float64 ``alphas_cumprod`` of CogVideoX: scaled-linear → cumprod → SNR shift → zero-SNR rescale."""
  betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
  ac = np.cumprod(1.0 - betas)
  ac = ac / (snr_shift + (1.0 - snr_shift) * ac)
  if zero_terminal_snr:
    ac = rescale_zero_terminal_snr(ac)
  return ac


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1, on alpha products: sqrt(a) mapped affinely so a[-1] = 0, a[0] kept."""
  s = np.sqrt(alphas_cumprod)
  s0, s_last = s[0], s[-1]
  s = (s - s_last) * (s0 / (s0 - s_last))
  return s**2


def make_schedule(diffusion_cfg: Any) -> Schedule:
  """Schedule from ``config.diffusion``.

  Keys: num_train_timesteps, beta_start, beta_end, snr_shift, zero_terminal_snr.
  """
  n = int(_cfg_get(diffusion_cfg, "num_train_timesteps", 1000))
  kw: dict[str, Any] = dict(
    num_train_timesteps=n,
    beta_start=float(_cfg_get(diffusion_cfg, "beta_start", 0.00085)),
    beta_end=float(_cfg_get(diffusion_cfg, "beta_end", 0.012)),
    snr_shift=float(_cfg_get(diffusion_cfg, "snr_shift", 3.0)),
  )
  ac = alphas_cumprod_f64(**kw, zero_terminal_snr=bool(_cfg_get(diffusion_cfg, "zero_terminal_snr", True)))
  return Schedule(
    alphas_cumprod=ac.astype(np.float32),
    num_train_timesteps=n,
    shifted_alphas_cumprod=alphas_cumprod_f64(**kw, zero_terminal_snr=False),
  )


# ----------------------------------------------------------------------------- conversions


def _bcast(a: jnp.ndarray, ndim: int) -> jnp.ndarray:
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def alpha_sigma(t: jnp.ndarray, sched: Schedule, ndim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sqrt(a_t), sqrt(1 - a_t)) in float32, shaped [B, 1, ..., 1] with ``ndim`` dims."""
  a = jnp.asarray(sched.alphas_cumprod, jnp.float32)[jnp.asarray(t, jnp.int32)]
  return _bcast(jnp.sqrt(a), ndim), _bcast(jnp.sqrt(1.0 - a), ndim)


def add_noise(x0: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
  al, sg = alpha_sigma(t, sched, x0.ndim)
  return al * x0 + sg * eps


def v_target(x0: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """v = sqrt(a) eps - sqrt(1 - a) x0 (diffusers ``get_velocity``)."""
  al, sg = alpha_sigma(t, sched, x0.ndim)
  return al * eps - sg * x0


def x0_from_v(x_t: jnp.ndarray, v: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """x0 = sqrt(a) x_t - sqrt(1 - a) v (stable for every t)."""
  al, sg = alpha_sigma(t, sched, x_t.ndim)
  return al * x_t - sg * v


def eps_from_v(x_t: jnp.ndarray, v: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """eps = sqrt(a) v + sqrt(1 - a) x_t (stable for every t)."""
  al, sg = alpha_sigma(t, sched, x_t.ndim)
  return al * v + sg * x_t


def v_from_x0(x_t: jnp.ndarray, x0: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """v = (sqrt(a) x_t - x0) / sqrt(1 - a) (divides by sqrt(1 - a_t), smallest at t = 0)."""
  al, sg = alpha_sigma(t, sched, x_t.ndim)
  return (al * x_t - x0) / sg


def v_from_eps(x_t: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """v = (eps - sqrt(1 - a) x_t) / sqrt(a) (undefined at the zero-SNR step t = N - 1)."""
  al, sg = alpha_sigma(t, sched, x_t.ndim)
  return (eps - sg * x_t) / al


def x0_loss_weight(t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """CogVideoX's x0-loss weight 1 / (1 - a_t), float32 [B] (equal to 1 at the zero-SNR step)."""
  a = jnp.asarray(sched.alphas_cumprod, jnp.float32)[jnp.asarray(t, jnp.int32)]
  return 1.0 / (1.0 - a)
