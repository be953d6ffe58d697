"""Diffusion: schedule, conversions, masked loss, task sampling and samplers (with diffusers parity)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from layerflow_jax import diffusion as D
from layerflow_jax import layers

N = 1000
SHAPE = (2, 8, 4, 4, 3)  # [B, F, h, w, c]: 4 clips x 2 latent frames
NUM_CLIPS, FPC = 4, 2


@pytest.fixture(scope="module")
def sched() -> D.Schedule:
  return D.make_schedule(default_config.get_config().diffusion)


def _diffusers():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  import diffusers

  return diffusers


def _scheduler_kwargs() -> dict:
  return dict(
    num_train_timesteps=N,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    snr_shift_scale=3.0,
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    set_alpha_to_one=True,
    clip_sample=False,
  )


# ----------------------------------------------------------------------------- schedule


def test_zero_terminal_snr_and_monotone(sched):
  ac = sched.alphas_cumprod
  assert ac.dtype == np.float32 and ac.shape == (N,)
  assert abs(float(ac[-1])) <= np.finfo(np.float32).eps
  assert np.all(np.diff(ac.astype(np.float64)) < 0)
  assert 0.99 < ac[0] < 1.0


def test_shift_comes_before_rescale():
  # Rescaling last keeps a_T = 0; shifting after a rescale would too, but a_0 would differ.
  ac = D.alphas_cumprod_f64()
  plain = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, N) ** 2)
  shifted = plain / (3.0 + (1 - 3.0) * plain)
  np.testing.assert_allclose(ac[0], shifted[0], rtol=1e-12)
  assert ac[-1] == 0.0


def test_round_trips(sched):
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  eps = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  t = jnp.asarray([0, N - 1], jnp.int32)
  x_t = D.add_noise(x0, eps, t, sched)
  v = D.v_target(x0, eps, t, sched)
  np.testing.assert_allclose(D.x0_from_v(x_t, v, t, sched), x0, atol=1e-5)
  np.testing.assert_allclose(D.eps_from_v(x_t, v, t, sched), eps, atol=1e-5)
  t_mid = jnp.asarray([1, 500], jnp.int32)  # v_from_x0 / v_from_eps divide by sqrt(1 - a) / sqrt(a)
  x_t = D.add_noise(x0, eps, t_mid, sched)
  v = D.v_target(x0, eps, t_mid, sched)
  np.testing.assert_allclose(D.v_from_x0(x_t, x0, t_mid, sched), v, atol=1e-4)
  np.testing.assert_allclose(D.v_from_eps(x_t, eps, t_mid, sched), v, atol=1e-5)


@pytest.mark.torch
def test_schedule_matches_diffusers(sched):
  diffusers = _diffusers()
  for cls in (diffusers.CogVideoXDDIMScheduler, diffusers.CogVideoXDPMScheduler):
    ref = cls(**_scheduler_kwargs()).alphas_cumprod.double().numpy()
    assert np.max(np.abs(sched.alphas_cumprod - ref)) <= 1e-6
    assert ref[-1] == 0.0


@pytest.mark.torch
@pytest.mark.parametrize("num_steps", [50, 10, 7, 30])
def test_trailing_timesteps_match_diffusers(sched, num_steps):
  diffusers = _diffusers()
  s = diffusers.CogVideoXDDIMScheduler(**_scheduler_kwargs())
  s.set_timesteps(num_steps)
  np.testing.assert_array_equal(D.timesteps(sched, num_steps), s.timesteps.numpy())


def test_dynamic_guidance_curve():
  g = D.dynamic_guidance(6.0, np.asarray([N - 1, 500, 0]), N)
  assert abs(g[0] - 1.0) < 1e-6 and abs(g[2] - 7.0) < 1e-12 and 1.0 < g[1] < 1.2


# ----------------------------------------------------------------------------- loss


def _given(task_names: list[str]) -> jnp.ndarray:
  table = layers.given_table(layers.get_layout("rgba"))
  ids = jnp.asarray([layers.TASK_NAMES.index(n) for n in task_names], jnp.int32)
  return D.given_frames_for(ids, table, FPC)


def test_given_frames_for():
  g = np.asarray(_given(["generate", "decompose", "fg2bg", "bg2fg"]))
  assert g.shape == (4, NUM_CLIPS * FPC)
  np.testing.assert_array_equal(g[0], np.zeros(8, bool))
  np.testing.assert_array_equal(g[1], [0, 0, 0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(g[2], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(g[3], [0, 0, 0, 0, 1, 1, 0, 0])


def test_noisy_input_keeps_given_clean(sched):
  x0 = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  given = _given(["decompose", "fg2bg"])
  x_t, t, eps = D.noisy_input(jax.random.PRNGKey(2), x0, given, sched)
  assert t.dtype == jnp.int32 and t.shape == (2,) and bool(jnp.all((t >= 0) & (t < N)))
  m = np.asarray(given)
  np.testing.assert_array_equal(np.asarray(x_t)[m], np.asarray(x0)[m])
  np.testing.assert_allclose(np.asarray(x_t)[~m], np.asarray(D.add_noise(x0, eps, t, sched))[~m])


def _loss_case(sched, t):
  rng = np.random.default_rng(3)
  x0, eps, v_pred = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(3))
  given = _given(["decompose", "fg2bg"])
  return x0, eps, v_pred, jnp.asarray(t, jnp.int32), given


def test_loss_ignores_given_frames(sched):
  x0, eps, v_pred, t, given = _loss_case(sched, [10, 900])
  lf = D.loss_frames_for(given)
  out = D.masked_v_loss(v_pred, x0, eps, t, lf, sched=sched, num_clips=NUM_CLIPS)
  v_alt = jnp.where(given[:, :, None, None, None], 1e3, v_pred)
  alt = D.masked_v_loss(v_alt, x0, eps, t, lf, sched=sched, num_clips=NUM_CLIPS)
  assert float(out.loss) == float(alt.loss)
  np.testing.assert_array_equal(out.per_clip, alt.per_clip)
  # decompose: blend given; fg2bg: fg, alpha given → fg, alpha, bg in 1 example each, blend in 1.
  np.testing.assert_array_equal(out.clip_counts, [1, 1, 2, 1])


@pytest.mark.parametrize("t", [[0, 999], [1, 500], [250, 998]])
def test_v_loss_equals_weighted_x0_loss(sched, t):
  x0, eps, v_pred, t, given = _loss_case(sched, t)
  lf = D.loss_frames_for(given)
  out = D.masked_v_loss(v_pred, x0, eps, t, lf, sched=sched, num_clips=NUM_CLIPS)
  x_t = D.add_noise(x0, eps, t, sched)
  x0_hat = D.x0_from_v(x_t, v_pred, t, sched)
  w = D.x0_loss_weight(t, sched)[:, None, None, None, None]
  err = np.asarray(w * jnp.square(x0_hat - x0))
  ref = err[np.asarray(lf)].mean()
  np.testing.assert_allclose(float(out.loss), ref, rtol=2e-4)
  err_c = err.reshape(2, NUM_CLIPS, FPC, -1)
  lf_c = np.asarray(lf).reshape(2, NUM_CLIPS, FPC)
  per_clip_ref = [err_c[:, k][lf_c[:, k]].mean() for k in range(NUM_CLIPS)]
  np.testing.assert_allclose(out.per_clip, per_clip_ref, rtol=2e-4)


def test_per_clip_zero_when_absent(sched):
  x0, eps, v_pred, t, _ = _loss_case(sched, [3, 4])
  given = _given(["decompose", "decompose"])
  out = D.masked_v_loss(v_pred, x0, eps, t, D.loss_frames_for(given), sched=sched, num_clips=NUM_CLIPS)
  np.testing.assert_array_equal(out.clip_counts, [2, 2, 2, 0])
  assert float(out.per_clip[3]) == 0.0 and np.all(np.isfinite(out.per_clip))
  nothing = D.masked_v_loss(v_pred, x0, eps, t, jnp.zeros((2, 8), bool), sched=sched, num_clips=NUM_CLIPS)
  assert float(nothing.loss) == 0.0


def test_sample_tasks_frequencies():
  probs = np.asarray([0.1, 0.2, 0.3, 0.4], np.float32)
  ids = np.asarray(D.sample_tasks(jax.random.PRNGKey(0), 20000, probs))
  assert ids.dtype == np.int32
  np.testing.assert_allclose(np.bincount(ids, minlength=4) / 20000, probs, atol=0.02)
  ids = np.asarray(D.sample_tasks(jax.random.PRNGKey(1), 5000, [0.0, 1.0, 0.0, 1.0]))
  assert set(np.unique(ids)) <= {1, 3}


def test_task_probs_from_config():
  probs = D.task_probs_from_config(default_config.get_config().diffusion)
  np.testing.assert_allclose(probs, [0.25] * 4)


def test_drop_prompts():
  emb = jnp.ones((4000, 3, 2))
  out = np.asarray(D.drop_prompts(jax.random.PRNGKey(0), emb, 0.1))
  dropped = (out == 0).all(axis=(1, 2))
  assert ((out == 1).all(axis=(1, 2)) | dropped).all()
  assert abs(dropped.mean() - 0.1) < 0.02


# ----------------------------------------------------------------------------- samplers


_rs = np.random.default_rng(7)
P_C = _rs.standard_normal(SHAPE).astype(np.float32) * 0.5
P_U = _rs.standard_normal(SHAPE).astype(np.float32) * 0.5


def _k(t):
  return 0.5 + 0.4 * t / N


def fake_velocity_jax(x, t):
  k = _k(t.astype(jnp.float32))[:, None, None, None, None]
  return k * x + P_C, 0.9 * k * x + P_U


def fake_velocity_torch(x, t: int):
  import torch

  k = _k(float(t))
  return k * x + torch.from_numpy(P_C), 0.9 * k * x + torch.from_numpy(P_U)


def _torch_reference(sampler, num_steps, g, dynamic, x_T, noises=None, given=None, given_latents=None):
  """diffusers' pipeline loop (CFG, DPM lookback) over scheduler.step with the fake model."""
  import torch

  diffusers = _diffusers()
  cls = diffusers.CogVideoXDDIMScheduler if sampler == "ddim" else diffusers.CogVideoXDPMScheduler
  s = cls(**_scheduler_kwargs())
  s.set_timesteps(num_steps)
  x = torch.from_numpy(np.array(x_T)).float()
  gm = None if given is None else torch.from_numpy(np.array(given))[:, :, None, None, None].expand(x.shape)
  gl = None if given is None else torch.from_numpy(np.array(given_latents)).float()
  old = None
  for i, t in enumerate(s.timesteps):
    if gm is not None:
      x = torch.where(gm, gl, x)
    v_c, v_u = fake_velocity_torch(x, int(t))
    gs = float(D.dynamic_guidance(g, np.asarray(int(t)), N)) if dynamic else g
    v = v_c if g == 1.0 else v_u + gs * (v_c - v_u)
    if sampler == "ddim":
      x = s.step(v, t, x, return_dict=False)[0]
    else:
      noise = torch.from_numpy(noises[i])
      import diffusers.schedulers.scheduling_dpm_cogvideox as dpm_mod

      orig = dpm_mod.randn_tensor
      dpm_mod.randn_tensor = lambda *a, noise=noise, **k: noise.clone()
      try:
        x, old = s.step(v, old, t, s.timesteps[i - 1] if i > 0 else None, x, return_dict=False)
      finally:
        dpm_mod.randn_tensor = orig
  if gm is not None:
    x = torch.where(gm, gl, x)
  return x.numpy()


