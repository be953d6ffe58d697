"""FP8 pieces (model/fp8.py) against bf16 on random inputs, on a Hopper GPU: cuDNN FP8 attention vs bf16 cuDNN
attention (head dim 64, with and without padded keys), and one FP8 GEMM with current scaling.

  python benchmarks/fp8_check.py
"""

import jax
import jax.numpy as jnp

from layerflow_jax.model import fp8

ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, 4096, 8, 64), jnp.float32).astype(jnp.bfloat16) for kk in ks)
ref = jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32)
for nv in (None, 4000):
  got = jax.jit(lambda q, k, v, nv=nv: fp8.attention(q, k, v, nv))(q, k, v).astype(jnp.float32)
  want = (
    ref
    if nv is None
    else jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=jnp.array([nv]), implementation="cudnn"
    ).astype(jnp.float32)[:, :nv]
  )
  got = got if nv is None else got[:, :nv]
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  print("fp8 attention num_valid", nv, "rel err vs bf16 cuDNN", err)
x = jax.random.normal(ks[0], (8192, 1920), jnp.bfloat16)
w = jax.random.normal(ks[1], (1920, 7680), jnp.bfloat16) * 0.02
y = jax.jit(lambda x, w: fp8.einsum("nd,de->ne", x, w, None))(x, w).astype(jnp.float32)
r = x.astype(jnp.float32) @ w.astype(jnp.float32)
print("fp8 GEMM (current scaling) rel err", float(jnp.linalg.norm(y - r) / jnp.linalg.norm(r)))
hlo = jax.jit(lambda x, w: fp8.einsum("nd,de->ne", x, w, None)).lower(x, w).compile().as_text()
print("fp8 GEMM hlo has f8 dot:", "f8e4m3fn" in hlo)
