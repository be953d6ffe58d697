"""Fixed embeddings of CogVideoX: timestep sinusoids, the 3D sin-cos table and the 3D rotary table.

All tables are NumPy constants computed from static shapes (they are never parameters), following
diffusers' ``get_timestep_embedding``, ``get_3d_sincos_pos_embed`` and ``get_3d_rotary_pos_embed``.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np


def timestep_embedding(
  t, dim: int, *, flip_sin_to_cos: bool = True, shift: float = 0.0, max_period: float = 10000.0
):
  """Sinusoidal embedding of (possibly fractional) timesteps [B] → [B, dim], computed in float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_3d(
  dim: int,
  frames: int,
  height: int,
  width: int,
  spatial_interpolation_scale: float = 1.875,
  temporal_interpolation_scale: float = 1.0,
) -> np.ndarray:
  """[frames * height * width, dim] table (¼ channels temporal, ¾ spatial), tokens ordered (frame, row, col)."""
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  dim_spatial, dim_temporal = 3 * dim // 4, dim // 4
  grid_h = np.arange(height, dtype=np.float64) / spatial_interpolation_scale
  grid_w = np.arange(width, dtype=np.float64) / spatial_interpolation_scale
  gw, gh = np.meshgrid(grid_w, grid_h, indexing="xy")  # each [height, width]
  # diffusers' 2D helper embeds grid[0] (the column coordinate) in the first half, rows in the second.
  spatial = np.concatenate([_sincos_1d(dim_spatial // 2, gw), _sincos_1d(dim_spatial // 2, gh)], axis=1)
  grid_t = np.arange(frames, dtype=np.float64) / temporal_interpolation_scale
  temporal = _sincos_1d(dim_temporal, grid_t)  # [frames, dim/4]
  spatial = np.broadcast_to(spatial[None], (frames, height * width, dim_spatial))
  temporal = np.broadcast_to(temporal[:, None], (frames, height * width, dim_temporal))
  table = np.concatenate([temporal, spatial], axis=-1).reshape(frames * height * width, dim)
  return table.astype(np.float32)


def _rope_1d(dim: int, pos: np.ndarray, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
  ang = np.outer(pos.astype(np.float64), freqs)  # [n, dim/2]
  return np.repeat(np.cos(ang), 2, axis=1), np.repeat(np.sin(ang), 2, axis=1)  # interleaved pairs


@functools.lru_cache(maxsize=32)
def rope_3d(
  head_dim: int,
  frames: int,
  height: int,
  width: int,
  crop: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin) [frames * height * width, head_dim] of CogVideoX's 3D RoPE (t: ¼, h: ⅜, w: ⅜ of head_dim).

  ``crop`` = ((top, left), (bottom, right)) grid coordinates; default covers the grid at integer positions,
  which is what the CogVideoX pipeline computes at its base resolution.
  """
  (top, left), (bottom, right) = crop if crop is not None else ((0.0, 0.0), (float(height), float(width)))
  dim_t, dim_h, dim_w = head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3
  grid_h = np.linspace(top, bottom, height, endpoint=False, dtype=np.float32)
  grid_w = np.linspace(left, right, width, endpoint=False, dtype=np.float32)
  grid_t = np.arange(frames, dtype=np.float32)
  ct, st = _rope_1d(dim_t, grid_t)
  ch, sh = _rope_1d(dim_h, grid_h)
  cw, sw = _rope_1d(dim_w, grid_w)

  def combine(t, h, w):
    t = np.broadcast_to(t[:, None, None, :], (frames, height, width, t.shape[-1]))
    h = np.broadcast_to(h[None, :, None, :], (frames, height, width, h.shape[-1]))
    w = np.broadcast_to(w[None, None, :, :], (frames, height, width, w.shape[-1]))
    return np.concatenate([t, h, w], axis=-1).reshape(frames * height * width, -1).astype(np.float32)

  return combine(ct, ch, cw), combine(st, sh, sw)


def apply_rope(x, cos, sin):
  """Rotates interleaved pairs of x [B, T, heads, head_dim] by the tables [T, head_dim] (float32 math)."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(dtype)
