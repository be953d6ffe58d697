"""FP8 compute on Hopper (``model.precision``): the large GEMMs through flax's fp8 ops, attention through
jax's cuDNN FP8 flash kernel. Everything else (norms, modulation, LoRA deltas, the loss) stays in
``model.dtype``.

``model.precision``:

* ``"bf16"`` — no FP8 (the default; nothing here runs).
* ``"fp8_gemm"`` — QKV (one fused GEMM), attention out, FFN in/out and the text projection in FP8:
  ``flax.linen.fp8_ops.fp8_scaled_dot_general`` — e4m3 inputs and kernels, e5m2 output gradients, per-tensor
  scales.
* ``"fp8_attention"`` — attention in FP8: ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``
  with ``use_fp8=True``, forward only (see below).
* ``"fp8"`` — both.

Scaling, per tensor:

* GEMMs while training — *delayed* scaling: each GEMM's input, kernel and output-gradient scales and their
  amax histories (:data:`AMAX_HISTORY` steps) are the train state's ``fp8`` tree (:func:`init_state`, stacked
  on the ``layers`` axis for the blocks). Flax's custom VJPs return the updated values as the "gradient" of
  that tree (overwrite-with-gradient), and :func:`updated` writes them back, so Orbax checkpoints and exact
  resume carry them.
* GEMMs in forward-only passes (sampling, evaluation, validation loss) — *current* scaling, no state: the same
  flax function is given the tensor's own amax as a one-entry history (:func:`current_meta`).
* Attention — current scaling, no state: q, k, v scales from their own amax; the softmax probabilities lie in
  [0, 1] and the output is a convex combination of value rows, so their scales are bounded exactly
  (:func:`attention`).

jax's cuDNN FP8 attention trains only at head_dim 128 with sequences of multiples of 128 and no mask; this
project's models have head_dim 64 (2B, 5B), so ``validate`` refuses FP8 attention in training and it serves
sampling and evaluation (padding is sliced off before the kernel instead of masked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops
from jax._src.cudnn import fused_attention_stablehlo as cudnn

PRECISIONS = ("bf16", "fp8_attention", "fp8_gemm", "fp8")
AMAX_HISTORY = 16  # steps of amax each delayed scale looks back over
BLOCK_SITES = ("qkv", "out", "ff_in", "ff_out")  # the FP8 GEMMs of one block
E4M3 = jnp.float8_e4m3fn
_KEYS = ("input", "kernel", "grad")


def gemm_fp8(precision: str) -> bool:
  return precision in ("fp8_gemm", "fp8")


def attention_fp8(precision: str) -> bool:
  return precision in ("fp8_attention", "fp8")


# ----------------------------------------------------------------------------- GEMM state


def init_meta(history: int = AMAX_HISTORY, layers: int | None = None) -> dict:
  """One GEMM's delayed-scaling state: scales 1 and empty amax histories (``layers``: stacked [layers, …])."""
  lead = () if layers is None else (layers,)
  out = {}
  for k in _KEYS:
    out[f"{k}_scale"] = jnp.ones(lead + (1,), jnp.float32)
    out[f"{k}_amax_history"] = jnp.zeros(lead + (history,), jnp.float32)
  return out


def init_state(precision: str, num_layers: int, history: int = AMAX_HISTORY) -> dict:
  """The train state's ``fp8`` tree: ``{"blocks": {site: stacked meta}, "text_proj": meta}``; empty without
  FP8 GEMMs."""
  if not gemm_fp8(precision):
    return {}
  return {"blocks": {s: init_meta(history, num_layers) for s in BLOCK_SITES}, "text_proj": init_meta(history)}


def current_meta(x: jax.Array, kernel: jax.Array) -> dict:
  """State for a forward-only pass: each history holds the tensor's own amax, so the scale flax derives from
  it is current scaling (the gradient entries are never read without a backward pass)."""
  amax = lambda t: jnp.max(jnp.abs(t)).astype(jnp.float32)[None]  # noqa: E731
  return {
    "input_scale": jnp.ones((1,), jnp.float32),
    "input_amax_history": amax(x),
    "kernel_scale": jnp.ones((1,), jnp.float32),
    "kernel_amax_history": amax(kernel),
    "grad_scale": jnp.ones((1,), jnp.float32),
    "grad_amax_history": jnp.zeros((1,), jnp.float32),
  }


def updated(old: dict, new: dict) -> dict:
  """The state after a step from its "gradient" ``new``: each (scale, history) pair where its GEMM ran a
  backward pass; the old pair where it did not (a frozen block whose input needs no gradient gets a zero
  cotangent, and a real scale is never 0)."""
  out = {}
  for key, value in old.items():
    if isinstance(value, dict):
      out[key] = updated(value, new[key])
      continue
    if not key.endswith("_scale"):
      continue
    name = key[: -len("_scale")]
    ran = new[key] != 0  # [..., 1]
    out[key] = jnp.where(ran, new[key], value)
    out[f"{name}_amax_history"] = jnp.where(ran, new[f"{name}_amax_history"], old[f"{name}_amax_history"])
  return out


def split_at(state: dict, first: int) -> tuple[dict, dict]:
  """(held, differentiated): the state of blocks before ``first`` (and, when ``first`` > 0, the text
  projection's) apart from the rest, so a step can keep the held part out of its gradient."""
  if not state or first == 0:
    return {}, state
  cut = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi], state["blocks"])  # noqa: E731
  return {"blocks": cut(0, first), "text_proj": state["text_proj"]}, {"blocks": cut(first, None)}


