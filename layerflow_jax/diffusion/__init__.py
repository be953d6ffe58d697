"""LayerFlow diffusion: CogVideoX schedule (v-prediction, SNR shift, zero terminal SNR), masked loss,
samplers."""

from layerflow_jax.diffusion.loss import (
    MaskedLoss,
    drop_prompts,
    given_frames_for,
    keep_given,
    loss_frames_for,
    masked_v_loss,
    noisy_input,
    sample_tasks,
    task_probs_from_config,
)
from layerflow_jax.diffusion.samplers import (
    SAMPLERS,
    ddim_coefficients,
    dpmpp_2m_coefficients,
    dynamic_guidance,
    guided_velocity,
    prev_timesteps,
    sample,
    sample_kwargs,
    step_noise,
    timesteps,
)
from layerflow_jax.diffusion.schedule import (
    Schedule,
    add_noise,
    alpha_sigma,
    alphas_cumprod_f64,
    eps_from_v,
    make_schedule,
    rescale_zero_terminal_snr,
    v_from_eps,
    v_from_x0,
    v_target,
    x0_from_v,
    x0_loss_weight,
)
