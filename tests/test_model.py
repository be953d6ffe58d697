import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerflow_jax.model import DiTConfig, create_model, embeddings
from layerflow_jax.train import partition

CFG = DiTConfig(
  num_layers=2,
  num_heads=2,
  head_dim=16,
  time_embed_dim=32,
  in_channels=8,
  out_channels=8,
  text_embed_dim=24,
  num_clips=4,
)


def inputs(b=2, f=8, h=4, w=4, c=8, text=12, d=24, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(k[0], (b, f, h, w, c)),
    jnp.array([5, 900][:b]),
    jax.random.normal(k[1], (b, text, d)),
  )


def randomize(model, seed=1, scale=0.05):
  """Zero-initialised weights (adaLN-zero, proj_out, LoRA B) made non-zero so every path is exercised."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))
  return model


@pytest.mark.parametrize("pos,layer", [("sincos", "text"), ("rope", "text+video"), ("sincos", "none")])
def test_shapes_and_finite_gradients(pos, layer):
  cfg = dataclasses.replace(CFG, pos_embed=pos, layer_embed=layer)
  model = randomize(create_model(cfg))
  x, t, txt = inputs()
  assert model(x, t, txt).shape == x.shape
  graphdef, params = nnx.split(model)

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x, t, txt) ** 2)

  grads = partition.flatten(jax.grad(loss)(params).to_pure_dict())
  for k, g in grads.items():
    assert np.all(np.isfinite(g)), k
    assert np.any(g != 0), f"no gradient reaches {k}"


def test_zero_init_output_is_zero():
  """adaLN-zero: a freshly initialised model predicts exactly zero velocity."""
  x, t, txt = inputs()
  np.testing.assert_array_equal(create_model(CFG)(x, t, txt), 0.0)


def test_scan_equals_unrolled_and_remat():
  x, t, txt = inputs()
  base = randomize(create_model(CFG))
  ref = base(x, t, txt)
  state = nnx.state(base)
  for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="save_attention"), dict(remat="dots")):
    m = create_model(dataclasses.replace(CFG, **kw))
    nnx.update(m, state)
    np.testing.assert_allclose(m(x, t, txt), ref, rtol=1e-5, atol=1e-6, err_msg=str(kw))


def test_video_layer_embedding_is_per_clip():
  cfg = dataclasses.replace(CFG, layer_embed="text+video")
  m = randomize(create_model(cfg))
  x, t, txt = inputs()
  y = m(x, t, txt)
  m.clip_embed[...] = m.clip_embed[...].at[3].add(1.0)  # only the last clip's embedding changes
  y2 = m(x, t, txt)
  assert not np.allclose(y, y2)


def test_sincos_table_layout():
  table = embeddings.sincos_3d(64, 3, 2, 5)
  assert table.shape == (30, 64)
  # the temporal quarter depends on the frame only; spatial part on the position only
  t = table.reshape(3, 10, 64)
  np.testing.assert_allclose(t[:, 0, :16], t[:, 7, :16])
  np.testing.assert_allclose(t[0, :, 16:], t[2, :, 16:])
  assert not np.allclose(t[0, :, :16], t[1, :, :16])


def test_bad_inputs_are_refused():
  m = create_model(CFG)
  x, t, txt = inputs()
  with pytest.raises(ValueError, match="channels"):
    m(x[..., :4], t, txt)
  with pytest.raises(ValueError, match="sub-clips"):
    m(x[:, :6], t, txt)
  with pytest.raises(ValueError, match="prompts"):
    m(x, t, txt[:, :10])


def test_parameters_carry_logical_axes():
  specs = partition.flatten(nnx.get_partition_spec(nnx.state(create_model(CFG))).to_pure_dict())
  assert tuple(specs["blocks.attn1.to_q.kernel"]) == ("layers", "embed", "heads")
  assert tuple(specs["blocks.ff.proj_in.kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["patch_proj.kernel"]) == ("patch", "patch", "channels", "embed")
  assert all(
    len(tuple(s)) == np.ndim(v)
    for s, v in zip(specs.values(), partition.flatten(nnx.state(create_model(CFG)).to_pure_dict()).values())
  )