def for_model(held: dict, differentiated: dict) -> dict:
  """The model's ``fp8`` argument from :func:`split_at`'s parts, the blocks' two parts kept apart:
  :func:`rows` slices each on its own, so a held row carries no tangent (a concatenation would give it a zero
  one, and the frozen blocks would run their backward pass after all)."""
  if not held:
    return differentiated
  return {
    "blocks": {"held": held["blocks"], "rest": differentiated["blocks"]},
    "text_proj": held["text_proj"],
  }


def stacked(held: dict, differentiated: dict) -> dict:
  """The train state's tree again from :func:`split_at`'s parts."""
  if not held:
    return differentiated
  blocks = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), held["blocks"], differentiated["blocks"])
  return {"blocks": blocks, "text_proj": held["text_proj"]}


def rows(blocks: dict, start: int, stop: int) -> dict:
  """Blocks ``[start, stop)`` of the blocks' state: stacked, or split by :func:`for_model`."""
  if "held" not in blocks:
    return jax.tree.map(lambda a: a[start:stop], blocks)
  first = jax.tree.leaves(blocks["held"])[0].shape[0]
  parts = []
  if start < first:
    parts.append(jax.tree.map(lambda a: a[start : min(stop, first)], blocks["held"]))
  if stop > first:
    parts.append(jax.tree.map(lambda a: a[max(start, first) - first : stop - first], blocks["rest"]))
  return parts[0] if len(parts) == 1 else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)


# ----------------------------------------------------------------------------- GEMMs


def einsum(eq: str, x: jax.Array, kernel: jax.Array, meta: dict | None) -> jax.Array:
  """``jnp.einsum(eq, x, kernel)`` in FP8 (flax's ``fp8_scaled_dot_general``), output in ``x.dtype``; ``meta``
  None: current scaling."""
  kernel = kernel.astype(x.dtype)
  m = current_meta(x, kernel) if meta is None else meta
  dot = functools.partial(
    fp8_ops.fp8_scaled_dot_general,
    lhs_scale=m["input_scale"],
    rhs_scale=m["kernel_scale"],
    grad_scale=m["grad_scale"],
    lhs_amax_history=m["input_amax_history"],
    rhs_amax_history=m["kernel_amax_history"],
    grad_amax_history=m["grad_amax_history"],
    quantize_compute_type=x.dtype,
  )
  # einsum's _dot_general hook (as flax's Fp8Einsum uses it) is typed for plain callables, not custom_vjp partials.
  return jnp.einsum(eq, x, kernel, preferred_element_type=x.dtype, _dot_general=dot)  # pyright: ignore[reportCallIssue, reportArgumentType]


def dense(linear, x: jax.Array, meta: dict | None) -> jax.Array:
  """An ``nnx.Linear`` (kernel [in, out], bias) applied in FP8, in the linear's compute dtype."""
  x = x.astype(linear.dtype)
  y = einsum("...d,de->...e", x, linear.kernel[...], meta)
  return y + linear.bias[...].astype(y.dtype)


# ----------------------------------------------------------------------------- attention


def attention_scales(q: jax.Array, k: jax.Array, v: jax.Array) -> dict:
  """cuDNN's FP8 attention parameters (each [1, 1, 1, 1] float32) for current scaling: ``x_fp8 = x ·
  scale_x``, ``descale_x = 1 / scale_x``; the softmax ``s`` ∈ [0, 1] and the output ``o`` (|o| ≤ max|v|) have
  fixed bounds. The backward-only entries are ones (forward only)."""
  top = float(jnp.finfo(E4M3).max)
  one = jnp.ones((1, 1, 1, 1), jnp.float32)
  amax = lambda t: jnp.maximum(jnp.max(jnp.abs(t)).astype(jnp.float32), 1e-12).reshape(1, 1, 1, 1)  # noqa: E731
  aq, ak, av = amax(q), amax(k), amax(v)
  params = {
    key: one
    for key in (
      "amax_dQ",
      "amax_dK",
      "amax_dV",
      "amax_dP",
      "descale_dO",
      "descale_dP",
      "scale_dQ",
      "scale_dK",
      "scale_dV",
      "scale_dP",
    )
  }
  params.update(
    descale_q=aq / top,
    descale_k=ak / top,
    descale_v=av / top,
    descale_s=one / top,
    scale_s=one * top,
    scale_o=top / av,
    descale_o=av / top,
  )
  return params


def quantize(x: jax.Array, descale: jax.Array) -> jax.Array:
  """``x`` to e4m3 with the per-tensor scale ``1 / descale`` (saturating)."""
  return fp8_ops.quantize(x, E4M3, descale.reshape(()), jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_valid: int | None = None) -> jax.Array:
  """Exact-softmax attention in FP8 (cuDNN, forward only): ``q, k, v`` [B, N, H, D] → [B, N, H, D] in
  ``q.dtype``.

  The FP8 kernel takes no padding mask, so keys (and queries) from ``num_valid`` on are sliced off and the
  output rows of padded queries are zero."""
  n = q.shape[1]
  end = n if num_valid is None else num_valid
  qs, ks, vs = q[:, :end], k[:, :end], v[:, :end]
  p = attention_scales(qs, ks, vs)
  # a private jax module (the only FP8 attention jax has): its annotations do not cover the FP8 path
  out, _, _ = cudnn.dot_product_attention(  # pyright: ignore[reportGeneralTypeIssues]
    quantize(qs, p["descale_q"]),
    quantize(ks, p["descale_k"]),
    quantize(vs, p["descale_v"]),
    fp8_params=p,  # pyright: ignore[reportArgumentType]
    scale=q.shape[-1] ** -0.5,
    use_fp8=True,
    qkv_layout="BTNH",
  )
  out = fp8_ops.dequantize(out, q.dtype, p["descale_o"].reshape(()).astype(q.dtype))
  return jnp.pad(out, ((0, 0), (0, n - end), (0, 0), (0, 0))) if end < n else out
