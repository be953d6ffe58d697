"""Text encoders: the interface the model's conditioning uses, and a built-in byte-level encoder.

The LayerFlow model is conditioned on per-layer prompts, each encoded separately to ``max_length`` tokens of
width ``dim`` and concatenated on the token axis. CogVideoX uses a frozen T5-v1.1-XXL (226 tokens, 4096 wide);
the demo uses :class:`ByteTextEncoder`, which needs no download: bytes → fixed random embeddings → two fixed
random causal-free 1-D convolutions (character n-gram features) + a sinusoidal position code. It is frozen and
deterministic from its seed, like a pretrained encoder, and behaves like one for the trainer (no parameters).

Any encoder implementing :class:`TextEncoder` plugs in: ``kind = "t5"`` selects CogVideoX's T5-v1.1
(:class:`layerflow_jax.encoders.t5.T5TextEncoder`).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from layerflow_jax.encoders import t5, weights


@runtime_checkable
class TextEncoder(Protocol):
  max_length: int  # tokens per prompt (padded / truncated)
  dim: int  # embedding width (the model's text_embed_dim)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts → int32 token ids [len(prompts), max_length]."""
    ...

  def encode(self, tokens, /) -> jax.Array:
    """int32 ids [..., max_length] → float32 embeddings [..., max_length, dim] (jit-compatible)."""
    ...


def _sinusoid(length: int, dim: int) -> np.ndarray:
  pos = np.arange(length, dtype=np.float64)[:, None]
  freq = np.exp(-np.log(10000.0) * np.arange(dim // 2, dtype=np.float64) / max(dim // 2, 1))[None]
  ang = pos * freq
  return np.concatenate([np.sin(ang), np.cos(ang)], axis=1).astype(np.float32)


class ByteTextEncoder:
  """UTF-8 bytes (id = byte + 1, 0 = padding) → frozen random n-gram features.

  Args:
    max_length: tokens per prompt (longer prompts are truncated at a byte boundary).
    dim: output width.
    seed: fixes every table; two encoders with the same arguments are identical.
    width: kernel width of each of the two convolutions (receptive field 2·width − 1 characters).
  """

  VOCAB = 257

  def __init__(self, max_length: int = 32, dim: int = 64, seed: int = 0, width: int = 3):
    if max_length <= 0 or dim <= 0 or dim % 2:
      raise ValueError(f"ByteTextEncoder needs max_length > 0 and an even dim > 0, got {max_length}, {dim}")
    self.max_length = int(max_length)
    self.dim = int(dim)
    self.width = int(width)
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((self.VOCAB, dim)).astype(np.float32)
    table[0] = 0.0  # padding embeds to zero before the position code
    self._table = table
    scale = 1.0 / np.sqrt(width * dim)
    self._w1 = (rng.standard_normal((width, dim, dim)) * scale).astype(np.float32)
    self._w2 = (rng.standard_normal((width, dim, dim)) * scale).astype(np.float32)
    self._pos = 0.1 * _sinusoid(max_length, dim)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      raise TypeError("tokenize takes a sequence of prompts, not a single string")
    out = np.zeros((len(prompts), self.max_length), dtype=np.int32)
    for i, p in enumerate(prompts):
      ids = np.frombuffer(str(p).encode("utf-8")[: self.max_length], dtype=np.uint8).astype(np.int32) + 1
      out[i, : len(ids)] = ids
    return out

  def _conv(self, x, w, xp):
    # Same-padded 1-D convolution on the token axis as a sum of shifted matmuls.
    half = self.width // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(half, self.width - 1 - half), (0, 0)]
    xpad = xp.pad(x, pad)
    length = x.shape[-2]
    return sum(xpad[..., k : k + length, :] @ w[k] for k in range(self.width))

  def encode(self, tokens):
    tokens = jnp.asarray(tokens)
    if tokens.shape[-1] != self.max_length:
      raise ValueError(f"expected {self.max_length} tokens per prompt, got shape {tokens.shape}")
    x = jnp.asarray(self._table)[tokens]
    h = jnp.tanh(self._conv(x, jnp.asarray(self._w1), jnp))
    h = jnp.tanh(self._conv(h, jnp.asarray(self._w2), jnp)) + x
    mask = (tokens > 0)[..., None].astype(h.dtype)
    return h * mask + jnp.asarray(self._pos)


def make_text_encoder(cfg) -> TextEncoder:
  """Builds the encoder named by ``cfg.kind`` (a ConfigDict, ``text_encoder`` in the configs).

  * ``byte``: :class:`ByteTextEncoder` (``max_length``, ``dim``, ``seed``).
  * ``t5``: T5-v1.1 (:mod:`layerflow_jax.encoders.t5`) from ``path`` (a transformers ``T5EncoderModel``
    directory: ``config.json`` + safetensors) and ``tokenizer`` (a ``spiece.model``; empty = found next to
    ``path``); ``max_length`` (CogVideoX: 226), ``dim`` (must equal the checkpoint's ``d_model``), ``dtype``,
    ``attention_mask`` (False, as CogVideoX). Weights load on the first ``encode``.
  """
  if cfg.kind == "byte":
    return ByteTextEncoder(max_length=cfg.max_length, dim=cfg.dim, seed=cfg.seed)
  if cfg.kind == "t5":
    if not cfg.path:
      raise ValueError("text_encoder.path: required for kind 't5' (a T5EncoderModel checkpoint directory)")
    enc = t5.T5TextEncoder.from_pretrained(
      cfg.path,
      tokenizer=cfg.tokenizer,
      max_length=cfg.max_length,
      dtype=cfg.dtype,
      use_attention_mask=cfg.attention_mask,
    )
    if enc.dim != cfg.dim:
      raise ValueError(
        f"text_encoder.dim {cfg.dim} does not match the T5 checkpoint's d_model {enc.dim} ({cfg.path})"
      )
    weights.hoist_closed_over_weights()
    return enc
  raise ValueError(f"text_encoder.kind: unknown encoder {cfg.kind!r}; expected 'byte' or 't5'")
