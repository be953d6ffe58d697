"""The compute and parameter dtypes a config names (``model.dtype``, ``text_encoder.dtype``,
``autoencoder.param_dtype`` …), shared by the DiT and the pretrained encoders.

A leaf module: the model and the encoders import it, it imports neither.
"""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str, what: str):
  """A dtype by name, with an error naming the config key ``what``."""
  if name not in DTYPES:
    raise ValueError(f"{what}: dtype {name!r} unknown; expected one of {sorted(DTYPES)}")
  return DTYPES[name]
