"""CogVideoX's 3D causal VAE (diffusers ``AutoencoderKLCogVideoX``) in Flax NNX, channels-last.

What parity with diffusers depends on:

* Causal 3D convolutions: time is padded on the left only — by ``k − 1`` copies of the first frame at the start,
  by the last ``k − 1`` input frames of the previous chunk (the *conv cache*) afterwards. Space is zero-padded.
* Temporal compression by average-pooling frame pairs in the first ``log2(ratio)`` down blocks, an odd first frame
  kept on its own (so ``1 + 4k`` frames → ``1 + k`` latents); the decoder mirrors it with nearest upsampling.
  Spatial ×2 per block (a stride-2 conv after padding right/bottom by one; nearest ×2 + conv on the way up).
* Frame batching: diffusers encodes 8 frames at a time (the first batch takes the remainder, e.g. 9 + 5·8 for
  49 frames) and decodes 2 latent frames at a time (3 + 5·2 for 13), carrying the conv cache. GroupNorm statistics
  are per batch, so the batching is part of the result, not just a memory trick: we reproduce it (the first batch
  in Python, the rest by ``lax.scan``). Because of it only ``1 + 8k`` or ``8k`` frames come back at the same
  count (49 → 13 → 49; 16 → 4 → 16), which :func:`latent_frames` enforces.
* Spatial tiling (diffusers ``enable_tiling``): overlapping tiles, each with its own frame batching, blended
  linearly over the overlap in diffusers' order (a tile is blended with the already blended tiles above and
  left), then cropped. Same-shaped tiles run by one ``lax.map`` body, so a 480 × 720 clip compiles 4 tile
  programs, not 9, and holds one tile's activations at a time.
* The decoder's norms are spatially conditioned on the latent chunk (``CogVideoXSpatialNorm3D``, nearest-resized,
  the first frame resized on its own when the frame count is odd).

Attribute names mirror diffusers (``encoder.down_blocks.0.resnets.1.conv1.conv``), so :mod:`.weights` imports its
state dict directly. Arrays are ``[B, T, H, W, C]``; latents come out as the posterior mean (the mode), times
``scaling_factor`` in :class:`CogVideoXCodec`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerflow_jax.dtypes import dtype_of
from layerflow_jax.encoders import weights as weights_lib

SAMPLE_FRAMES_PER_BATCH = 8  # diffusers' num_sample_frames_batch_size
LATENT_FRAMES_PER_BATCH = 2  # diffusers' num_latent_frames_batch_size


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' ``AutoencoderKLCogVideoX`` config (defaults: CogVideoX-2B)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
  latent_channels: int = 16
  layers_per_block: int = 3
  act_fn: str = "silu"
  norm_eps: float = 1e-6
  norm_num_groups: int = 32
  temporal_compression_ratio: float = 4
  sample_height: int = 480
  sample_width: int = 720
  scaling_factor: float = 1.15258426
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if self.act_fn != "silu":
      raise ValueError(f"CogVideoX VAE act_fn {self.act_fn!r} is not supported (expected 'silu')")
    if self.use_quant_conv or self.use_post_quant_conv:
      raise ValueError(
        "CogVideoX VAE with use_quant_conv / use_post_quant_conv is not supported "
        "(no CogVideoX checkpoint uses them)"
      )
    ratio = self.temporal_compression_ratio
    if ratio < 1 or 2 ** int(round(math.log2(ratio))) != ratio:
      raise ValueError(f"CogVideoX VAE temporal_compression_ratio must be a power of 2, got {ratio}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
        f"CogVideoX VAE block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}"
      )

  @classmethod
  def from_dict(cls, d: dict) -> "VAEConfig":
    """From a diffusers ``config.json`` (unknown fields ignored; block types checked)."""
    for key, want in (("down_block_types", "CogVideoXDownBlock3D"), ("up_block_types", "CogVideoXUpBlock3D")):
      types = d.get(key)
      if types is not None and any(t != want for t in types):
        raise ValueError(f"CogVideoX VAE {key} {types} unsupported: every block must be {want}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def compress_levels(self) -> int:
    """Blocks that halve time: the first log2(ratio), among those that downsample at all."""
    return min(int(round(math.log2(self.temporal_compression_ratio))), len(self.block_out_channels) - 1)

  @property
  def temporal_factor(self) -> int:
    return 2**self.compress_levels


@dataclasses.dataclass(frozen=True)
class Tiling:
  """diffusers' ``enable_tiling`` settings: tile size in pixels and the overlap fractions."""

  sample_height: int
  sample_width: int
  overlap_height: float = 1 / 6
  overlap_width: float = 1 / 5

  @classmethod
  def default(cls, cfg: VAEConfig, height: int = 0, width: int = 0) -> "Tiling":
    """diffusers' defaults: half the VAE's sample size (240 × 360 for CogVideoX)."""
    return cls(int(height or cfg.sample_height // 2), int(width or cfg.sample_width // 2))


# ----------------------------------------------------------------------------- frame batching and the frame rule


def frame_batches(num_frames: int, batch: int) -> list[tuple[int, int]]:
  """diffusers' (start, end) batches: ``max(T // batch, 1)`` of them, the first taking the remainder too."""
  n, rem = max(num_frames // batch, 1), num_frames % batch
  spans = [(batch * i + (0 if i == 0 else rem), batch * (i + 1) + rem) for i in range(n)]
  return [(s, min(e, num_frames)) for s, e in spans]


def _encoded_length(frames: int, levels: int) -> int:
  for _ in range(levels):
    frames = 1 + (frames - 1) // 2 if frames % 2 else frames // 2
  return frames


def _decoded_length(frames: int, levels: int) -> int:
  for _ in range(levels):
    frames = (1 + 2 * (frames - 1) if frames % 2 else 2 * frames) if frames > 1 else 1
  return frames


def encoded_frames(cfg: VAEConfig, frames: int) -> int:
  """Latent frames diffusers' batched encoder gives for ``frames`` frames."""
  spans = frame_batches(frames, SAMPLE_FRAMES_PER_BATCH)
  return sum(_encoded_length(e - s, cfg.compress_levels) for s, e in spans)


def decoded_frames(cfg: VAEConfig, latent: int) -> int:
  """Frames diffusers' batched decoder gives for ``latent`` latent frames."""
  spans = frame_batches(latent, LATENT_FRAMES_PER_BATCH)
  return sum(_decoded_length(e - s, cfg.compress_levels) for s, e in spans)


def latent_frames(cfg: VAEConfig, frames: int) -> int:
  """Latent frames of a clip, or a clear error when the clip would not decode back to ``frames`` frames."""
  if frames < 1:
    raise ValueError(f"clip frames must be >= 1, got {frames}")
  latent = encoded_frames(cfg, frames)
  if decoded_frames(cfg, latent) == frames:
    return latent
  ok = lambda f: decoded_frames(cfg, encoded_frames(cfg, f)) == f
  below = next((f for f in range(frames - 1, 0, -1) if ok(f)), None)
  above = next(f for f in range(frames + 1, 2 * frames + 4 * SAMPLE_FRAMES_PER_BATCH) if ok(f))
  r = cfg.temporal_factor
  raise ValueError(
    f"clip frames {frames}: CogVideoX's VAE needs 1 + {r}k frames (causal first frame), and with diffusers' "
    f"frame batching ({SAMPLE_FRAMES_PER_BATCH} frames / {LATENT_FRAMES_PER_BATCH} latents at a time) only "
    f"1 + {SAMPLE_FRAMES_PER_BATCH}k (e.g. 49) or {SAMPLE_FRAMES_PER_BATCH}k (e.g. 16) frames decode back to "
    f"the same count; {frames} → {latent} latents → {decoded_frames(cfg, latent)} frames. Nearest valid: "
    f"{below} or {above}"
  )


# ----------------------------------------------------------------------------- building blocks


def _resize_nearest(x, size: tuple[int, int, int]):
  """torch ``F.interpolate(mode="nearest", size=…)`` over (T, H, W) of ``[B, T, H, W, C]``."""
  for axis, n in zip((1, 2, 3), size):
    m = x.shape[axis]
    if n == m:
      continue
    if n % m == 0:
      x = jnp.repeat(x, n // m, axis=axis)
    else:  # torch: src = min(floor(dst · (in / out)), in − 1) in float32
      src = np.minimum(np.floor(np.arange(n, dtype=np.float32) * np.float32(m / n)).astype(np.int64), m - 1)
      x = jnp.take(x, jnp.asarray(src), axis=axis)
  return x


def _group_norm(channels: int, groups: int, eps: float, kw: dict) -> nnx.GroupNorm:
  # Statistics per sample over (T, H, W, channels of the group), as torch's GroupNorm on [B, C, T, H, W].
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, **kw)


class CausalConv3d(nnx.Module):
  """``CogVideoXCausalConv3d`` (pad mode "first"): returns the output and the conv cache for the next chunk."""

  def __init__(self, cin: int, cout: int, kernel_size: int, kw: dict):
    p = (kernel_size - 1) // 2
    self.time_kernel = kernel_size
    self.conv = nnx.Conv(cin, cout, (kernel_size,) * 3, padding=((0, 0), (p, p), (p, p)), **kw)

  def __call__(self, x, cache=None):
    k = self.time_kernel
    if k == 1:
      return self.conv(x), None
    pad = jnp.repeat(x[:, :1], k - 1, axis=1) if cache is None else cache.astype(x.dtype)
    x = jnp.concatenate([pad, x], axis=1)
    return self.conv(x), x[:, -(k - 1) :]


class SpatialNorm3D(nnx.Module):
  """``CogVideoXSpatialNorm3D``: GroupNorm(f) · conv_y(zq) + conv_b(zq), zq resized to f."""

  def __init__(self, f_channels: int, zq_channels: int, groups: int, kw: dict):
    self.norm_layer = _group_norm(f_channels, groups, 1e-6, kw)
    self.conv_y = CausalConv3d(zq_channels, f_channels, 1, kw)
    self.conv_b = CausalConv3d(zq_channels, f_channels, 1, kw)

  def __call__(self, f, zq):
    t, h, w = f.shape[1:4]
    if t > 1 and t % 2 == 1:
      zq = jnp.concatenate(
        [_resize_nearest(zq[:, :1], (1, h, w)), _resize_nearest(zq[:, 1:], (t - 1, h, w))], 1
      )
    else:
      zq = _resize_nearest(zq, (t, h, w))
    return self.norm_layer(f) * self.conv_y(zq)[0] + self.conv_b(zq)[0]


class ResnetBlock3D(nnx.Module):
  def __init__(self, cin: int, cout: int, *, groups: int, eps: float, spatial_norm_dim: int | None, kw: dict):
    if spatial_norm_dim is None:
      self.norm1, self.norm2 = _group_norm(cin, groups, eps, kw), _group_norm(cout, groups, eps, kw)
    else:
      self.norm1 = SpatialNorm3D(cin, spatial_norm_dim, groups, kw)
      self.norm2 = SpatialNorm3D(cout, spatial_norm_dim, groups, kw)
    self.conv1 = CausalConv3d(cin, cout, 3, kw)
    self.conv2 = CausalConv3d(cout, cout, 3, kw)
    self.conv_shortcut = nnx.Conv(cin, cout, (1, 1, 1), **kw) if cin != cout else None

  def __call__(self, x, zq=None, cache=None):
    cache = cache or {}
    norm = lambda n, h: n(h) if zq is None else n(h, zq)
    h, c1 = self.conv1(jax.nn.silu(norm(self.norm1, x)), cache.get("conv1"))
    h, c2 = self.conv2(jax.nn.silu(norm(self.norm2, h)), cache.get("conv2"))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return h + x, {"conv1": c1, "conv2": c2}


def _pool_time(x):
  b, t = x.shape[:2]
  return x.reshape(b, t // 2, 2, *x.shape[2:]).mean(axis=2)


class Downsample3D(nnx.Module):
  """``CogVideoXDownsample3D``: pairs of frames averaged (an odd first frame kept), then a stride-2 conv."""

  def __init__(self, channels: int, compress_time: bool, kw: dict):
    self.compress_time = compress_time
    self.conv = nnx.Conv(channels, channels, (3, 3), strides=(2, 2), padding="VALID", **kw)

  def __call__(self, x):
    if self.compress_time:
      if x.shape[1] % 2:
        rest = x[:, 1:]
        x = jnp.concatenate([x[:, :1], _pool_time(rest)], axis=1) if rest.shape[1] else x
      else:
        x = _pool_time(x)
    return self.conv(jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample3D(nnx.Module):
  """``CogVideoXUpsample3D``: nearest ×2 in space (and time, an odd first frame kept single), then a conv."""

  def __init__(self, channels: int, compress_time: bool, kw: dict):
    self.compress_time = compress_time
    self.conv = nnx.Conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)), **kw)

  def __call__(self, x):
    up = lambda t: jnp.repeat(jnp.repeat(t, 2, axis=2), 2, axis=3)
    if self.compress_time and x.shape[1] > 1:
      if x.shape[1] % 2:
        x = jnp.concatenate([up(x[:, :1]), jnp.repeat(up(x[:, 1:]), 2, axis=1)], axis=1)
      else:
        x = jnp.repeat(up(x), 2, axis=1)
    else:
      x = up(x)
    return self.conv(x)


class _ResnetStack(nnx.Module):
  """Down / mid / up block: resnets, then an optional resampler (``downsamplers`` or ``upsamplers``)."""

  def __init__(
    self, cin: int, cout: int, num_layers: int, *, groups: int, eps: float, spatial_norm_dim, kw: dict
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock3D(
          cin if i == 0 else cout, cout, groups=groups, eps=eps, spatial_norm_dim=spatial_norm_dim, kw=kw
        )
        for i in range(num_layers)
      ]
    )

  def _resnets(self, x, zq, cache):
    cache, new = cache or {}, {}
    for i, r in enumerate(self.resnets):
      x, new[f"resnet_{i}"] = r(x, zq, cache.get(f"resnet_{i}"))
    return x, new


class DownBlock3D(_ResnetStack):
  def __init__(self, cin, cout, num_layers, *, add_downsample: bool, compress_time: bool, **kwargs):
    super().__init__(cin, cout, num_layers, spatial_norm_dim=None, **kwargs)
    self.downsamplers = (
      nnx.List([Downsample3D(cout, compress_time, kwargs["kw"])]) if add_downsample else None
    )

  def __call__(self, x, cache=None):
    x, cache = self._resnets(x, None, cache)
    for d in self.downsamplers or ():
      x = d(x)
    return x, cache


class MidBlock3D(_ResnetStack):
  def __call__(self, x, zq=None, cache=None):
    return self._resnets(x, zq, cache)


class UpBlock3D(_ResnetStack):
  def __init__(self, cin, cout, num_layers, *, add_upsample: bool, compress_time: bool, **kwargs):
    super().__init__(cin, cout, num_layers, **kwargs)
    self.upsamplers = nnx.List([Upsample3D(cout, compress_time, kwargs["kw"])]) if add_upsample else None

  def __call__(self, x, zq, cache=None):
    x, cache = self._resnets(x, zq, cache)
    for u in self.upsamplers or ():
      x = u(x)
    return x, cache


class Encoder3D(nnx.Module):
  def __init__(self, cfg: VAEConfig, kw: dict):
    boc, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
    self.conv_in = CausalConv3d(cfg.in_channels, boc[0], 3, kw)
    self.down_blocks = nnx.List(
      [
        DownBlock3D(
          boc[max(i - 1, 0)],
          boc[i],
          cfg.layers_per_block,
          add_downsample=i < len(boc) - 1,
          compress_time=i < cfg.compress_levels,
          groups=g,
          eps=eps,
          kw=kw,
        )
        for i in range(len(boc))
      ]
    )
    self.mid_block = MidBlock3D(boc[-1], boc[-1], 2, groups=g, eps=eps, spatial_norm_dim=None, kw=kw)
    self.norm_out = _group_norm(boc[-1], g, 1e-6, kw)
    self.conv_out = CausalConv3d(boc[-1], 2 * cfg.latent_channels, 3, kw)

  def __call__(self, x, cache=None):
    cache, new = cache or {}, {}
    h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
    for i, blk in enumerate(self.down_blocks):
      h, new[f"down_block_{i}"] = blk(h, cache.get(f"down_block_{i}"))
    h, new["mid_block"] = self.mid_block(h, None, cache.get("mid_block"))
    h, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(h)), cache.get("conv_out"))
    return h, new


