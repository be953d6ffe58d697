"""FP8 precision (``model.precision``) on CPU: the scaling math, the amax-history update, the train state's
FP8 tree through a step and an Orbax checkpoint, and validation's refusal off Hopper. cuDNN's FP8 attention
itself only runs on a GPU (benchmarks/train_step.py --precision measures it)."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from layerflow_jax import sharding as shd
from layerflow_jax import validate
from layerflow_jax.config import ConfigError, load_config
from layerflow_jax.model import fp8

E4M3_MAX = 448.0


def _x(shape, seed, scale=1.0):
  return (jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale).astype(jnp.bfloat16)


def test_state_only_with_fp8_gemms():
  assert fp8.init_state("bf16", 4) == {} and fp8.init_state("fp8_attention", 4) == {}
  state = fp8.init_state("fp8_gemm", 4, history=8)
  assert sorted(state["blocks"]) == sorted(fp8.BLOCK_SITES)
  qkv = state["blocks"]["qkv"]
  assert qkv["input_scale"].shape == (4, 1) and qkv["grad_amax_history"].shape == (4, 8)
  assert float(qkv["kernel_scale"].min()) == 1.0 and float(qkv["kernel_amax_history"].max()) == 0.0
  assert state["text_proj"]["input_amax_history"].shape == (8,)


def test_current_scaling_is_close_to_bf16_but_quantized():
  x, k = _x((2, 64, 32), 0, 3.0), _x((32, 48), 1, 0.2)
  want = jnp.einsum("bnd,de->bne", x.astype(jnp.float32), k.astype(jnp.float32))
  got = fp8.einsum("bnd,de->bne", x, k, None)
  assert got.dtype == jnp.bfloat16
  rel = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
  # e4m3 keeps 3 mantissa bits (relative step 2^-4 per element); errors of a 32-term sum partly cancel
  assert 1e-3 < rel < 0.05, rel


def test_delayed_scale_comes_from_the_history_and_the_step_records_its_amax():
  x, k = _x((4, 16), 2, 5.0), _x((16, 8), 3)
  meta = fp8.init_meta(history=4)
  meta["input_amax_history"] = jnp.asarray([2.0, 0.0, 0.0, 7.0])  # newest first; 7.0 the oldest kept
  meta["kernel_amax_history"] = jnp.asarray([0.5, 0.0, 0.0, 0.0])
  loss = lambda m: jnp.sum(fp8.einsum("nd,de->ne", x, k, m).astype(jnp.float32))  # noqa: E731
  new = jax.grad(loss)(meta)
  # scale = max(history) / e4m3 max (flax's compute_scale): the history's 7.0, not this step's amax
  np.testing.assert_allclose(new["input_scale"], [7.0 / E4M3_MAX], rtol=1e-6)
  np.testing.assert_allclose(new["kernel_scale"], [0.5 / E4M3_MAX], rtol=1e-6)
  # the history rolls: this step's amax first, the oldest entry dropped
  amax = float(jnp.max(jnp.abs(x.astype(jnp.float32))))
  np.testing.assert_allclose(new["input_amax_history"], [amax, 0.0, 7.0, 2.0], rtol=1e-6)
  # the output gradient (ones) is recorded for the e5m2 scale of the next step
  np.testing.assert_allclose(new["grad_amax_history"], [1.0, 0.0, 0.0, 0.0])
  # an empty history keeps the scale it had
  np.testing.assert_allclose(new["grad_scale"], [1.0])


def test_updated_keeps_the_pairs_of_gemms_without_a_backward_pass():
  old = {"blocks": {"qkv": fp8.init_meta(history=3, layers=2)}}
  old["blocks"]["qkv"]["input_amax_history"] = jnp.full((2, 3), 4.0)
  new = jax.tree.map(jnp.zeros_like, old)
  new["blocks"]["qkv"]["input_scale"] = jnp.asarray(
    [[0.5], [0.0]]
  )  # layer 0 ran its backward, layer 1 did not
  new["blocks"]["qkv"]["input_amax_history"] = jnp.asarray([[9.0, 4.0, 4.0], [0.0, 0.0, 0.0]])
  out = fp8.updated(old, new)["blocks"]["qkv"]
  np.testing.assert_array_equal(out["input_scale"], [[0.5], [1.0]])
  np.testing.assert_array_equal(out["input_amax_history"], [[9.0, 4.0, 4.0], [4.0, 4.0, 4.0]])
  np.testing.assert_array_equal(out["kernel_scale"], [[1.0], [1.0]])  # no pair ran: all kept


def test_attention_scales_bound_every_fp8_tensor():
  q, k, v = _x((1, 8, 2, 16), 4, 2.0), _x((1, 8, 2, 16), 5), _x((1, 8, 2, 16), 6, 0.5)
  p = fp8.attention_scales(q, k, v)
  amax = lambda t: float(jnp.max(jnp.abs(t.astype(jnp.float32))))  # noqa: E731
  np.testing.assert_allclose(p["descale_q"].ravel(), [amax(q) / E4M3_MAX], rtol=1e-6)
  np.testing.assert_allclose((p["scale_o"] * p["descale_o"]).ravel(), [1.0], rtol=1e-6)
  np.testing.assert_allclose((p["scale_s"] * p["descale_s"]).ravel(), [1.0], rtol=1e-6)
  qq = fp8.quantize(q, p["descale_q"])
  assert qq.dtype == jnp.float8_e4m3fn
  back = qq.astype(jnp.float32) * p["descale_q"].reshape(())
  assert float(jnp.max(jnp.abs(qq.astype(jnp.float32)))) == pytest.approx(
    E4M3_MAX
  )  # the amax maps to the top
  np.testing.assert_allclose(back, q.astype(jnp.float32), rtol=2**-3, atol=amax(q) * 2**-9)


def _config(precision="bf16", dtype="bfloat16", attention="cudnn"):
  c = load_config("configs/default.py:size=tiny,runlocal=True")
  c.model.update(dict(precision=precision, dtype=dtype, attention=attention))
  return c


@pytest.mark.parametrize(
  "platform,cc,training,precision,dtype,attention,fragment",
  [
    ("cpu", None, True, "fp8_gemm", "bfloat16", "xla", "Hopper GPUs"),
    ("gpu", "8.0", False, "fp8", "bfloat16", "cudnn", "compute capability 8.0"),
    ("gpu", "9.0", True, "fp8_gemm", "float32", "cudnn", "model.dtype='bfloat16'"),
    ("gpu", "9.0", False, "fp8_attention", "bfloat16", "xla", "model.attention='cudnn'"),
    ("gpu", "9.0", True, "fp8_attention", "bfloat16", "cudnn", "trains only at head_dim 128"),
    ("gpu", "9.0", True, "fp8", "bfloat16", "cudnn", "trains only at head_dim 128"),
  ],
)
def test_validate_refuses_fp8_where_it_cannot_run(
  platform, cc, training, precision, dtype, attention, fragment
):
  with pytest.raises(ConfigError, match="model.precision") as e:
    validate.check_precision(_config(precision, dtype, attention), platform, cc, training=training)
  assert fragment in str(e.value)


@pytest.mark.parametrize(
  "precision,training", [("bf16", True), ("fp8_gemm", True), ("fp8_attention", False), ("fp8", False)]
)
def test_validate_accepts_fp8_on_hopper(precision, training):
  validate.check_precision(_config(precision), "gpu", "9.0", training=training)
  validate.check_precision(
    _config("bf16", "float32", "xla"), "cpu", None, training=True
  )  # the default anywhere


def test_unknown_precision_is_refused():
  with pytest.raises(ConfigError, match="model.precision='fp16'"):
    validate.check_values(_config("fp16"))


def test_fp8_state_trains_checkpoints_and_resumes_exactly(tmp_path):
  from layerflow_jax.train import checkpoint as ckpt_lib
  from layerflow_jax.train import step as step_lib
  from layerflow_jax.train.experiment import Experiment

  config = _config("fp8_gemm", attention="xla")
  mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  exp = Experiment(config, mesh)
  assert Experiment(_config(), mesh).abstract_state().fp8 == {}  # bf16: no FP8 state at all
  with shd.use_mesh(mesh):
    state = exp.init_state()
  b = config.data.batch_size
  batch = {
    "video": jax.random.uniform(
      jax.random.key(0),
      (b, 4 * config.data.frames, config.data.height, config.data.width, 3),
      minval=-1.0,
      maxval=1.0,
    ),
    "tokens": jax.random.randint(jax.random.key(1), (b, 3, config.text_encoder.max_length), 0, 255),
  }
  shardings = exp.state_shardings(exp.abstract_state())
  fn = jax.jit(lambda s, bt: step_lib.train_step(exp, s, bt), out_shardings=(shardings, None))
  state, _ = fn(state, batch)
  qkv = state.fp8["blocks"]["qkv"]
  assert float(qkv["input_amax_history"][:, 0].min()) > 0  # every block recorded its input amax
  assert float(jnp.abs(qkv["input_scale"] - 1.0).max()) == 0.0  # the first step scaled from an empty history
  state, _ = fn(state, batch)
  assert (
    float(jnp.abs(qkv["input_scale"] - 1.0).max()) == 0.0
  )  # (the old state is unchanged: donation is off)
  assert float(jnp.abs(state.fp8["blocks"]["qkv"]["input_scale"] - 1.0).min()) > 0  # now from the history

  ck = ckpt_lib.Checkpointer(tmp_path, writer=True)
  ck.save(2, state, meta={"step": 2})
  ck.wait()
  restored, _ = ck.restore(2, exp.abstract_state(), shardings)
  ck.close()
  for a, r in zip(jax.tree.leaves(state.fp8), jax.tree.leaves(restored.fp8)):
    np.testing.assert_array_equal(a, r)
  cont, m1 = fn(state, batch)
  again, m2 = fn(restored, batch)
  assert float(m1["loss"]) == float(m2["loss"])
  for a, r in zip(jax.tree.leaves((cont.fp8, cont.trainable)), jax.tree.leaves((again.fp8, again.trainable))):
    np.testing.assert_array_equal(a, r)


def test_run_all_measures_every_precision_against_one_peer_run():
  from benchmarks import run_all

  args = run_all.parse_args(["--tiny", "--precisions", "bf16,fp8_gemm", "--parts", "peer_train,jax_train"])
  plan = run_all.runs(args)
  assert [(side, precision) for side, _, precision in plan] == [
    ("peer", None),
    ("jax", "bf16"),
    ("jax", "fp8_gemm"),
  ]
  cmd = run_all.command(args, "jax", ["jax_train"], "out.json", None, "fp8_gemm")
  assert cmd[cmd.index("--precision") + 1] == "fp8_gemm"


def test_frozen_blocks_before_the_first_trained_one_keep_their_fp8_state():
  from layerflow_jax.train import step as step_lib
  from layerflow_jax.train.experiment import Experiment

  config = _config("fp8_gemm", attention="xla")
  config.model.adapters.content = dict(rank=4, alpha=1.0, targets="q,k,v,out", blocks=[1])
  config.train.trainable = "adapters"
  mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  exp = Experiment(config, mesh)
  assert exp.first_backward_block == 1 and Experiment(_config(), mesh).first_backward_block == 0
  with shd.use_mesh(mesh):
    state = exp.init_state()
  b = config.data.batch_size
  batch = {
    "video": jax.random.uniform(
      jax.random.key(0),
      (b, 4 * config.data.frames, config.data.height, config.data.width, 3),
      minval=-1.0,
      maxval=1.0,
    ),
    "tokens": jax.random.randint(jax.random.key(1), (b, 3, config.text_encoder.max_length), 0, 255),
  }
  state, _ = jax.jit(lambda s, bt: step_lib.train_step(exp, s, bt))(state, batch)
  for site, meta in state.fp8["blocks"].items():
    assert float(jnp.abs(meta["input_amax_history"][0]).max()) == 0.0, site  # block 0: held, no backward
    assert float(meta["input_amax_history"][1, 0]) > 0, site  # block 1 trains: its GEMMs recorded their amax
  assert float(jnp.abs(state.fp8["text_proj"]["input_amax_history"]).max()) == 0.0


def _scans(jaxpr) -> int:
  """scan equations in a jaxpr, nested ones included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "scan"
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _scans(sub)
  return n


