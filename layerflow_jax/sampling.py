"""Layered sampling: every task with one model — given clips stay clean in their slots at every step.

``LayeredSampler(exp, params)`` compiles one function for all tasks (which clips are given is an input array).
Classifier-free guidance runs the model on the doubled batch [cond; uncond] (unconditional = zero text embedding).
Adapters named in ``config.sampling.remove_adapters`` (stage 3: the motion LoRA) are removed before sampling.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from layerflow_jax import layers, validate
from layerflow_jax import sharding as shd
from layerflow_jax.diffusion import samplers
from layerflow_jax.train.experiment import Experiment


def drop_adapters(config: mlc.ConfigDict, params: dict, names: Sequence[str]) -> tuple[mlc.ConfigDict, dict]:
  """A config and parameters without the named adapters (removal, not a zero scale)."""
  names = list(dict.fromkeys(n for n in names if n in config.model.adapters))  # once each
  if not names:
    return config, params
  config = mlc.ConfigDict(config.to_dict())
  for n in names:
    del config.model.adapters[n]
  keys = [k for k in config.train.adapter_scale_keys if k in names]
  for k in keys:
    del config.train.adapter_scale_keys[k]
  # Nothing trains here: a training selection that names a removed adapter would only fail to resolve.
  config.train.trainable_adapters = tuple(n for n in config.train.trainable_adapters if n not in names)
  if config.train.trainable == "adapters" and not config.train.trainable_adapters:
    config.train.trainable = "all"
  prefix = tuple(f"adapters.{n}." for n in names)
  return config, {k: v for k, v in params.items() if not k.startswith(prefix)}


class LayeredSampler:
  def __init__(self, config: mlc.ConfigDict, params: dict, *, mesh=None, keep_adapters: Sequence[str] = ()):
    validate.check_backend(
      config, jax.default_backend()
    )  # e.g. a cuDNN-attention checkpoint sampled on a CPU
    validate.check_precision(
      config, jax.default_backend(), getattr(jax.devices()[0], "compute_capability", None), training=False
    )
    remove = [n for n in config.sampling.remove_adapters if n not in keep_adapters]
    self._source_config = config
    config, params = drop_adapters(config, params, remove)
    self.exp = Experiment(config, mesh)
    self.params = params
    self.removed = remove
    self.kwargs = samplers.sample_kwargs(config.sampling)
    self.adapter_scales = dict(config.sampling.adapter_scales)
    self._fn = jax.jit(self._sample, static_argnames=("num_steps", "guidance_scale"))

  def load(self, params: dict) -> None:
    """Samples with ``params`` from now on (the same model: e.g. a training run's newer weights); the compiled
    function is kept."""
    _, self.params = drop_adapters(self._source_config, params, self.removed)

  @property
  def layout(self) -> layers.Layout:
    return self.exp.layout

  def tokenize(self, fg: str, bg: str, blend: str | None) -> np.ndarray:
    """[1, P, L] ids of the prefixed prompts ("0, fg", "1, bg"[, "2, blend"]: the model's prompt count)."""
    prompts = layers.format_prompts(fg, bg, blend, self.exp.model_cfg.num_prompts)
    return self.exp.text_encoder.tokenize(prompts)[None]

  def _sample(
    self, params, tokens, given_video, given_clips, given_frames, rng, *, num_steps, guidance_scale
  ):
    exp = self.exp
    b = tokens.shape[0]
    model = exp.model(params)
    text = exp.encode_text(tokens)
    both_text = jnp.concatenate([text, jnp.zeros_like(text)], axis=0)
    scales = {
      k: jnp.full((2 * b,), v, jnp.float32)
      for k, v in self.adapter_scales.items()
      if any(a.name == k for a in exp.model_cfg.adapters)
    }

    def velocity(x, t):
      v = model(
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        both_text,
        adapter_scales=scales,
        given_frames=jnp.concatenate([given_frames, given_frames]),
      )
      return v[:b], v[b:]

    rng_posterior = None
    if exp.config.autoencoder.sample_posterior:  # else the noise stream stays as it always was
      rng, rng_posterior = jax.random.split(rng)
    given_lat = exp.encode_video(given_video, rng_posterior)
    rng_noise, rng_solver = jax.random.split(rng)
    x_T = jax.random.normal(rng_noise, given_lat.shape, jnp.float32)
    kw = dict(self.kwargs, num_steps=num_steps, guidance_scale=guidance_scale)
    z = samplers.sample(
      velocity,
      x_T,
      sched=exp.schedule,
      given_latents=given_lat,
      given_frames=given_frames,
      rng=rng_solver,
      **kw,
    )
    video = jnp.clip(exp.decode_video(z), -1.0, 1.0)
    # Given clips are returned exactly as given (the codec round trip is lossless for the pixel codec only).
    return jnp.where(
      layers.clip_time_mask(given_clips, exp.config.data.frames)[..., None, None, None], given_video, video
    )

  def sample(
    self,
    tokens: np.ndarray,
    task: str,
    *,
    given_video: np.ndarray | None = None,
    seed: int = 0,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
  ) -> np.ndarray:
    """Packed pixel clips [B, n·T, H, W, 3]. ``given_video`` holds the task's given clips in their slots."""
    layers.check_task(task)
    exp = self.exp
    d = exp.config.data
    b = tokens.shape[0]
    shape = (b, exp.layout.num_clips * d.frames, d.height, d.width, 3)
    given = np.broadcast_to(layers.given_clips(task, exp.layout), (b, exp.layout.num_clips))
    if given.any() and given_video is None:
      names = [c for c, g in zip(exp.layout.clips, given[0]) if g]
      raise ValueError(f"task {task!r} needs the given clip(s) {names}")
    if given_video is None:
      given_video = np.zeros(shape, np.float32)
    if tuple(given_video.shape) != shape:
      raise ValueError(f"given video has shape {tuple(given_video.shape)}, expected {shape}")
    given_video = np.where(layers.clip_time_mask(given, d.frames)[..., None, None, None], given_video, 0.0)
    # The latent frames the task gives (whole clips, or e.g. the last 2 of the official RGB decomposition).
    table = exp.given_frame_table
    frames = np.broadcast_to(table[layers.TASK_NAMES.index(task)], (b, table.shape[1]))
    # None (only) means the config's value: 0 steps or a negative guidance are refused, never replaced.
    steps = int(self.kwargs["num_steps"] if num_steps is None else num_steps)
    guidance = float(self.kwargs["guidance_scale"] if guidance_scale is None else guidance_scale)
    if steps < 1:
      raise ValueError(
        f"num_steps={num_steps!r}: expected an integer >= 1 (None: the config's "
        f"sampling.num_steps={self.kwargs['num_steps']})"
      )
    if not np.isfinite(guidance) or guidance < 0:
      raise ValueError(f"guidance_scale={guidance_scale!r}: expected a finite number >= 0")
    with shd.use_mesh(exp.mesh):
      out = self._fn(
        self.params,
        jnp.asarray(tokens),
        jnp.asarray(given_video, jnp.float32),
        jnp.asarray(given),
        jnp.asarray(frames),
        jax.random.key(seed),
        num_steps=steps,
        guidance_scale=guidance,
      )
    return np.asarray(out)

  def split_layers(self, video: np.ndarray) -> list[dict]:
    """Packed pixel clips [B, n·T, …] → one dict of layers (fg premultiplied, alpha [0,1], bg, blend) per sample."""
    clips = layers.unpack(video, self.exp.layout.num_clips)
    return [{k: np.asarray(v) for k, v in layers.clips_to_layers(c, self.exp.layout).items()} for c in clips]