class Decoder3D(nnx.Module):
  def __init__(self, cfg: VAEConfig, kw: dict):
    rev, g, eps, zc = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps, cfg.latent_channels
    self.conv_in = CausalConv3d(zc, rev[0], 3, kw)
    self.mid_block = MidBlock3D(rev[0], rev[0], 2, groups=g, eps=eps, spatial_norm_dim=zc, kw=kw)
    self.up_blocks = nnx.List(
      [
        UpBlock3D(
          rev[max(i - 1, 0)],
          rev[i],
          cfg.layers_per_block + 1,
          add_upsample=i < len(rev) - 1,
          compress_time=i < cfg.compress_levels,
          groups=g,
          eps=eps,
          spatial_norm_dim=zc,
          kw=kw,
        )
        for i in range(len(rev))
      ]
    )
    self.norm_out = SpatialNorm3D(rev[-1], zc, g, kw)
    self.conv_out = CausalConv3d(rev[-1], cfg.out_channels, 3, kw)

  def __call__(self, z, cache=None):
    cache, new = cache or {}, {}
    h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
    h, new["mid_block"] = self.mid_block(h, z, cache.get("mid_block"))
    for i, blk in enumerate(self.up_blocks):
      h, new[f"up_block_{i}"] = blk(h, z, cache.get(f"up_block_{i}"))
    h, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(h, z)), cache.get("conv_out"))
    return h, new


