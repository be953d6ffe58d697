"""Samplers: CogVideoX DDIM and DPM-Solver++(2M) with classifier-free guidance and given (clean) clips.

Both follow diffusers 0.42 step for step (``CogVideoXDDIMScheduler.step`` /
``CogVideoXDPMScheduler.step``, v-prediction, trailing spacing, ``set_alpha_to_one=True``), including two
diffusers quirks:

* the "previous" timestep of a step is ``t - N // num_steps`` (not the next entry of the timestep list;
  the two differ when N is not a multiple of num_steps). When that is negative the final alpha product
  (1.0) is used, which makes the last step return the x0 prediction. For a few step counts (e.g. 6, 7) the
  last previous timestep is 0, so the last sample keeps a little noise, exactly as in diffusers.
* ``dpmpp_2m`` is CogVideoX's *stochastic* DPM-Solver++(2M): every step adds fresh Gaussian noise scaled by
  ``sqrt(1 - a_prev) sqrt(1 - exp(-2h))`` (zero on the last step); diffusers ignores ``eta`` there. The first
  step and the step landing on t < 0 are first order. So ``dpmpp_2m`` needs ``rng``.

``eta`` applies to DDIM only: eta = 0 is the diffusers update; eta > 0 is the standard DDIM variance
(an extension; diffusers' CogVideoX DDIM ignores eta). Per-step coefficients are computed on the host in
float64 from the static timestep list, and the loop is one ``lax.scan``, so a sampler jits once.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from layerflow_jax.diffusion.schedule import Schedule

VelocityFn = Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, Any]]
SAMPLERS = ("ddim", "dpmpp_2m", "sat_dpmpp_2m")


def timesteps(sched: Schedule, num_steps: int) -> np.ndarray:
  """Trailing spacing (diffusers ``timestep_spacing="trailing"``): int32 [num_steps], from N - 1 down."""
  n = sched.num_train_timesteps
  if not 1 <= num_steps <= n:
    raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
  ratio = n / num_steps
  return (np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1).astype(np.int32)


def prev_timesteps(sched: Schedule, num_steps: int) -> np.ndarray:
  """The "previous" timestep of each step as diffusers computes it: t - N // num_steps (may be negative)."""
  return timesteps(sched, num_steps) - sched.num_train_timesteps // num_steps


def dynamic_guidance(g: float, t: np.ndarray, num_train_timesteps: int) -> np.ndarray:
  """LAYERFLOW.md's dynamic CFG scale 1 + g (1 - cos(pi ((N - t) / N)^5)) / 2 with N = num_train_timesteps.

  (diffusers' CogVideoX pipeline and the official SAT code (``DynamicCFG``) put the number of sampling steps in
  place of N, with t the timestep 999 … 19: a pseudo-random sequence 2.29, 2.54, 6.97, … for 50 steps.)
  """
  n = float(num_train_timesteps)
  return 1.0 + g * (1.0 - np.cos(math.pi * ((n - np.asarray(t, np.float64)) / n) ** 5.0)) / 2.0


def _alphas(sched: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  ac = np.asarray(sched.alphas_cumprod, np.float64)
  ts = timesteps(sched, num_steps)
  prev = prev_timesteps(sched, num_steps)
  a_t = ac[ts]
  a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], float(sched.final_alpha_cumprod))
  return ts, a_t, a_p


