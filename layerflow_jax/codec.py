"""Autoencoders between pixels and latents: the interface, and a parameter-free pixel codec.

CogVideoX encodes video with a 3D causal VAE (8× spatial, 4× temporal, 16 channels, scaling factor
1.15258426). The demo uses :class:`PixelCodec`: space-to-depth over ``spatial × spatial`` pixels and
``temporal`` frames, which is lossless, has no parameters and keeps the same
``[N, frames, height, width, channels]`` contract, so the VAE (``kind = "cogvideox"``,
:class:`layerflow_jax.encoders.vae.CogVideoXCodec`) plugs in behind the same interface.

Each LayerFlow sub-clip is encoded on its own (``encode_clips``), then the latent clips are packed on the
time axis again.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import einops
import jax

from layerflow_jax import layers
from layerflow_jax.encoders import vae, weights


@runtime_checkable
class Autoencoder(Protocol):
  spatial_factor: int
  temporal_factor: int
  latent_channels: int

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(latent frames, latent height, latent width, channels) for a clip; clear error if not divisible."""
    ...

  def encode(self, video, /) -> jax.Array:
    """[N, T, H, W, 3] in [-1, 1] → scaled latents [N, t, h, w, c]."""
    ...

  def decode(self, latents, /) -> jax.Array:
    """Scaled latents [N, t, h, w, c] → [N, T, H, W, 3]."""
    ...


@runtime_checkable
class PackedAutoencoder(Autoencoder, Protocol):
  """An :class:`Autoencoder` that can also encode a whole packed LayerFlow stack in one pass
  (``autoencoder.packed_pass``; :class:`layerflow_jax.encoders.vae.CogVideoXCodec`). Optional: codecs
  without it encode the stack with ``encode``."""

  def encode_packed(self, video, rng: jax.Array | None = None) -> jax.Array:
    """[N, T, H, W, 3] in [-1, 1] → scaled latents, with causal context across sub-clips; ``rng``: draw
    from the posterior instead of taking its mode."""
    ...


class PixelCodec:
  """Space-to-depth codec: ``c = 3 · temporal · spatial²`` latent channels, multiplied by ``scaling_factor``."""

  def __init__(self, spatial: int = 4, temporal: int = 2, scaling_factor: float = 1.0):
    if spatial < 1 or temporal < 1:
      raise ValueError(f"PixelCodec factors must be >= 1, got spatial={spatial}, temporal={temporal}")
    self.spatial_factor = int(spatial)
    self.temporal_factor = int(temporal)
    self.latent_channels = 3 * self.spatial_factor**2 * self.temporal_factor
    self.scaling_factor = float(scaling_factor)

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    s, t = self.spatial_factor, self.temporal_factor
    for name, value, factor in (("frames", frames, t), ("height", height, s), ("width", width, s)):
      if value % factor:
        raise ValueError(f"clip {name} {value} is not divisible by the codec's compression factor {factor}")
    return frames // t, height // s, width // s, self.latent_channels

  def encode(self, video):
    self.latent_shape(*video.shape[1:4])
    z = einops.rearrange(
      video,
      "n (t dt) (h dh) (w dw) c -> n t h w (dt dh dw c)",
      dt=self.temporal_factor,
      dh=self.spatial_factor,
      dw=self.spatial_factor,
    )
    return z * self.scaling_factor

  def decode(self, latents):
    x = einops.rearrange(
      latents / self.scaling_factor,
      "n t h w (dt dh dw c) -> n (t dt) (h dh) (w dw) c",
      dt=self.temporal_factor,
      dh=self.spatial_factor,
      dw=self.spatial_factor,
      c=3,
    )
    return x


class LatentCodec:
  """Latents only: the shapes of a ``spatial``×/``temporal``× video autoencoder with ``latent_channels`` channels
  (CogVideoX: 8, 4, 16; ``1 + 4k`` or ``4k`` frames per clip), and no pixel encoder or decoder. A checkpoint
  imported without its VAE gets it, so it loads, trains on cached latents and exports; pixel work is refused."""

  def __init__(self, spatial: int = 8, temporal: int = 4, latent_channels: int = 16):
    self.spatial_factor, self.temporal_factor = int(spatial), int(temporal)
    self.latent_channels = int(latent_channels)

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    s, t = self.spatial_factor, self.temporal_factor
    if frames % t not in (0, 1) or frames < 1 or height % s or width % s:
      raise ValueError(
        f"clip {frames}x{height}x{width}: a latent codec ({t}x temporal, {s}x spatial) takes "
        f"1 + {t}k or {t}k frames and sizes divisible by {s}"
      )
    return frames // t + frames % t, height // s, width // s, self.latent_channels

  def _refuse(self, *_):
    raise ValueError(
      "autoencoder.kind 'latent' has no pixel encoder/decoder (the checkpoint was imported without "
      "a VAE): set --config.autoencoder.kind=cogvideox --config.autoencoder.path=<CogVideoX-2b>/vae "
      "for pixel work"
    )

  encode = decode = _refuse


def encode_clips(codec: Autoencoder, video, num_clips: int):
  """Packed pixels [B, num_clips·T, H, W, 3] → packed latents [B, num_clips·t, h, w, c], one clip at a time."""
  clips = layers.unpack(video, num_clips)
  b, n = clips.shape[:2]
  z = codec.encode(clips.reshape((b * n,) + tuple(clips.shape[2:])))
  return layers.pack(z.reshape((b, n) + tuple(z.shape[1:])))


def decode_clips(codec: Autoencoder, latents, num_clips: int):
  """Packed latents → packed pixels, one clip at a time."""
  clips = layers.unpack(latents, num_clips)
  b, n = clips.shape[:2]
  x = codec.decode(clips.reshape((b * n,) + tuple(clips.shape[2:])))
  return layers.pack(x.reshape((b, n) + tuple(x.shape[1:])))


def make_codec(cfg) -> Autoencoder:
  """Builds the autoencoder named by ``cfg.kind`` (a ConfigDict, ``autoencoder`` in the configs).

  * ``pixel``: :class:`PixelCodec` (``spatial``, ``temporal``, ``scaling_factor``).
  * ``latent``: :class:`LatentCodec` (``spatial``, ``temporal``, ``latent_channels``): shapes only, no pixels.
  * ``cogvideox``: CogVideoX's 3D causal VAE (:mod:`layerflow_jax.encoders.vae`) from ``path`` (a diffusers
    ``AutoencoderKLCogVideoX`` directory; its ``config.json`` gives the scaling factor), ``dtype``, ``tiling``
    with ``tile_height`` / ``tile_width`` (0 = diffusers' defaults, 240 × 360). Weights load on first use.
  """
  if cfg.kind == "pixel":
    return PixelCodec(spatial=cfg.spatial, temporal=cfg.temporal, scaling_factor=cfg.scaling_factor)
  if cfg.kind == "cogvideox":
    if not cfg.path:
      raise ValueError(
        "autoencoder.path: required for kind 'cogvideox' (an AutoencoderKLCogVideoX directory)"
      )
    codec = vae.CogVideoXCodec.from_pretrained(
      cfg.path, dtype=cfg.dtype, tiling=cfg.tiling, tile_height=cfg.tile_height, tile_width=cfg.tile_width
    )
    weights.hoist_closed_over_weights()
    return codec
  if cfg.kind == "latent":
    return LatentCodec(spatial=cfg.spatial, temporal=cfg.temporal, latent_channels=cfg.latent_channels)
  raise ValueError(
    f"autoencoder.kind: unknown autoencoder {cfg.kind!r}; expected 'pixel', 'cogvideox' or 'latent'"
  )