# ----------------------------------------------------------------------------- chunking and tiling


def _over_time(fn: Callable, x, batch: int):
  """diffusers' frame batching: ``fn(chunk, cache) -> (out, cache)`` over time, the cache carried along."""
  spans = frame_batches(x.shape[1], batch)
  first, cache = fn(x[:, spans[0][0] : spans[0][1]], None)
  if len(spans) == 1:
    return first
  rest, n = x[:, spans[0][1] :], len(spans) - 1
  xs = jnp.moveaxis(rest.reshape(rest.shape[0], n, batch, *rest.shape[2:]), 1, 0)

  def step(c, chunk):
    out, c = fn(chunk, c)
    return c, out

  _, ys = jax.lax.scan(step, cache, xs)
  ys = jnp.moveaxis(ys, 0, 1)
  return jnp.concatenate([first, ys.reshape(ys.shape[0], n * ys.shape[2], *ys.shape[3:])], axis=1)


def _blend(a, b, extent: int, axis: int):
  """diffusers' ``blend_v`` / ``blend_h``: b's first rows fade in from a's last rows."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  w = jnp.asarray((np.arange(extent) / extent).reshape(shape), b.dtype)
  head = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * (1 - w)
  head = head + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * w
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _tiled(
  fn: Callable,
  x,
  *,
  tile: tuple[int, int],
  stride: tuple[int, int],
  blend: tuple[int, int],
  limit: tuple[int, int],
):
  """diffusers' tiled encode / decode over (H, W) of ``[B, T, H, W, C]``; ``fn`` maps one tile."""
  hs, ws = range(0, x.shape[2], stride[0]), range(0, x.shape[3], stride[1])
  tiles = {(i, j): x[:, :, i : i + tile[0], j : j + tile[1]] for i in hs for j in ws}
  groups: dict[tuple, list] = {}
  for key, t in tiles.items():
    groups.setdefault(t.shape, []).append(key)
  out = {}
  for keys in groups.values():  # one program per tile shape, tiles of that shape one after another
    if len(keys) == 1:
      out[keys[0]] = fn(tiles[keys[0]])
    else:
      ys = jax.lax.map(fn, jnp.stack([tiles[k] for k in keys]))
      out.update({k: ys[n] for n, k in enumerate(keys)})
  rows = [[out[(i, j)] for j in ws] for i in hs]
  result = []
  for r in range(len(rows)):
    row = []
    for c in range(len(rows[r])):
      t = rows[r][c]
      if r > 0:
        t = _blend(rows[r - 1][c], t, blend[0], axis=2)
      if c > 0:
        t = _blend(rows[r][c - 1], t, blend[1], axis=3)
      rows[r][c] = t  # diffusers blends in place: later tiles see the blended neighbours
      row.append(t[:, :, : limit[0], : limit[1]])
    result.append(jnp.concatenate(row, axis=3))
  return jnp.concatenate(result, axis=2)