def _rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.torch
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize(
  "g,dynamic,with_given", [(1.0, False, False), (6.0, False, False), (6.0, True, True)]
)
def test_sampler_matches_diffusers(sched, sampler, g, dynamic, with_given):
  num_steps = 10
  x_T = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  rng = jax.random.PRNGKey(5)
  given = _given(["fg2bg", "decompose"]) if with_given else None
  given_latents = jax.random.normal(jax.random.PRNGKey(9), SHAPE) if with_given else None
  ours = D.sample(
    fake_velocity_jax,
    x_T,
    sched=sched,
    num_steps=num_steps,
    sampler=sampler,
    guidance_scale=g,
    dynamic_cfg=dynamic,
    given_latents=given_latents,
    given_frames=given,
    rng=rng,
  )
  noises = [np.array(D.step_noise(rng, i, SHAPE)) for i in range(num_steps)] if sampler != "ddim" else None
  ref = _torch_reference(sampler, num_steps, g, dynamic, x_T, noises, given, given_latents)
  err = _rel_err(ours, ref)
  print(f"{sampler} g={g} dynamic={dynamic} given={with_given}: max rel err {err:.2e}")
  assert err <= 1e-4


def test_given_frames_bitwise_untouched(sched):
  x_T = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  given = _given(["bg2fg", "fg2bg"])
  given_latents = jax.random.normal(jax.random.PRNGKey(1), SHAPE) * 3.0
  seen = []

  def vel(x, t):
    seen.append(x)
    return fake_velocity_jax(x, t)

  m = np.asarray(given)
  for sampler in D.SAMPLERS:
    out = D.sample(
      vel,
      x_T,
      sched=sched,
      num_steps=5,
      sampler=sampler,
      guidance_scale=6.0,
      given_latents=given_latents,
      given_frames=given,
      rng=jax.random.PRNGKey(2),
    )
    np.testing.assert_array_equal(np.asarray(out)[m], np.asarray(given_latents)[m])
    assert np.all(np.isfinite(np.asarray(out)))
    assert not np.allclose(np.asarray(out)[~m], np.asarray(x_T)[~m])


