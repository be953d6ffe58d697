import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerflow_jax.model import create_model, lora
from tests.test_model import CFG, inputs, randomize

SPECS = lora.specs_from_config(
  {
    "motion": dict(rank=4, alpha=1.0, targets="q,k,v,out", blocks=[1]),
    "content": dict(rank=8, alpha=8.0, targets="q,k,v,out,ff_in,ff_out", blocks="all"),
  },
  3,
)


def base_and_adapted():
  cfg = dataclasses.replace(CFG, num_layers=3)
  base = randomize(create_model(cfg))
  adapted = create_model(dataclasses.replace(cfg, adapters=SPECS))
  base_state = nnx.state(base)
  nnx.update(adapted, base_state)
  return base, adapted


def test_block_selection_parsing():
  assert lora.parse_blocks("every:6", 30) == (5, 11, 17, 23, 29)
  assert lora.parse_blocks("every:6:0", 12) == (0, 6)
  assert lora.parse_blocks([3, 1], 4) == (1, 3)
  with pytest.raises(ValueError, match="blocks"):
    lora.parse_blocks([7], 4)
  with pytest.raises(ValueError, match="targets"):
    lora.specs_from_config({"x": dict(rank=2, targets="q,proj", blocks="all")}, 2)


def test_segments_follow_adapter_membership():
  segs = lora.segments(lora.specs_from_config({"m": dict(rank=2, targets="q", blocks="every:3")}, 7), 7)
  assert [(s.start, s.stop, s.slots) for s in segs] == [
    (0, 2, ()),
    (2, 3, (("m", 0),)),
    (3, 5, ()),
    (5, 6, (("m", 1),)),
    (6, 7, ()),
  ]


def test_zero_b_equals_base_bitwise():
  base, adapted = base_and_adapted()
  x, t, txt = inputs()
  np.testing.assert_array_equal(adapted(x, t, txt), base(x, t, txt))


def test_adapter_shapes_only_for_selected_blocks():
  _, adapted = base_and_adapted()
  assert adapted.adapters["motion"].q_a.shape == (1, 32, 4)  # one selected block
  assert adapted.adapters["content"].ff_in_b.shape == (3, 8, 128)


def _nonzero_b(model, seed=3):
  for name in model.adapters:
    ad = model.adapters[name]
    for t in [s for s in model.cfg.adapters if s.name == name][0].targets:
      b = getattr(ad, f"{t}_b")
      b[...] = 0.1 * jax.random.normal(jax.random.key(seed), b.shape)
      seed += 1
  return model


def test_merge_matches_unmerged_and_unmerge_is_exact():
  _, m = base_and_adapted()
  _nonzero_b(m)
  x, t, txt = inputs()
  before_params = jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
  ref = m(x, t, txt)
  merged = lora.merge(m, "content")
  assert "content" not in m.adapters
  out = m(x, t, txt)
  rel = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  assert rel <= 1e-5, rel
  lora.unmerge(m, merged)
  after = jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
  for a, b in zip(jax.tree.leaves(before_params), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_remove_equals_scale_zero():
  _, m = base_and_adapted()
  _nonzero_b(m)
  x, t, txt = inputs()
  zero = m(x, t, txt, adapter_scales={"motion": 0.0})
  lora.remove(m, "motion")
  np.testing.assert_array_equal(m(x, t, txt), zero)


def test_per_sample_scale_matches_separate_runs():
  _, m = base_and_adapted()
  _nonzero_b(m)
  x, t, txt = inputs()
  both = m(x, t, txt, adapter_scales={"motion": jnp.array([1.0, 0.0])})
  first = m(x[:1], t[:1], txt[:1], adapter_scales={"motion": 1.0})
  second = m(x[1:], t[1:], txt[1:], adapter_scales={"motion": 0.0})
  np.testing.assert_allclose(both[:1], first, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both[1:], second, rtol=1e-5, atol=1e-6)
  assert not np.allclose(first, m(x[:1], t[:1], txt[:1], adapter_scales={"motion": 0.0}))


def test_unknown_adapter_scale_is_refused():
  _, m = base_and_adapted()
  x, t, txt = inputs()
  with pytest.raises(ValueError, match="adapter scale given for \\['style'\\]"):
    m(x, t, txt, adapter_scales={"style": 1.0})
