"""Joint text + video attention, sequence-parallel when the mesh splits the video tokens.

A 5B RGBA clip at 480×720 is 21,600 video tokens (+ 678 text tokens); its activations do not fit one device, so the
``sequence`` mesh axis splits the *video* tokens (logical ``video_tokens``) while the text tokens stay replicated.
Attention is the one place where every token needs every other, so it runs under ``jax.shard_map``:

* each device all-gathers the video K/V of the other sequence shards (tiled, in shard order) and prepends the
  text K/V it already holds — the full joint ``[text; video]`` key sequence, in the same order as unsharded;
* its local video queries attend to that full sequence (exact softmax, nothing approximated);
* the text queries attend to the full sequence too; every sequence shard computes the same text output, and a
  ``pmean`` over ``sequence`` makes it invariant, so its gradient reaches K/V once (not once per shard).

All-gathered K/V costs ``2·N·D`` per device per layer (≈ 270 MB in bf16 for 5B at full resolution), far less than
the attention scores it splits; ring attention would trade that for ``sequence`` collective steps. Batch stays
split over ``data``/``fsdp`` and heads over ``tensor`` (when the head count divides), so the other axes are unaffected.
Without a ``sequence`` axis > 1 this is plain exact attention (:func:`attend`).

``model.attention``: ``"xla"`` (materialises the [B, H, Nq, Nk] scores: 60 GB per sample and layer for 2B at full
resolution in fp32), ``"cudnn"`` (flash attention, NVIDIA GPUs), or ``"chunked"`` — exact attention computed for
:data:`QUERY_CHUNK` queries at a time (each query's softmax spans all keys, so nothing is approximated) under
``jax.checkpoint``, so forward and backward hold one chunk's scores: any backend, including the CPU that
``layerflow compile`` uses to estimate memory; or ``"splash"`` — jax's Pallas TPU flash kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``), which never materialises the scores (:func:`splash_attention`).

Splash tiles queries and keys in blocks of 128 to 512 tokens, so the joint sequence must be a multiple of 128:
``model.pad_tokens_to`` (a multiple of 128; ``tpu=1`` uses 512) pads it and the padded keys are masked
(``validate`` refuses a length that does not tile). Under sequence parallelism, where the joint sequence is not
padded, each shard pads its own queries and the gathered keys to the tiles. A Pallas kernel is opaque to GSPMD, so on
a mesh the kernel runs under ``shard_map`` (batch and heads split as the rules say). Lowered for TPU it is the
Mosaic kernel; for any other platform the same kernel in Pallas interpret mode (slow, for tests on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from layerflow_jax import sharding as shd
from layerflow_jax.model import fp8

QUERY_CHUNK = 1024
SPLASH_TILE = 128  # splash block sizes are multiples of this (the TPU lane width)
SPLASH_BLOCKS = (512, 256, 128)  # tried largest first: the block is the largest that divides the sequence


def _kv_lengths(k: jax.Array, num_valid: int | None):
  return None if num_valid is None else jnp.full((k.shape[0],), num_valid, jnp.int32)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_valid: int | None = None) -> jax.Array:
  """Exact attention as XLA ops, heads-major: ``q, k, v`` [B, N, H, D] → [B, N, H, D]; keys from ``num_valid`` on
  are masked. Scores and softmax in float32, as ``jax.nn.dot_product_attention(implementation="xla")``.

  The same math as that function, laid out [B, H, N, D] before the two matmuls: its token-major einsums make XLA's
  CPU forward+backward 1.45× slower at the demo's shape on an AVX2-only 2-core run (62 vs 43 ms,
  benchmarks/cpu_step.py); the layout costs nothing on GPU and TPU, where the compiler picks its own.
  """
  scale = q.shape[-1] ** -0.5
  qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, N, D]
  logits = jnp.einsum("bhnd,bhmd->bhnm", qh, kh, preferred_element_type=jnp.float32) * scale
  if num_valid is not None:
    logits = jnp.where(jnp.arange(k.shape[1]) < num_valid, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhnm,bhmd->bhnd", probs, vh), 1, 2)


def attend(
  q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None, num_valid: int | None = None
) -> jax.Array:
  """:func:`xla_attention` (``None``/``"xla"``), :func:`chunked_attention` (``"chunked"``),
  :func:`splash_attention` (``"splash"``; on one device or inside ``shard_map``), cuDNN's FP8 flash attention
  (``"cudnn_fp8"``, forward only: :func:`layerflow_jax.model.fp8.attention`) or
  ``jax.nn.dot_product_attention(implementation=…)`` (``"cudnn"``); keys from ``num_valid`` on (padding) are
  masked."""
  if implementation in (None, "xla"):
    return xla_attention(q, k, v, num_valid)
  if implementation == "chunked":
    return chunked_attention(q, k, v, num_valid=num_valid)
  if implementation == "splash":
    return splash_attention(q, k, v, num_valid)
  if implementation == "cudnn_fp8":  # model.precision with FP8 attention (forward only)
    return fp8.attention(q, k, v, num_valid)
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    key_value_seq_lengths=_kv_lengths(k, num_valid),
    implementation="cudnn" if implementation == "cudnn" else None,
  )


def chunked_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = QUERY_CHUNK, num_valid: int | None = None
) -> jax.Array:
  """Exact attention, ``chunk`` queries at a time (``lax.map`` over rematerialised chunks): peak memory for the
  scores is ``B·H·chunk·Nk`` in forward and backward instead of ``B·H·Nq·Nk``."""
  b, n, h, d = q.shape
  if n <= chunk:
    return xla_attention(q, k, v, num_valid)
  pad = (-n) % chunk
  chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, (n + pad) // chunk, chunk, h, d)
  one = jax.checkpoint(lambda qc: xla_attention(qc, k, v, num_valid))
  out = jax.lax.map(one, jnp.swapaxes(chunks, 0, 1))  # [chunks, B, chunk, H, D]
  return jnp.swapaxes(out, 0, 1).reshape(b, n + pad, h, d)[:, :n]


def splash_block(length: int) -> int | None:
  """The splash block size for a sequence of ``length`` tokens: the largest of :data:`SPLASH_BLOCKS` dividing it
  (None: the length does not tile; pad it to a multiple of :data:`SPLASH_TILE`)."""
  return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def splash_padded_length(length: int) -> int:
  """The length a shard pads to when it cannot use ``model.pad_tokens_to`` (sequence parallelism): a multiple of
  512 (the largest block) for long sequences, of 128 for short ones."""
  tile = SPLASH_BLOCKS[0] if length > SPLASH_BLOCKS[0] else SPLASH_TILE
  return -(-length // tile) * tile


def _splash_kernel(num_heads: int, nq: int, nk: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas TPU: 0.4 s, splash only

  bq, bk = splash_block(nq), splash_block(nk)
  if bq is None or bk is None:
    raise ValueError(
      f"splash attention: {nq} queries / {nk} keys do not tile into blocks {SPLASH_BLOCKS}; pad "
      f"them to a multiple of {SPLASH_TILE} (model.pad_tokens_to)"
    )
  blocks = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  mask = splash.MultiHeadMask([splash.FullMask((nq, nk))] * num_heads)  # padding is masked by segment ids
  # The residuals (output, log-sum-exp) carry the name "attention_out": remat="save_attention" keeps them, so the
  # backward pass does not run the forward kernel again.
  return splash.make_splash_mha(
    mask,
    block_sizes=blocks,
    head_shards=1,
    q_seq_shards=1,
    residual_checkpoint_name="attention_out",
    interpret=interpret,
  )


def splash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, num_valid: int | None = None, *, pad: bool = False
) -> jax.Array:
  """Exact attention with the Pallas splash kernel: ``q`` [B, Nq, H, D], ``k, v`` [B, Nk, H, D] → [B, Nq, H, D];
  keys from ``num_valid`` on are masked (key segment id 1, every query's 0), so no query row is fully masked.

  ``Nq`` and ``Nk`` must be multiples of :data:`SPLASH_TILE` (``model.pad_tokens_to``); with ``pad=True`` they are
  padded here instead (sequence-parallel shards), the padded keys masked and the padded queries dropped.
  Scores are float32 inside the kernel; ``q`` is scaled by ``D**-0.5`` first, as in :func:`xla_attention`.
  """
  b, nq, h, d = q.shape
  nk = k.shape[1]
  valid = nk if num_valid is None else num_valid
  if pad:
    pq, pk = splash_padded_length(nq) - nq, splash_padded_length(nk) - nk
    q = jnp.pad(q, ((0, 0), (0, pq), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, pk), (0, 0), (0, 0))) for x in (k, v))
  for name, n in (("queries", q.shape[1]), ("keys", k.shape[1])):
    if splash_block(n) is None:
      raise ValueError(
        f"model.attention='splash': {n} {name} do not tile into blocks of {SPLASH_TILE}; set "
        f"model.pad_tokens_to to a multiple of {SPLASH_TILE} (e.g. 512)"
      )
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas TPU: 0.4 s, splash only

  segments = splash.SegmentIds(
    q=jnp.zeros((q.shape[1],), jnp.int32), kv=(jnp.arange(k.shape[1]) >= valid).astype(jnp.int32)
  )
  scale = d**-0.5
  qh = jnp.swapaxes(
    (q.astype(jnp.float32) * scale).astype(q.dtype), 1, 2
  )  # [B, H, N, D]: the kernel's layout
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

  def run(interpret):
    kernel = _splash_kernel(h, q.shape[1], k.shape[1], interpret)
    return lambda qh, kh, vh: jax.vmap(kernel, in_axes=(0, 0, 0, None))(qh, kh, vh, segments)

  # The Mosaic kernel where the program is lowered for TPU (real or compile-only devices); interpret mode anywhere
  # else. Chosen at lowering, so a TPU compile on this CPU gets the TPU kernel.
  out = jax.lax.platform_dependent(qh, kh, vh, tpu=run(False), default=run(True))
  return jnp.swapaxes(out, 1, 2)[:, :nq]  # pyright: ignore[reportArgumentType]  (Pallas types its result loosely)


def _batch_head_axes(mesh, b: int, h: int):
  """Mesh axes of the batch and head dimensions inside attention's ``shard_map`` (None where they do not split)."""
  batch_axes = _axes(("batch",))
  if b % _size(mesh, batch_axes):
    batch_axes = None  # e.g. a batch of 1 while sampling: keep it whole
  head_axes = _axes(("act_heads",))
  if h % _size(mesh, head_axes):
    head_axes = None  # heads that do not divide the tensor axis stay whole inside attention
  return batch_axes, head_axes


def sharded_splash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, num_valid: int | None = None
) -> jax.Array:
  """:func:`splash_attention` on the active mesh: under ``shard_map`` with batch and heads split (a Pallas kernel
  cannot be partitioned by GSPMD); on one device (or none) directly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or _size(mesh, tuple(mesh.axis_names)) == 1:
    return splash_attention(q, k, v, num_valid)
  batch_axes, head_axes = _batch_head_axes(mesh, q.shape[0], q.shape[2])
  spec = P(batch_axes, None, head_axes, None)
  return jax.shard_map(
    functools.partial(splash_attention, num_valid=num_valid),
    in_specs=(spec,) * 3,
    out_specs=spec,
    check_vma=False,
  )(q, k, v)  # (pallas_call outputs carry no varying axes)


def _axes(names: tuple[str, ...]):
  """Mesh axes of one logical name under the active rules (None, a name, or a tuple of names)."""
  return shd.logical_to_spec(names)[0]


def _size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  out = 1
  for a in axes:
    out *= shd.axis_size(mesh, a)
  return out


def joint_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  num_text: int,
  *,
  implementation: str | None = None,
  num_valid: int | None = None,
) -> jax.Array:
  """Attention over ``[text; video]`` tokens: ``q, k, v`` [B, T+N, H, D] → [B, T+N, H, D]; with ``num_valid`` the
  tokens from there on are padding (``model.pad_tokens_to``), masked as keys.

  Dispatches to :func:`sequence_parallel_attention` when the active mesh maps ``video_tokens`` to axes of size > 1.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if _size(mesh, _axes(("video_tokens",))) == 1:
    if implementation == "splash":
      return sharded_splash_attention(q, k, v, num_valid)
    return attend(q, k, v, implementation, num_valid)
  if num_valid is not None:
    raise ValueError(
      "model.pad_tokens_to: padding the joint sequence does not combine with sequence parallelism "
      "(mesh.sequence > 1); set model.pad_tokens_to=0"
    )
  return sequence_parallel_attention(q, k, v, num_text, implementation=implementation)