def test_frozen_prefix_runs_no_backward_pass_with_fp8_gemms():
  """Stage 3 in FP8 runs as many block scans (forward and backward) as in bf16: held-out scaling state carries
  no tangent, so the frozen blocks before the first adapter get no backward scan (the first GPU run had
  them)."""
  from layerflow_jax.train import step as step_lib
  from layerflow_jax.train.experiment import Experiment

  counts = {}
  for precision in ("bf16", "fp8_gemm"):
    config = _config(precision, attention="xla")
    config.model.adapters.content = dict(rank=4, alpha=1.0, targets="q,k,v,out", blocks=[1])
    config.train.trainable = "adapters"
    mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
    exp = Experiment(config, mesh)
    state = exp.abstract_state()
    b = config.data.batch_size
    batch = {
      "video": jax.ShapeDtypeStruct(
        (b, 4 * config.data.frames, config.data.height, config.data.width, 3), jnp.float32
      ),
      "tokens": jax.ShapeDtypeStruct((b, 3, config.text_encoder.max_length), jnp.int32),
    }
    counts[precision] = _scans(
      jax.make_jaxpr(lambda s, bt, exp=exp: step_lib.train_step(exp, s, bt))(state, batch).jaxpr
    )
  assert counts["fp8_gemm"] == counts["bf16"], counts