def ddim_coefficients(sched: Schedule, num_steps: int, eta: float = 0.0) -> dict[str, np.ndarray]:
  """Per-step float64 coefficients of x_prev = A x + B x0_hat + D z (C = 0).

  eta = 0: A = sqrt((1 - a_prev) / (1 - a_t)), B = sqrt(a_prev) - sqrt(a_t) A (the CogVideoX a_t / b_t form).
  """
  ts, a_t, a_p = _alphas(sched, num_steps)
  var = (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
  sigma = eta * np.sqrt(np.maximum(var, 0.0))
  a = np.sqrt(np.maximum(1.0 - a_p - sigma**2, 0.0) / (1.0 - a_t))
  b = np.sqrt(a_p) - np.sqrt(a_t) * a
  return dict(t=ts, a_t=a_t, A=a, B=b, C=np.zeros_like(a), D=sigma)


def _lam(a: np.ndarray) -> np.ndarray:
  """Half log-SNR, log sqrt(a / (1 - a)) (-inf at a = 0, +inf at a = 1)."""
  with np.errstate(divide="ignore"):
    return np.log(np.sqrt(a / (1.0 - a)))


def dpmpp_2m_coefficients(sched: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  """Per-step float64 coefficients of x_prev = A x + B x0_hat + C x0_hat_prev_step + D z.

  Follows CogVideoXDPMScheduler.

  h = lam(a_prev) - lam(a_t); A = sqrt((1 - a_prev) / (1 - a_t)) e^-h; m2 = expm1(-2h) sqrt(a_prev);
  D = sqrt(1 - a_prev) sqrt(1 - e^-2h). First order (B = -m2, C = 0) on the first step and where
  t - N // n < 0; otherwise r = (lam(a_t) - lam(a_back)) / h with a_back at the previous list timestep,
  B = -m2 (1 + 1/(2r)), C = m2 / (2r). Infinite log-SNRs at a = 0 / a = 1 resolve to finite
  coefficients, as in torch.
  """
  ts, a_t, a_p = _alphas(sched, num_steps)
  ac = np.asarray(sched.alphas_cumprod, np.float64)
  prev = prev_timesteps(sched, num_steps)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    lam_t, lam_p = _lam(a_t), _lam(a_p)
    h = lam_p - lam_t
    a = np.sqrt((1.0 - a_p) / (1.0 - a_t)) * np.exp(-h)
    m2 = np.expm1(-2.0 * h) * np.sqrt(a_p)
    d = np.sqrt(1.0 - a_p) * np.sqrt(1.0 - np.exp(-2.0 * h))
    b, c = -m2, np.zeros_like(m2)
    for i in range(1, num_steps):
      if prev[i] < 0:
        continue
      r = (lam_t[i] - _lam(ac[ts[i - 1]])) / h[i]
      b[i] = -m2[i] * (1.0 + 1.0 / (2.0 * r))
      c[i] = m2[i] * (1.0 / (2.0 * r))
  coefs = dict(t=ts, a_t=a_t, A=a, B=b, C=c, D=d)
  bad = [k for k, v in coefs.items() if not np.all(np.isfinite(v))]
  if bad:
    raise ValueError(f"non-finite DPM-Solver++(2M) coefficients {bad} for num_steps={num_steps}")
  return coefs


def sat_dpmpp_2m_coefficients(sched: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  """Per-step float64 coefficients of the official SAT sampler (``VPSDEDPMPP2MSampler``), as ``x_prev = A x +
  B x0_hat + C x0_hat_prev_step + D z``.

  Steps: ``linspace(N - 1, 0, num_steps, endpoint=False)`` as ints (999, 979, …, 19 for 50). Its sqrt(alpha)
  per step is zero-SNR-rescaled on the *sub-sampled* array of the SNR-shifted schedule (anchors: the smallest
  step keeps its value, the largest becomes 0), with 1 appended after the last step. With a, n, p the values of
  this, the next and the previous step: lam(s) = log(s / sqrt(1 - s^2)), h = lam(n) - lam(a),
  A = sqrt((1 - n^2) / (1 - a^2)) e^-h, m2 = expm1(-2h) n, D = sqrt(1 - n^2) sqrt(1 - e^-2h); first step
  B = -m2, C = 0; then r = (lam(a) - lam(p)) / h, B = -m2 (1 + 1/(2r)), C = m2 / (2r); the last step returns x0
  (A = 0, B = 1, D = 0). The network gets the step's timestep ``t``; the denoiser snaps each sqrt(alpha) to the
  nearest value of the full (rescaled) table, at step ``t_x0`` (for 50 steps: t, or t - 1 for the last 8 steps,
  t <= 159), whose ``a_t`` gives x0 = sqrt(a_t) x - sqrt(1 - a_t) v.
  """
  n = sched.num_train_timesteps
  if sched.shifted_alphas_cumprod is None:
    raise ValueError(
      "sat_dpmpp_2m needs the schedule's alpha products before the zero-SNR rescale "
      "(Schedule.shifted_alphas_cumprod; make_schedule keeps them)"
    )
  if not 2 <= num_steps <= n:
    raise ValueError(f"num_steps must be in [2, {n}], got {num_steps}")
  ts = np.linspace(n - 1, 0, num_steps, endpoint=False).astype(np.int64)  # descending
  s = np.sqrt(np.asarray(sched.shifted_alphas_cumprod, np.float64)[ts[::-1]])  # ascending t
  s = (s - s[-1]) * (s[0] / (s[0] - s[-1]))
  s = np.concatenate([s[::-1], [1.0]])  # per step (descending t), then 1
  full = np.sqrt(np.asarray(sched.alphas_cumprod, np.float64))
  t_x0 = np.abs(s[:num_steps, None] - full[None]).argmin(axis=1)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    lam = lambda v: np.log(v / np.sqrt(1.0 - v**2))
    a, nx = s[:num_steps], s[1:]
    h = lam(nx) - lam(a)
    A = np.sqrt((1.0 - nx**2) / (1.0 - a**2)) * np.exp(-h)
    m2 = np.expm1(-2.0 * h) * nx
    D = np.sqrt(1.0 - nx**2) * np.sqrt(1.0 - np.exp(-2.0 * h))
    B, C = -m2, np.zeros_like(m2)
    for i in range(1, num_steps - 1):
      inv_2r = h[i] / (2.0 * (lam(a[i]) - lam(s[i - 1])))  # 1 / (2r); 0 when the previous step is at SNR 0
      B[i], C[i] = -m2[i] * (1.0 + inv_2r), m2[i] * inv_2r
  A[-1], B[-1], C[-1], D[-1] = 0.0, 1.0, 0.0, 0.0
  coefs = dict(t=ts.astype(np.int32), t_x0=t_x0.astype(np.int32), a_t=full[t_x0] ** 2, A=A, B=B, C=C, D=D)
  bad = [k for k, v in coefs.items() if not np.all(np.isfinite(v))]
  if bad:
    raise ValueError(f"non-finite SAT DPM-Solver++(2M) coefficients {bad} for num_steps={num_steps}")
  return coefs


def step_noise(rng: jax.Array, step: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  """The float32 Gaussian noise a stochastic sampler adds at step index ``step`` (fold_in(rng, step))."""
  return jax.random.normal(jax.random.fold_in(rng, step), shape, jnp.float32)


def guided_velocity(v_cond: jnp.ndarray, v_uncond: jnp.ndarray | None, g: jnp.ndarray | None) -> jnp.ndarray:
  """v_u + g (v_c - v_u) in float32; v_c when there is no guidance (g is None)."""
  v_c = v_cond.astype(jnp.float32)
  if g is None:
    return v_c
  assert v_uncond is not None, "guidance (g given) needs v_uncond"
  v_u = v_uncond.astype(jnp.float32)
  return v_u + g * (v_c - v_u)


def sample(
  velocity_fn: VelocityFn,
  x_T: jnp.ndarray,
  *,
  sched: Schedule,
  num_steps: int,
  sampler: str = "ddim",
  guidance_scale: float,
  dynamic_cfg: bool = False,
  dynamic_cfg_steps: int = 0,
  given_latents: jnp.ndarray | None = None,
  given_frames: jnp.ndarray | None = None,
  eta: float = 0.0,
  rng: jax.Array | None = None,
) -> jnp.ndarray:
  """Denoise x_T [B, F, h, w, c] over ``num_steps`` trailing timesteps; returns the final sample.

  ``velocity_fn(x_t, t)`` (t int32 [B]) returns ``(v_cond, v_uncond)``. Guidance: v_u + g (v_c - v_u), with g
  constant or, if ``dynamic_cfg``, :func:`dynamic_guidance` at the current timestep; with
  ``guidance_scale == 1`` v_c is used as is and v_uncond is ignored (it may be None). Given clips: before
  every model call the given frames (``given_frames`` [B, F]) of x_t are set to ``given_latents``, and the
  returned sample holds exactly ``given_latents`` there. Arithmetic is float32; the result has x_T's dtype.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  if (given_latents is None) != (given_frames is None):
    raise ValueError("given_latents and given_frames go together")
  if sampler == "ddim":
    coefs = ddim_coefficients(sched, num_steps, eta)
    stochastic = eta > 0
  elif sampler == "sat_dpmpp_2m":
    if eta:
      raise ValueError(
        "eta applies to the DDIM sampler only (sat_dpmpp_2m is the official stochastic solver)"
      )
    coefs = sat_dpmpp_2m_coefficients(sched, num_steps)
    stochastic = True
  else:
    if eta:
      raise ValueError("eta applies to the DDIM sampler only (dpmpp_2m is CogVideoX's stochastic solver)")
    coefs = dpmpp_2m_coefficients(sched, num_steps)
    stochastic = True
  if stochastic and rng is None:
    raise ValueError(f"sampler {sampler!r} with eta={eta} adds noise: pass rng")

  use_cfg = guidance_scale != 1.0
  if dynamic_cfg:
    g = dynamic_guidance(guidance_scale, coefs["t"], int(dynamic_cfg_steps) or sched.num_train_timesteps)
  else:
    g = np.full(num_steps, guidance_scale, np.float64)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
  xs = dict(
    i=jnp.arange(num_steps, dtype=jnp.int32),
    t=jnp.asarray(coefs["t"], jnp.int32),
    sqrt_a=f32(np.sqrt(coefs["a_t"])),
    sqrt_1ma=f32(np.sqrt(1.0 - coefs["a_t"])),
    A=f32(coefs["A"]),
    B=f32(coefs["B"]),
    C=f32(coefs["C"]),
    D=f32(coefs["D"]),
    g=f32(g),
  )
  out_dtype = x_T.dtype
  batch = x_T.shape[0]
  given_mask = None
  if given_frames is not None:
    assert given_latents is not None  # checked above: given_latents and given_frames go together
    given_mask = given_frames.reshape(given_frames.shape + (1,) * (x_T.ndim - given_frames.ndim))
    given_f32 = given_latents.astype(jnp.float32)
    keep = lambda x: jnp.where(given_mask, given_f32, x)
  else:
    keep = lambda x: x

  def body(carry, s):
    x, x0_old = carry
    x = keep(x)
    v_c, v_u = velocity_fn(x, jnp.full((batch,), s["t"], jnp.int32))
    v = guided_velocity(v_c, v_u, s["g"] if use_cfg else None)
    x0 = s["sqrt_a"] * x - s["sqrt_1ma"] * v
    x_prev = s["A"] * x + s["B"] * x0
    if sampler in ("dpmpp_2m", "sat_dpmpp_2m"):
      x_prev = x_prev + s["C"] * x0_old
    if stochastic:
      assert rng is not None  # checked above: a stochastic sampler without rng raised
      x_prev = x_prev + s["D"] * step_noise(rng, s["i"], x.shape)
    return (x_prev, x0), None

  x = x_T.astype(jnp.float32)
  (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
  x = x.astype(out_dtype)
  if given_mask is not None and given_latents is not None:  # both or neither (checked above)
    x = jnp.where(given_mask, given_latents.astype(out_dtype), x)
  return x


def sample_kwargs(sampling_cfg: Any) -> dict[str, Any]:
  """``sample`` keyword arguments from ``config.sampling``.

  Keys: sampler, num_steps, guidance_scale, dynamic_cfg, dynamic_cfg_steps, eta.
  """
  return dict(
    sampler=str(sampling_cfg.sampler),
    num_steps=int(sampling_cfg.num_steps),
    guidance_scale=float(sampling_cfg.guidance_scale),
    dynamic_cfg=bool(sampling_cfg.dynamic_cfg),
    dynamic_cfg_steps=int(sampling_cfg.dynamic_cfg_steps),
    eta=float(sampling_cfg.eta),
  )