def sequence_parallel_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, num_text: int, *, implementation: str | None = None
) -> jax.Array:
  """All-gathered-K/V attention under ``shard_map`` with video tokens split over the sequence axes."""
  mesh = jax.sharding.get_abstract_mesh()
  b, n, h, _ = q.shape
  seq_axes = _axes(("video_tokens",))
  shards = _size(mesh, seq_axes)
  num_video = n - num_text
  if num_video % shards:
    raise ValueError(
      f"sequence parallelism: {num_video} video tokens are not divisible by the {shards} "
      f"sequence shards (mesh axes {seq_axes}); change the clip size or mesh.sequence"
    )
  batch_axes, head_axes = _batch_head_axes(mesh, b, h)
  text_spec = P(batch_axes, None, head_axes, None)
  video_spec = P(batch_axes, seq_axes, head_axes, None)

  if (
    implementation == "splash"
  ):  # no model.pad_tokens_to here: each shard pads its queries and keys to the tiles
    one = functools.partial(splash_attention, pad=True)
  else:
    one = functools.partial(attend, implementation=implementation)

  def local(qt, kt, vt, qv, kv, vv):
    gather = lambda x: jax.lax.all_gather(x, seq_axes, axis=1, tiled=True)
    keys = jnp.concatenate([kt, gather(kv)], axis=1)
    values = jnp.concatenate([vt, gather(vv)], axis=1)
    out_video = one(qv, keys, values)
    if qt.shape[1] == 0:
      return qt, out_video
    out_text = one(qt, keys, values)
    return jax.lax.pmean(out_text, seq_axes), out_video

  split = lambda x: (x[:, :num_text], x[:, num_text:])
  (qt, qv), (kt, kv), (vt, vv) = split(q), split(k), split(v)
  out_text, out_video = jax.shard_map(
    local,
    in_specs=(text_spec,) * 3 + (video_spec,) * 3,
    out_specs=(text_spec, video_spec),
    check_vma=implementation != "splash",
  )(qt, kt, vt, qv, kv, vv)
  return jnp.concatenate([out_text, out_video], axis=1)
