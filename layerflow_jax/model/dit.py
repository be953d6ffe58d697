"""The LayerFlow diffusion transformer: CogVideoX's DiT in Flax NNX, with layer embeddings and LoRA adapters.

Structure (diffusers ``CogVideoXTransformer3DModel``): patch embed (Conv2d per latent frame) + text projection →
joint sequence [text; video] → N expert-adaLN-zero blocks (modulation chunks ``shift, scale, gate, enc_shift,
enc_scale, enc_gate``; joint attention with per-head q/k LayerNorm; tanh-GELU feed-forward on the joint
sequence) → final LayerNorm → AdaLayerNorm (``shift, scale``) → projection → unpatchify.

LayerFlow additions: a layer embedding per prompt (``text``: Linear(1 → hidden) + LayerNorm of the prompt index,
added to that prompt's tokens) and optionally per clip (``text+video``: a learned vector added to the clip's
video tokens); LoRA adapters (see :mod:`layerflow_jax.model.lora`) with a per-sample scale.

Arrays are channels-last: latents ``[B, F, h, w, c]``. Parameters carry logical axis names
(:mod:`layerflow_jax.sharding` maps them); the blocks are stacked on a ``layers`` axis and run by ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from layerflow_jax import codec as codec_lib
from layerflow_jax import layers
from layerflow_jax import sharding as shd
from layerflow_jax.dtypes import DTYPES
from layerflow_jax.model import attention as attention_lib
from layerflow_jax.model import embeddings as emb
from layerflow_jax.model import fp8 as fp8_lib
from layerflow_jax.model import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Static description of a model (derived from ``config.model`` plus data shapes, see ``from_config``)."""

  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 16
  time_embed_dim: int = 64
  in_channels: int = 16
  out_channels: int = 16
  text_embed_dim: int = 64
  patch_size: int = 2
  mlp_ratio: int = 4
  norm_eps: float = 1e-5
  qk_norm_eps: float = 1e-6
  pos_embed: str = "sincos"  # "sincos" | "rope" | "none" | "learned"
  # pos_embed "learned" (the official SAT table, text rows included): a parameter [pos_text_tokens + frames·h·w,
  # hidden] over the joint sequence [text; video], initialised as the official one (zero text rows, sin-cos video
  # rows over pos_grid = (latent frames, token rows, token columns)); a shorter video takes its first rows.
  pos_text_tokens: int = 0
  pos_grid: tuple[int, int, int] = (0, 0, 0)
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  # "video": temporal positions run over the whole packed time axis (official); "clip": every sub-clip restarts
  # at 0, so the same (t, y, x) of every layer shares one position (layers then differ by clip embedding only).
  clip_positions: str = "video"
  # A learned vector added to the video tokens of the clips the task gives (clean conditions), so one model
  # trained on several tasks is told which clips to keep and which to generate. Not in the official model.
  given_embed: bool = False
  layer_embed: str = "text"  # "none" | "text" | "text+video"
  num_prompts: int = 3
  num_clips: int = 4
  # Latent frames before the first sub-clip (the official fg2bg/bg2fg RGBA models: 1, a duplicated first frame).
  lead_frames: int = 0
  # eps of the final adaLN LayerNorm (norm_out); 0 = norm_eps (diffusers), the official SAT models use 1e-6.
  final_norm_eps: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"  # "none" | "full" | "dots" | "save_attention"
  attention: str = "xla"  # "xla" | "cudnn" | "chunked" | "splash" (see model/attention.py)
  fused_qkv: bool = False  # one [in, 3, out] matmul for q, k, v (blocks without q/k/v LoRA); same values
  # Pad the joint [text; video] sequence inside each block to a multiple of this (0: off); the padding keys are
  # masked in attention and the padded rows dropped, so values are unchanged. 2B RGBA has 22,278 tokens (= 2 · odd):
  # GEMMs contracting over tokens then run misaligned (align2) cuBLAS kernels on GPU. Not with sequence parallelism.
  pad_tokens_to: int = 0
  adapters: tuple[lora_lib.AdapterSpec, ...] = ()
  # "bf16" | "fp8_attention" | "fp8_gemm" | "fp8": which pieces compute in FP8 (see model/fp8.py)
  precision: str = "bf16"

  @property
  def hidden(self) -> int:
    return self.num_heads * self.head_dim

  @classmethod
  def from_config(cls, config) -> "DiTConfig":
    """Builds the model description from the full experiment config (model, layout, encoders)."""
    m = config.model
    layout = layers.get_layout(config.layout)
    latent_c = codec_lib.make_codec(config.autoencoder).latent_channels
    if m.layer_embed not in ("none", "text", "text+video"):
      raise ValueError(
        f"model.layer_embed: {m.layer_embed!r} unknown; expected 'none', 'text' or 'text+video'"
      )
    if m.pos_embed not in ("sincos", "rope", "none", "learned"):
      raise ValueError(
        f"model.pos_embed: {m.pos_embed!r} unknown; expected 'sincos', 'rope', 'none' or 'learned'"
      )
    lead = int(m.lead_frames)
    if lead < 0 or (lead and (m.layer_embed == "text+video" or m.clip_positions == "clip")):
      raise ValueError(
        f"model.lead_frames: {lead} must be >= 0, and 0 with layer_embed 'text+video' or "
        "clip_positions 'clip' (lead frames belong to no sub-clip)"
      )
    num_prompts = int(m.num_prompts)
    pos_text, pos_grid = 0, (0, 0, 0)
    if m.pos_embed == "learned":
      t, h, w, _ = codec_lib.make_codec(config.autoencoder).latent_shape(
        config.data.frames, config.data.height, config.data.width
      )
      frames = int(m.pos_table_frames) or lead + layout.num_clips * t
      pos_text, pos_grid = (
        num_prompts * int(config.text_encoder.max_length),
        (frames, h // m.patch_size, w // m.patch_size),
      )
    if m.clip_positions not in ("video", "clip"):
      raise ValueError(f"model.clip_positions: {m.clip_positions!r} unknown; expected 'video' or 'clip'")
    if m.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat: {m.remat!r} unknown; expected one of {sorted(REMAT_POLICIES)}")
    for key in ("dtype", "param_dtype"):
      if m[key] not in DTYPES:
        raise ValueError(f"model.{key}: {m[key]!r} unknown; expected one of {sorted(DTYPES)}")
    adapters = lora_lib.specs_from_config(m.adapters, m.num_layers)
    precision = m.precision
    if precision not in fp8_lib.PRECISIONS:
      raise ValueError(f"model.precision: {precision!r} unknown; expected one of {fp8_lib.PRECISIONS}")
    return cls(
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      head_dim=m.head_dim,
      time_embed_dim=m.time_embed_dim,
      in_channels=latent_c,
      out_channels=latent_c,
      text_embed_dim=config.text_encoder.dim,
      patch_size=m.patch_size,
      mlp_ratio=m.mlp_ratio,
      norm_eps=m.norm_eps,
      qk_norm_eps=m.qk_norm_eps,
      pos_embed=m.pos_embed,
      spatial_interpolation_scale=m.spatial_interpolation_scale,
      temporal_interpolation_scale=m.temporal_interpolation_scale,
      clip_positions=m.clip_positions,
      given_embed=bool(m.given_embed),
      layer_embed=m.layer_embed,
      pos_text_tokens=pos_text,
      pos_grid=pos_grid,
      num_prompts=num_prompts,
      num_clips=layout.num_clips,
      lead_frames=lead,
      final_norm_eps=float(m.final_norm_eps),
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      scan_layers=m.scan_layers,
      remat=m.remat,
      attention=m.attention,
      fused_qkv=bool(m.fused_qkv),
      pad_tokens_to=int(m.pad_tokens_to),
      adapters=adapters,
      precision=precision,
    )


# ----------------------------------------------------------------------------- building blocks

_normal = nnx.initializers.normal
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_xavier = nnx.initializers.xavier_uniform()


def _linear(
  cfg: DiTConfig,
  din: int,
  dout: int,
  names: tuple[str | None, str | None],
  rngs: nnx.Rngs,
  *,
  kernel_init=_xavier,
  bias_init=_zeros,
) -> nnx.Linear:
  return nnx.Linear(
    din,
    dout,
    dtype=DTYPES[cfg.dtype],
    param_dtype=DTYPES[cfg.param_dtype],
    kernel_init=shd.param(kernel_init, names),
    bias_init=shd.param(bias_init, (names[1],)),
    rngs=rngs,
  )


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 (the statistics), returned in the input dtype."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, *, affine: bool = True):
    self.norm = nnx.LayerNorm(
      dim,
      epsilon=eps,
      use_bias=affine,
      use_scale=affine,
      dtype=jnp.float32,
      scale_init=shd.param(_ones, ("norm",)),
      bias_init=shd.param(_zeros, ("norm",)),
      rngs=rngs,
    )

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(x.dtype)


class LayerNormZero(nnx.Module):
  """CogVideoX expert adaLN-zero: one LayerNorm, separate modulation for video and text tokens."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    # adaLN-zero: modulation starts at zero (identity norms, closed gates); diffusers weights overwrite it.
    self.linear = _linear(
      cfg, cfg.time_embed_dim, 6 * cfg.hidden, ("time_embed", "modulation"), rngs, kernel_init=_zeros
    )
    self.norm = LayerNorm(cfg.hidden, cfg.norm_eps, rngs)

  def __call__(self, x, enc, temb):
    mod = self.linear(jax.nn.silu(temb))
    shift, scale, gate, enc_shift, enc_scale, enc_gate = jnp.split(mod, 6, axis=-1)
    x = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
    enc = self.norm(enc) * (1 + enc_scale[:, None]) + enc_shift[:, None]
    return x, enc, gate[:, None], enc_gate[:, None]


class Attention(nnx.Module):
  """Joint attention over [text; video] with per-head q/k LayerNorm and optional RoPE on video tokens."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden
    self.to_q = _linear(cfg, d, d, ("embed", "heads"), rngs)
    self.to_k = _linear(cfg, d, d, ("embed", "heads"), rngs)
    self.to_v = _linear(cfg, d, d, ("embed", "heads"), rngs)
    self.norm_q = LayerNorm(cfg.head_dim, cfg.qk_norm_eps, rngs)
    self.norm_k = LayerNorm(cfg.head_dim, cfg.qk_norm_eps, rngs)
    self.to_out = _linear(cfg, d, d, ("heads", "embed"), rngs)

  def __call__(
    self,
    x,
    num_text: int,
    rope,
    lora: lora_lib.BlockLora | None,
    num_valid: int | None = None,
    fp8: dict | None = None,
  ):
    """``x`` [B, T+N(+pad), D]; with ``num_valid`` the tokens from there on are padding: masked as keys. ``fp8``:
    this block's delayed-scaling state of its FP8 GEMMs (None: current scaling; read only with FP8 GEMMs)."""
    cfg = self.cfg
    b, n, _ = x.shape
    qkv_lora = lora is not None and any(t in w for w in lora.weights.values() for t in ("q", "k", "v"))
    gemm_fp8 = fp8_lib.gemm_fp8(cfg.precision)
    meta = lambda site: None if fp8 is None else fp8[site]  # noqa: E731
    if (
      gemm_fp8
    ):  # one FP8 GEMM (one kernel scale) for q, k, v in every block; LoRA deltas added in model.dtype
      base = self.fused_qkv(x, meta("qkv"))
      q, k, v = (
        lora_lib.project(lin, x, lora, t, base=y)
        for lin, t, y in zip((self.to_q, self.to_k, self.to_v), "qkv", base)
      )
    elif cfg.fused_qkv and not qkv_lora:
      q, k, v = self.fused_qkv(x)
    else:
      q = lora_lib.project(self.to_q, x, lora, "q")
      k = lora_lib.project(self.to_k, x, lora, "k")
      v = lora_lib.project(self.to_v, x, lora, "v")
    heads = lambda t: shd.constrain(
      t.reshape(b, n, cfg.num_heads, cfg.head_dim), ("batch", None, "act_heads", "act_kv")
    )
    q, k, v = heads(q), heads(k), heads(v)
    q, k = self.norm_q(q), self.norm_k(k)
    if rope is not None:
      cos, sin = rope
      end = n if num_valid is None else num_valid
      rot = lambda t: jnp.concatenate(
        [t[:, :num_text], emb.apply_rope(t[:, num_text:end], cos, sin), t[:, end:]], axis=1
      )
      q, k = rot(q), rot(k)
    impl = None if cfg.attention == "xla" else cfg.attention
    if fp8_lib.attention_fp8(cfg.precision):
      impl = "cudnn_fp8"
    out = attention_lib.joint_attention(
      q,
      k,
      v,
      num_text,
      implementation=impl,  # sequence-parallel if meshed
      num_valid=None if num_valid == n else num_valid,
    )
    out = checkpoint_name(out, "attention_out")
    out = out.reshape(b, n, cfg.hidden)
    return lora_lib.project(
      self.to_out, out, lora, "out", base=fp8_lib.dense(self.to_out, out, meta("out")) if gemm_fp8 else None
    )

  def fused_qkv(self, x, fp8_meta: dict | None = None):
    """q, k, v from one matmul over the stacked kernels [in, 3, out]: one larger GEMM (and one for each gradient)
    instead of three; the parameters stay the separate to_q / to_k / to_v of the diffusers layout. With FP8 GEMMs
    (``model.precision``) the matmul runs in FP8, ``fp8_meta`` its scaling state (None: current scaling)."""
    dtype = DTYPES[self.cfg.dtype]
    linears = (self.to_q, self.to_k, self.to_v)
    kernel = jnp.stack([l.kernel[...] for l in linears], axis=1).astype(dtype)
    bias = jnp.stack([l.bias[...] for l in linears], axis=0).astype(dtype)  # pyright: ignore[reportOptionalSubscript]  (q, k, v have biases)
    if fp8_lib.gemm_fp8(self.cfg.precision):
      qkv = fp8_lib.einsum("bnd,dke->bnke", x.astype(dtype), kernel, fp8_meta) + bias
    else:
      qkv = jnp.einsum("bnd,dke->bnke", x.astype(dtype), kernel) + bias
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class FeedForward(nnx.Module):
  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.gemm_fp8 = fp8_lib.gemm_fp8(cfg.precision)
    inner = cfg.mlp_ratio * cfg.hidden
    self.proj_in = _linear(cfg, cfg.hidden, inner, ("embed", "mlp"), rngs)
    self.proj_out = _linear(cfg, inner, cfg.hidden, ("mlp", "embed"), rngs)

  def __call__(self, x, lora: lora_lib.BlockLora | None, fp8: dict | None = None):
    base = lambda lin, t, site: (
      fp8_lib.dense(lin, t, None if fp8 is None else fp8[site])  # noqa: E731
      if self.gemm_fp8
      else None
    )
    h = jax.nn.gelu(
      lora_lib.project(self.proj_in, x, lora, "ff_in", base=base(self.proj_in, x, "ff_in")), approximate=True
    )
    h = shd.constrain(h, ("batch", None, "act_mlp"))
    return lora_lib.project(self.proj_out, h, lora, "ff_out", base=base(self.proj_out, h, "ff_out"))


class Block(nnx.Module):
  """One CogVideoX block on separate text [B, T, D] and video [B, N, D] streams."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.pad_to = cfg.pad_tokens_to
    self.norm1 = LayerNormZero(cfg, rngs)
    self.attn1 = Attention(cfg, rngs)
    self.norm2 = LayerNormZero(cfg, rngs)
    self.ff = FeedForward(cfg, rngs)

  def __call__(self, x, enc, temb, rope, lora: lora_lib.BlockLora | None = None, fp8: dict | None = None):
    num_text, num_valid = enc.shape[1], enc.shape[1] + x.shape[1]
    pad = (-num_valid) % self.pad_to if self.pad_to else 0

    def joint(a, b):  # [text; video; zero padding]
      parts = [a, b] + ([jnp.zeros((b.shape[0], pad, b.shape[2]), b.dtype)] if pad else [])
      return jnp.concatenate(parts, axis=1)

    nx, nenc, gate, enc_gate = self.norm1(x, enc, temb)
    attn = self.attn1(joint(nenc, nx), num_text, rope, lora, num_valid=num_valid, fp8=fp8)
    x = x + gate * attn[:, num_text:num_valid]
    enc = enc + enc_gate * attn[:, :num_text]
    nx, nenc, gate, enc_gate = self.norm2(x, enc, temb)
    ff = self.ff(joint(nenc, nx), lora, fp8)
    x = x + gate * ff[:, num_text:num_valid]
    enc = enc + enc_gate * ff[:, :num_text]
    x = shd.constrain(x, ("batch", "video_tokens", "act_embed"))
    enc = shd.constrain(enc, ("batch", "text_tokens", "act_embed"))
    return x, enc


def _attention_kernel_saveable(prim, *_, **__) -> bool:
  """Saves the fused (cuDNN) attention forward kernel's outputs — the output and the softmax statistics its
  backward needs — so the backward pass does not run the attention forward again. Naming the output alone
  cannot do that: the kernel's residuals live inside its custom VJP, and the statistics carry no name."""
  return prim.name.startswith("dot_product_attention_fwd")


_cp = jax.checkpoint_policies
REMAT_POLICIES = {
  "none": None,
  "full": _cp.nothing_saveable,
  "dots": _cp.dots_with_no_batch_dims_saveable,
  "save_attention": _cp.save_from_both_policies(
    _cp.save_only_these_names("attention_out"), _attention_kernel_saveable
  ),
  "dots_attention": _cp.save_from_both_policies(
    _cp.dots_with_no_batch_dims_saveable, _attention_kernel_saveable
  ),
}


# ----------------------------------------------------------------------------- the model


class LayerFlowDiT(nnx.Module):
  """CogVideoX-compatible DiT over packed layered latents.

  Call: ``model(latents [B, F, h, w, c], timesteps [B], text [B, P·L, text_dim], adapter_scales=None,
  given_frames=None, fp8=None)`` → velocity ``[B, F, h, w, c]`` (float32). ``F`` must be divisible by ``num_clips``;
  ``P = num_prompts``. ``adapter_scales`` maps an adapter name to a per-sample scale [B] (default 1 for every
  adapter); ``given_frames`` bool [B, F] marks the latent frames of given clips (used with ``given_embed``);
  ``fp8`` is the delayed-scaling state of the FP8 GEMMs (``fp8.init_state``; None: current scaling).
  """

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.hidden, cfg.patch_size
    pd = DTYPES[cfg.param_dtype]
    self.patch_proj = nnx.Conv(
      cfg.in_channels,
      d,
      kernel_size=(p, p),
      strides=(p, p),
      padding="VALID",
      dtype=DTYPES[cfg.dtype],
      param_dtype=pd,
      kernel_init=shd.param(_xavier, ("patch", "patch", "channels", "embed")),
      bias_init=shd.param(_zeros, ("embed",)),
      rngs=rngs,
    )
    self.text_proj = _linear(cfg, cfg.text_embed_dim, d, ("text_embed", "embed"), rngs)
    self.time_linear_1 = _linear(cfg, d, cfg.time_embed_dim, ("embed", "time_embed"), rngs)
    self.time_linear_2 = _linear(cfg, cfg.time_embed_dim, cfg.time_embed_dim, ("time_embed", None), rngs)
    if cfg.layer_embed in ("text", "text+video"):
      self.layer_embed_linear = _linear(cfg, 1, d, (None, "embed"), rngs)
      self.layer_embed_norm = LayerNorm(d, cfg.norm_eps, rngs)
    if cfg.layer_embed == "text+video":
      self.clip_embed = nnx.Param(
        shd.param(_normal(0.02), ("clips", "embed"))(rngs.params(), (cfg.num_clips, d), pd)
      )
    if cfg.given_embed:
      self.given_embed = nnx.Param(shd.param(_normal(0.02), ("embed",))(rngs.params(), (d,), pd))
    if cfg.pos_embed == "learned":
      self.pos_table = nnx.Param(
        shd.param(lambda *_: jnp.asarray(self._initial_pos_table(), pd), (None, "embed"))(
          rngs.params(), None, pd
        )
      )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.norm_final = LayerNorm(d, cfg.norm_eps, rngs)
    self.norm_out_linear = _linear(
      cfg, cfg.time_embed_dim, 2 * d, ("time_embed", "modulation"), rngs, kernel_init=_zeros
    )
    self.norm_out = LayerNorm(d, cfg.final_norm_eps or cfg.norm_eps, rngs)
    self.proj_out = _linear(cfg, d, p * p * cfg.out_channels, ("embed", "channels"), rngs, kernel_init=_zeros)
    self.adapters = nnx.Dict(
      {a.name: lora_lib.Adapter(a, cfg.hidden, cfg.mlp_ratio * cfg.hidden, pd, rngs) for a in cfg.adapters}
    )

  # -------------------------------------------------------------------------- pieces

  def _initial_pos_table(self) -> np.ndarray:
    """The official table at init: zero text rows, then the 3D sin-cos rows of ``pos_grid``."""
    cfg = self.cfg
    frames, rows, cols = cfg.pos_grid
    if min(cfg.pos_grid) < 1 or cfg.pos_text_tokens < 0:
      raise ValueError(f"pos_embed 'learned' needs a positive pos_grid, got {cfg.pos_grid}")
    video = emb.sincos_3d(
      cfg.hidden, frames, rows, cols, cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale
    )
    return np.concatenate([np.zeros((cfg.pos_text_tokens, cfg.hidden), np.float32), video], axis=0)

  def embed_text(self, text, fp8_meta: dict | None = None):
    """Text embeddings [B, P·L, text_dim] → projected tokens [B, P·L, hidden] with layer embeddings (the projection
    in FP8 with FP8 GEMMs, ``fp8_meta`` its scaling state; None: current scaling)."""
    cfg = self.cfg
    text = text.astype(DTYPES[cfg.dtype])
    enc = (
      fp8_lib.dense(self.text_proj, text, fp8_meta)
      if fp8_lib.gemm_fp8(cfg.precision)
      else self.text_proj(text)
    )
    if cfg.layer_embed in ("text", "text+video"):
      b, total, d = enc.shape
      if total % cfg.num_prompts:
        raise ValueError(f"{total} text tokens cannot be split into {cfg.num_prompts} prompts")
      index = jnp.arange(cfg.num_prompts, dtype=jnp.float32)[:, None]  # the prompt's scalar index
      layer = self.layer_embed_norm(self.layer_embed_linear(index.astype(enc.dtype)))  # [P, D]
      enc = (enc.reshape(b, cfg.num_prompts, total // cfg.num_prompts, d) + layer[None, :, None]).reshape(
        b, total, d
      )
    if cfg.pos_embed == "learned":
      if enc.shape[1] != cfg.pos_text_tokens:
        raise ValueError(
          f"{enc.shape[1]} text tokens, the learned position table has {cfg.pos_text_tokens} text rows"
        )
      enc = enc + self.pos_table[...][: cfg.pos_text_tokens].astype(enc.dtype)[None]
    return shd.constrain(enc, ("batch", "text_tokens", "act_embed"))

  def embed_video(self, latents, given_frames=None):
    cfg = self.cfg
    b, f, h, w, c = latents.shape
    p = cfg.patch_size
    if c != cfg.in_channels:
      raise ValueError(f"latents have {c} channels, the model expects {cfg.in_channels}")
    if h % p or w % p:
      raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
    if f <= cfg.lead_frames or (f - cfg.lead_frames) % cfg.num_clips:
      lead = f" after {cfg.lead_frames} lead frame(s)" if cfg.lead_frames else ""
      raise ValueError(f"{f} latent frames cannot be split into {cfg.num_clips} sub-clips{lead}")
    x = self.patch_proj(latents.reshape(b * f, h, w, c).astype(DTYPES[cfg.dtype]))
    x = x.reshape(b, f * (h // p) * (w // p), cfg.hidden)
    if cfg.pos_embed == "sincos":
      table = emb.sincos_3d(
        cfg.hidden,
        self._position_frames(f),
        h // p,
        w // p,
        cfg.spatial_interpolation_scale,
        cfg.temporal_interpolation_scale,
      )
      x = x + jnp.asarray(self._tile_positions(table, f), x.dtype)[None]
    if cfg.pos_embed == "learned":
      n, rows = x.shape[1], self.pos_table.shape[0] - cfg.pos_text_tokens
      if n > rows:
        raise ValueError(f"{n} video tokens, the learned position table has {rows} video rows")
      x = x + self.pos_table[...][cfg.pos_text_tokens : cfg.pos_text_tokens + n].astype(x.dtype)[None]
    if cfg.layer_embed == "text+video":
      per_clip = (f // cfg.num_clips) * (h // p) * (w // p)
      x = x + jnp.repeat(self.clip_embed[...].astype(x.dtype), per_clip, axis=0)[None]
    if cfg.given_embed and given_frames is not None:
      given = jnp.repeat(jnp.asarray(given_frames, x.dtype), (h // p) * (w // p), axis=1)
      x = x + given[..., None] * self.given_embed[...].astype(x.dtype)
    return shd.constrain(x, ("batch", "video_tokens", "act_embed"))

  def _position_frames(self, f: int) -> int:
    return f // self.cfg.num_clips if self.cfg.clip_positions == "clip" else f

  def _tile_positions(self, table, f: int):
    """A [frames·h·w, …] position table of one sub-clip repeated for every sub-clip (``clip_positions="clip"``)."""
    return np.tile(table, (f // self._position_frames(f), 1))

  def embed_time(self, timesteps):
    t = emb.timestep_embedding(timesteps, self.cfg.hidden)
    return self.time_linear_2(jax.nn.silu(self.time_linear_1(t.astype(DTYPES[self.cfg.dtype]))))

  def run_blocks(self, x, enc, temb, rope, adapter_scales: Mapping[str, Any] | None, fp8: dict | None = None):
    """The blocks, scanned; ``fp8`` the blocks' FP8 GEMM state stacked on ``layers`` (None: current scaling)."""
    cfg = self.cfg
    graphdef, stacked = nnx.split(self.blocks)
    scales = lora_lib.resolve_scales(cfg.adapters, adapter_scales, x.shape[0])
    adapters = {name: self.adapters[name] for name in self.adapters}
    policy = REMAT_POLICIES[cfg.remat]

    def body(carry, xs):
      layer_state, layer_lora, layer_fp8 = xs
      block = nnx.merge(graphdef, layer_state)
      lora = lora_lib.BlockLora(layer_lora, scales) if layer_lora else None
      return block(carry[0], carry[1], temb, rope, lora, layer_fp8), None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)

    carry = (x, enc)
    for seg in lora_lib.segments(cfg.adapters, cfg.num_layers):
      seg_state = jax.tree.map(lambda a, seg=seg: a[seg.start : seg.stop], stacked)
      seg_lora = lora_lib.segment_lora(seg, adapters, cfg.adapters)
      seg_fp8 = None if fp8 is None else fp8_lib.rows(fp8, seg.start, seg.stop)
      if cfg.scan_layers:
        carry, _ = jax.lax.scan(body, carry, (seg_state, seg_lora, seg_fp8))
      else:
        for i in range(seg.stop - seg.start):
          carry, _ = body(carry, jax.tree.map(lambda a, i=i: a[i], (seg_state, seg_lora, seg_fp8)))
    return carry

  def __call__(
    self,
    latents,
    timesteps,
    text,
    adapter_scales: Mapping[str, Any] | None = None,
    given_frames=None,
    fp8: dict | None = None,
  ):
    cfg = self.cfg
    b, f, h, w, c = latents.shape
    p = cfg.patch_size
    x = self.embed_video(latents, given_frames)
    fp8 = fp8 or None  # {} (no FP8 GEMMs, or no state): None
    enc = self.embed_text(text, None if fp8 is None else fp8["text_proj"])
    temb = self.embed_time(timesteps)
    rope = None
    if cfg.pos_embed == "rope":
      cos, sin = emb.rope_3d(cfg.head_dim, self._position_frames(f), h // p, w // p)
      rope = (jnp.asarray(self._tile_positions(cos, f)), jnp.asarray(self._tile_positions(sin, f)))
    x, enc = self.run_blocks(x, enc, temb, rope, adapter_scales, None if fp8 is None else fp8["blocks"])
    x = self.norm_final(x)
    shift, scale = jnp.split(self.norm_out_linear(jax.nn.silu(temb)), 2, axis=-1)
    x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
    x = self.proj_out(x).astype(jnp.float32)
    x = x.reshape(b, f, h // p, w // p, cfg.out_channels, p, p)
    x = jnp.transpose(x, (0, 1, 2, 5, 3, 6, 4)).reshape(b, f, h, w, cfg.out_channels)
    return x


def create_model(cfg: DiTConfig, seed: int = 0) -> LayerFlowDiT:
  """Builds a model eagerly on the default device (parameters unsharded; see ``train.state`` for sharded init)."""
  with nnx.use_eager_sharding(False):
    return LayerFlowDiT(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: DiTConfig) -> LayerFlowDiT:
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: LayerFlowDiT(cfg, rngs=nnx.Rngs(0)))


def count_params(state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
