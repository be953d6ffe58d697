"""T5-v1.1 encoder in Flax NNX (CogVideoX's text encoder) and its SentencePiece tokenizer.

T5-v1.1 differs from the original T5 in ways parity depends on: a gated GELU feed-forward (``wi_0``, ``wi_1``,
tanh-approximated GELU), untied heads, no biases anywhere, RMSNorm (``T5LayerNorm``: no mean, no bias, statistics
in float32), unscaled attention logits (T5 folds the scale into its initialisation) plus a learned relative
position bias that only the first block owns and every block reuses (bidirectional buckets: half exact, half
logarithmic up to ``relative_attention_max_distance``).

Attribute names mirror transformers' ``T5EncoderModel`` (``shared``, ``encoder.block.N.layer.0.SelfAttention.q``,
``encoder.block.N.layer.1.DenseReluDense.wi_0``, ``encoder.final_layer_norm``), so :mod:`.weights` imports its
safetensors directly. CogVideoX pads every prompt to 226 tokens and runs T5 without an attention mask (the
padding tokens are attended to); :class:`T5TextEncoder` does the same unless ``use_attention_mask`` is set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import nnx

from layerflow_jax.dtypes import dtype_of
from layerflow_jax.encoders import weights as weights_lib

# transformers keys the module may carry besides ours: the encoder's copy of the tied embedding.
_ALIASES = {"encoder.embed_tokens.weight": "shared.weight"}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of a transformers ``T5Config`` an encoder needs (defaults: T5-v1.1-XXL, as CogVideoX uses)."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    if self.feed_forward_proj != "gated-gelu":
      raise ValueError(
        f"T5 feed_forward_proj {self.feed_forward_proj!r} is not supported; this encoder is "
        "T5-v1.1 ('gated-gelu')"
      )

  @classmethod
  def from_dict(cls, d: dict) -> "T5Config":
    """From a transformers ``config.json`` (unknown fields ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def relative_position_bucket(
  relative_position: np.ndarray, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
  """T5's bucket of each ``key − query`` offset; float32 arithmetic as transformers does, so boundaries agree."""
  rp = np.asarray(relative_position, dtype=np.int64)
  buckets = np.zeros_like(rp)
  if bidirectional:
    num_buckets //= 2
    buckets += (rp > 0).astype(np.int64) * num_buckets
    rp = np.abs(rp)
  else:
    rp = -np.minimum(rp, 0)
  max_exact = num_buckets // 2
  is_small = rp < max_exact
  ratio = np.maximum(rp, 1).astype(np.float32) / np.float32(max_exact)
  scaled = (
    np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
  )
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return buckets + np.where(is_small, rp, large)


class T5Attention(nnx.Module):
  def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    lin = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.head_dim = cfg.num_heads, cfg.d_kv
    self.q, self.k, self.v = lin(cfg.d_model, inner), lin(cfg.d_model, inner), lin(cfg.d_model, inner)
    self.o = lin(inner, cfg.d_model)
    if has_relative_attention_bias:
      self.relative_attention_bias = nnx.Embed(
        cfg.relative_attention_num_buckets,
        cfg.num_heads,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        rngs=rngs,
      )

  def __call__(self, x, position_bias, mask):
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
    out = jax.nn.dot_product_attention(
      split(self.q(x)),
      split(self.k(x)),
      split(self.v(x)),
      bias=position_bias.astype(x.dtype),
      mask=mask,
      scale=1.0,
    )
    return self.o(out.reshape(b, l, -1))


class T5RMSNorm(nnx.RMSNorm):
  """``T5LayerNorm``: RMS statistics in float32, result in the compute dtype."""

  def __init__(self, cfg: T5Config, *, param_dtype, rngs: nnx.Rngs):
    super().__init__(
      cfg.d_model, epsilon=cfg.layer_norm_epsilon, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x, mask=None):
    return super().__call__(x.astype(jnp.float32), mask).astype(x.dtype)


class T5LayerSelfAttention(nnx.Module):
  def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.SelfAttention = T5Attention(
      cfg, has_relative_attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.layer_norm = T5RMSNorm(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, position_bias, mask):
    return x + self.SelfAttention(self.layer_norm(x), position_bias, mask)


class T5DenseGatedActDense(nnx.Module):
  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    lin = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0, self.wi_1 = lin(cfg.d_model, cfg.d_ff), lin(cfg.d_model, cfg.d_ff)
    self.wo = lin(cfg.d_ff, cfg.d_model)

  def __call__(self, x):
    return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5LayerFF(nnx.Module):
  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.DenseReluDense = T5DenseGatedActDense(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = T5RMSNorm(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
  def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.layer: nnx.List[Any] = nnx.List(
      [  # the attention and the feed-forward sublayer
        T5LayerSelfAttention(
          cfg, has_relative_attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        ),
        T5LayerFF(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
      ]
    )

  def __call__(self, x, position_bias, mask):
    return self.layer[1](self.layer[0](x, position_bias, mask))


class T5Stack(nnx.Module):
  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.block = nnx.List(
      [T5Block(cfg, i == 0, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for i in range(cfg.num_layers)]
    )
    self.final_layer_norm = T5RMSNorm(cfg, param_dtype=param_dtype, rngs=rngs)

  def position_bias(self, length: int):
    """[1, heads, L, L] from the first block's bucket embedding (shared by all blocks)."""
    pos = np.arange(length)
    buckets = relative_position_bucket(
      pos[None, :] - pos[:, None],
      bidirectional=True,
      num_buckets=self.cfg.relative_attention_num_buckets,
      max_distance=self.cfg.relative_attention_max_distance,
    )
    table = self.block[0].layer[0].SelfAttention.relative_attention_bias(jnp.asarray(buckets, jnp.int32))
    return jnp.transpose(table, (2, 0, 1))[None]

  def __call__(self, x, mask):
    bias = self.position_bias(x.shape[1])
    for blk in self.block:
      x = blk(x, bias, mask)
    return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
  """transformers' ``T5EncoderModel``: token ids [B, L] → last hidden states [B, L, d_model]."""

  def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = T5Stack(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None):
    """``attention_mask`` [B, L] (1 = attend), None = attend to every token (padding included, as CogVideoX)."""
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
    return self.encoder(self.shared(input_ids), mask)


def from_state_dict(
  cfg: T5Config, state_dict, *, dtype=jnp.float32, param_dtype=jnp.float32
) -> T5EncoderModel:
  """Our encoder with the parameters of a transformers ``T5EncoderModel`` state dict."""
  return weights_lib.build_module(
    lambda: T5EncoderModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
    state_dict,
    what="T5 encoder",
    aliases=_ALIASES,
  )


def load_pretrained(path: str, dtype: str = "float32", param_dtype: str = "float32") -> T5EncoderModel:
  """A ``T5EncoderModel`` checkpoint directory (``config.json`` + safetensors, sharded or not) → our encoder."""
  cfg = T5Config.from_dict(weights_lib.read_config(path))
  return from_state_dict(
    cfg,
    weights_lib.read_safetensors(path),
    dtype=dtype_of(dtype, "text_encoder.dtype"),
    param_dtype=dtype_of(param_dtype, "text_encoder.param_dtype"),
  )


# ----------------------------------------------------------------------------- tokenizer


def find_spiece(path: str = "", tokenizer: str = "") -> pathlib.Path:
  """The ``spiece.model``: ``tokenizer`` (a file or a directory holding one), else next to or beside ``path``
  (``<path>/spiece.model``, ``<path>/../tokenizer/spiece.model`` — the diffusers pipeline layout)."""
  if tokenizer:
    t = pathlib.Path(tokenizer)
    t = t / "spiece.model" if t.is_dir() else t
    if not t.is_file():
      raise FileNotFoundError(f"text_encoder.tokenizer: {str(t)!r} is not a SentencePiece model file")
    return t
  if path:
    p = pathlib.Path(path)
    for cand in (p / "spiece.model", p.parent / "tokenizer" / "spiece.model"):
      if cand.is_file():
        return cand
  raise FileNotFoundError(f"no spiece.model found for text_encoder.path={path!r}; set text_encoder.tokenizer")


class SentencePieceTokenizer:
  """T5's tokenizer: SentencePiece ids, ``</s>`` appended, truncated and padded to ``max_length`` (as transformers'
  ``T5Tokenizer(padding="max_length", truncation=True)``)."""

  def __init__(self, model_file: str | pathlib.Path, max_length: int = 226):
    if max_length < 1:
      raise ValueError(f"tokenizer max_length must be >= 1, got {max_length}")
    self.model_file = str(model_file)
    self.max_length = int(max_length)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
    self.pad_id, self.eos_id = int(self._sp.pad_id()), int(self._sp.eos_id())
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(
        f"{self.model_file}: a T5 SentencePiece model needs pad and eos ids "
        f"(got pad={self.pad_id}, eos={self.eos_id})"
      )

  def __getstate__(self):  # picklable for Grain worker processes: reload the model file there
    return {"model_file": self.model_file, "max_length": self.max_length}

  def __setstate__(self, state):
    self.__init__(state["model_file"], state["max_length"])

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      raise TypeError("tokenize takes a sequence of prompts, not a single string")
    out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
    for i, ids in enumerate(self._sp.encode([str(p) for p in prompts])):
      ids = list(ids)[: self.max_length - 1] + [self.eos_id]
      out[i, : len(ids)] = ids
    return out


# ----------------------------------------------------------------------------- the TextEncoder


class T5TextEncoder:
  """The :class:`layerflow_jax.text.TextEncoder` over T5: prompts → ids [N, max_length] → float32 [N, L, d_model].

  The weights load on the first ``encode`` (building the encoder for tokenization alone — the data pipeline —
  reads only ``config.json`` and the tokenizer). Outputs are ``stop_gradient``-ed: the encoder is frozen.

  Args:
    tokenizer: a :class:`SentencePieceTokenizer` (its ``max_length`` is the encoder's).
    model: an encoder, or a zero-argument callable returning one (called once, on first use).
    dim: the encoder's width (``d_model``), known without loading the weights.
    use_attention_mask: mask padding keys (transformers' ``attention_mask``); CogVideoX does not.
    cache_key: encoders with the same key (and mesh) share one loaded copy (see ``weights.load_frozen``).
  """

  def __init__(
    self,
    tokenizer: SentencePieceTokenizer,
    model: T5EncoderModel | Callable[[], T5EncoderModel],
    *,
    dim: int,
    use_attention_mask: bool = False,
    cache_key: Any = None,
  ):
    self.tokenizer = tokenizer
    self.max_length = tokenizer.max_length
    self.dim = int(dim)
    self.use_attention_mask = bool(use_attention_mask)
    self._model, self._load = (model, None) if isinstance(model, T5EncoderModel) else (None, model)
    self._cache_key = cache_key

  @classmethod
  def from_pretrained(
    cls,
    path: str,
    *,
    tokenizer: str = "",
    max_length: int = 226,
    dtype: str = "float32",
    param_dtype: str | None = None,
    use_attention_mask: bool = False,
  ) -> "T5TextEncoder":
    """``param_dtype`` None = ``dtype`` (frozen weights need no float32 master copy)."""
    cfg = T5Config.from_dict(weights_lib.read_config(path))
    tok = SentencePieceTokenizer(find_spiece(path, tokenizer), max_length)
    if tok._sp.get_piece_size() > cfg.vocab_size:
      raise ValueError(
        f"tokenizer {tok.model_file} has {tok._sp.get_piece_size()} pieces but the T5 checkpoint "
        f"{path} embeds only {cfg.vocab_size}"
      )
    param_dtype = param_dtype or dtype
    return cls(
      tok,
      lambda: load_pretrained(str(path), dtype, param_dtype),
      dim=cfg.d_model,
      use_attention_mask=use_attention_mask,
      cache_key=("t5", str(pathlib.Path(path).resolve()), dtype, param_dtype),
    )

  def __getstate__(self):  # only the tokenizer travels to data workers; encode() there would reload
    return {**self.__dict__, "_model": None, "_load": None}

  @property
  def model(self) -> T5EncoderModel:
    if self._model is None:
      if self._load is None:
        raise RuntimeError("this T5TextEncoder was unpickled for tokenization only; it has no weights")
      self._model = weights_lib.load_frozen(self._load, self._cache_key)
    return self._model

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return self.tokenizer(prompts)

  def encode(self, tokens):
    tokens = jnp.asarray(tokens)
    if tokens.shape[-1] != self.max_length:
      raise ValueError(f"expected {self.max_length} tokens per prompt, got shape {tokens.shape}")
    lead = tokens.shape[:-1]
    ids = tokens.reshape(-1, self.max_length)
    mask = (ids != self.tokenizer.pad_id) if self.use_attention_mask else None
    h = self.model(ids, attention_mask=mask).astype(jnp.float32)
    return jax.lax.stop_gradient(h).reshape(*lead, self.max_length, h.shape[-1])