class AutoencoderKLCogVideoX(nnx.Module):
  """diffusers' ``AutoencoderKLCogVideoX``: ``encode`` → posterior moments / mean, ``decode`` → pixels."""

  def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = Encoder3D(cfg, kw)
    self.decoder = Decoder3D(cfg, kw)

  def moments(self, x, tiling: Tiling | None = None, frames_per_batch: int = SAMPLE_FRAMES_PER_BATCH):
    """[B, T, H, W, in] → posterior parameters [B, t, h, w, 2·latent] (mean, then log-variance).

    ``frames_per_batch``: diffusers' frame batching (8); the number of frames = one pass (the official SAT VAE)."""
    run = lambda v: _over_time(self.encoder, v, frames_per_batch)
    if tiling is None or (x.shape[3] <= tiling.sample_width and x.shape[2] <= tiling.sample_height):
      return run(x)
    f = self.cfg.spatial_factor
    lat = (int(tiling.sample_height / f), int(tiling.sample_width / f))
    blend = (int(lat[0] * tiling.overlap_height), int(lat[1] * tiling.overlap_width))
    return _tiled(
      run,
      x,
      tile=(tiling.sample_height, tiling.sample_width),
      stride=(
        int(tiling.sample_height * (1 - tiling.overlap_height)),
        int(tiling.sample_width * (1 - tiling.overlap_width)),
      ),
      blend=blend,
      limit=(lat[0] - blend[0], lat[1] - blend[1]),
    )

  def encode(self, x, tiling: Tiling | None = None):
    """The posterior mode (its mean), unscaled."""
    return self.moments(x, tiling)[..., : self.cfg.latent_channels]

  def decode(self, z, tiling: Tiling | None = None):
    """Unscaled latents [B, t, h, w, latent] → [B, T, H, W, out]."""
    run = lambda v: _over_time(self.decoder, v, LATENT_FRAMES_PER_BATCH)
    f = self.cfg.spatial_factor
    if tiling is None:
      return run(z)
    lat = (int(tiling.sample_height / f), int(tiling.sample_width / f))
    if z.shape[3] <= lat[1] and z.shape[2] <= lat[0]:
      return run(z)
    blend = (
      int(tiling.sample_height * tiling.overlap_height),
      int(tiling.sample_width * tiling.overlap_width),
    )
    return _tiled(
      run,
      z,
      tile=lat,
      stride=(int(lat[0] * (1 - tiling.overlap_height)), int(lat[1] * (1 - tiling.overlap_width))),
      blend=blend,
      limit=(tiling.sample_height - blend[0], tiling.sample_width - blend[1]),
    )