def test_sampler_jits_and_matches_eager(sched):
  x_T = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  kw = dict(sched=sched, num_steps=4, sampler="dpmpp_2m", guidance_scale=6.0, dynamic_cfg=True)
  f = jax.jit(lambda x, r: D.sample(fake_velocity_jax, x, rng=r, **kw))
  a = f(x_T, jax.random.PRNGKey(3))
  b = D.sample(fake_velocity_jax, x_T, rng=jax.random.PRNGKey(3), **kw)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sampler_argument_checks(sched):
  x_T = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="rng"):
    D.sample(fake_velocity_jax, x_T, sched=sched, num_steps=4, sampler="dpmpp_2m", guidance_scale=1.0)
  with pytest.raises(ValueError, match="unknown sampler"):
    D.sample(fake_velocity_jax, x_T, sched=sched, num_steps=4, sampler="euler", guidance_scale=1.0)
  with pytest.raises(ValueError, match="DDIM"):
    D.sample(
      fake_velocity_jax,
      x_T,
      sched=sched,
      num_steps=4,
      sampler="dpmpp_2m",
      guidance_scale=1.0,
      eta=0.5,
      rng=jax.random.PRNGKey(0),
    )


@pytest.mark.parametrize("num_steps", [1, 6, 7, 50])
def test_coefficients_finite(sched, num_steps):
  for coefs in (D.ddim_coefficients(sched, num_steps), D.dpmpp_2m_coefficients(sched, num_steps)):
    for v in coefs.values():
      assert np.all(np.isfinite(v))


def test_ddim_last_step_returns_x0(sched):
  c = D.ddim_coefficients(sched, 10)
  assert c["A"][-1] == 0.0 and c["B"][-1] == 1.0
  c = D.dpmpp_2m_coefficients(sched, 10)
  assert c["A"][-1] == 0.0 and c["B"][-1] == 1.0 and c["C"][-1] == 0.0 and c["D"][-1] == 0.0