def from_state_dict(
  cfg: VAEConfig, state_dict, *, dtype=jnp.float32, param_dtype=jnp.float32
) -> AutoencoderKLCogVideoX:
  """Our VAE with the parameters of a diffusers ``AutoencoderKLCogVideoX`` state dict."""
  return weights_lib.build_module(
    lambda: AutoencoderKLCogVideoX(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
    state_dict,
    what="CogVideoX VAE",
  )


def load_pretrained(
  path: str, dtype: str = "float32", param_dtype: str = "float32"
) -> AutoencoderKLCogVideoX:
  """A diffusers VAE directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) → our VAE."""
  cfg = VAEConfig.from_dict(weights_lib.read_config(path))
  return from_state_dict(
    cfg,
    weights_lib.read_safetensors(path),
    dtype=dtype_of(dtype, "autoencoder.dtype"),
    param_dtype=dtype_of(param_dtype, "autoencoder.param_dtype"),
  )


# ----------------------------------------------------------------------------- the Autoencoder


class CogVideoXCodec:
  """The :class:`layerflow_jax.codec.Autoencoder` over the VAE: pixels in [-1, 1] ↔ latents × scaling_factor.

  Encoding takes the posterior mode (deterministic, as a latent cache wants). The weights load on first use, so
  building the codec to ask for shapes (``DiTConfig.from_config``) reads only ``config.json``. Outputs are float32
  and ``stop_gradient``-ed (the VAE is frozen).

  Args:
    cfg: the VAE's configuration.
    model: a VAE, or a zero-argument callable returning one (called once, on first use).
    dtype: compute dtype the inputs are cast to.
    tiling: spatial tiling (None: whole frames).
    cache_key: codecs with the same key (and mesh) share one loaded copy (see ``weights.load_frozen``).
  """

  def __init__(
    self,
    cfg: VAEConfig,
    model: AutoencoderKLCogVideoX | Callable[[], AutoencoderKLCogVideoX],
    *,
    dtype=jnp.float32,
    tiling: Tiling | None = None,
    cache_key: Any = None,
  ):
    self.cfg = cfg
    self.spatial_factor = cfg.spatial_factor
    self.temporal_factor = cfg.temporal_factor
    self.latent_channels = cfg.latent_channels
    self.scaling_factor = float(cfg.scaling_factor)
    self.dtype = dtype
    self.tiling = tiling
    self._model, self._load = (model, None) if isinstance(model, AutoencoderKLCogVideoX) else (None, model)
    self._cache_key = cache_key

  @classmethod
  def from_pretrained(
    cls,
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    tiling: bool = True,
    tile_height: int = 0,
    tile_width: int = 0,
  ) -> "CogVideoXCodec":
    """``param_dtype`` None = ``dtype`` (frozen weights need no float32 master copy)."""
    cfg = VAEConfig.from_dict(weights_lib.read_config(path))
    param_dtype = param_dtype or dtype
    return cls(
      cfg,
      lambda: load_pretrained(str(path), dtype, param_dtype),
      dtype=dtype_of(dtype, "autoencoder.dtype"),
      tiling=Tiling.default(cfg, tile_height, tile_width) if tiling else None,
      cache_key=("cogvideox_vae", str(pathlib.Path(path).resolve()), dtype, param_dtype),
    )

  @property
  def model(self) -> AutoencoderKLCogVideoX:
    if self._model is None:
      if self._load is None:
        raise RuntimeError("this CogVideoXCodec was built without weights (shapes only)")
      self._model = weights_lib.load_frozen(self._load, self._cache_key)
    return self._model

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    t = latent_frames(self.cfg, frames)
    f = self.spatial_factor
    for name, value in (("height", height), ("width", width)):
      if value % f:
        raise ValueError(f"clip {name} {value} is not divisible by the VAE's spatial compression factor {f}")
    return t, height // f, width // f, self.latent_channels

  def encode(self, video):
    video = jnp.asarray(video)
    self.latent_shape(*video.shape[1:4])
    if video.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"VAE input has {video.shape[-1]} channels, expected {self.cfg.in_channels}")
    z = self.model.encode(video.astype(self.dtype), self.tiling).astype(jnp.float32)
    return jax.lax.stop_gradient(z * self.scaling_factor)

  def encode_packed(self, video, rng=None):
    """The whole video in one pass, without frame batching or tiling, as the official SAT code encodes a packed
    LayerFlow stack (causal context and GroupNorm statistics across sub-clips); ``rng``: a posterior sample
    (mean + exp(logvar / 2) · N(0, 1), logvar clipped to [-30, 20] as diffusers does) instead of the mode."""
    video = jnp.asarray(video)
    if video.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"VAE input has {video.shape[-1]} channels, expected {self.cfg.in_channels}")
    m = self.model.moments(video.astype(self.dtype), None, frames_per_batch=video.shape[1]).astype(
      jnp.float32
    )
    mean, logvar = m[..., : self.latent_channels], m[..., self.latent_channels :]
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(
        rng, mean.shape, jnp.float32
      )
    return jax.lax.stop_gradient(z * self.scaling_factor)

  def decode(self, latents):
    latents = jnp.asarray(latents)
    if latents.shape[-1] != self.latent_channels:
      raise ValueError(f"latents have {latents.shape[-1]} channels, expected {self.latent_channels}")
    x = self.model.decode((latents / self.scaling_factor).astype(self.dtype), self.tiling)
    return jax.lax.stop_gradient(x.astype(jnp.float32))
