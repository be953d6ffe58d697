"""Sharding: one train step gives the same loss and parameters on every mesh; sequence-parallel attention is exact;
the 2B parameter layout is pinned by golden files; mesh config errors are clear.

Golden files: ``tests/golden/sharding_2b_<mesh>.json``. After an intended change of the rules table, regenerate with
``LAYERFLOW_UPDATE_GOLDEN=1 python -m pytest -q tests/test_sharding.py -k golden`` and review the diff.
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from layerflow_jax import sharding as shd
from layerflow_jax.config import load_config
from layerflow_jax.model import attention
from layerflow_jax.train import step as step_lib
from layerflow_jax.train import trainer
from layerflow_jax.train.experiment import Experiment

GOLDEN = pathlib.Path(__file__).parent / "golden"

# Frames 4 → 8 latent frames of 4×4 tokens: 128 video tokens (+ 96 text tokens); lr constant after a 1-step warm-up
# (step 1's lr is 0, so three steps move every parameter twice).
TINY = [
  "data.frames=4",
  "data.height=16",
  "data.width=16",
  "data.batch_size=8",
  "train.warmup_steps=1",
  "train.lr_schedule='constant'",
  "train.lr=1e-3",
]
STEPS = 3
RTOL = 1e-5

MESHES = {
  "data8": dict(data=8, fsdp=1, tensor=1, sequence=1),
  "fsdp8": dict(data=1, fsdp=8, tensor=1, sequence=1),
  "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2, sequence=1),
  "sequence2_fsdp4": dict(data=1, fsdp=4, tensor=1, sequence=2),
}


def _batches(n: int) -> list[dict]:
  rng = np.random.default_rng(0)
  return [
    dict(
      video=rng.uniform(-1, 1, (8, 16, 16, 16, 3)).astype(np.float32),
      tokens=rng.integers(0, 256, (8, 3, 32)).astype(np.int32),
      clip_valid=np.ones((8, 4), bool),
      motion_scale=np.zeros((8,), np.float32),
    )
    for _ in range(n)
  ]


def _train_steps(mesh_cfg: dict, devices) -> tuple[list[float], dict, Experiment]:
  cfg = load_config("configs/default.py:size=tiny", TINY)
  cfg.mesh.update(mesh_cfg)
  exp = Experiment(cfg, shd.make_mesh(cfg.mesh, devices))
  state = exp.init_state()
  shardings = exp.state_shardings(exp.abstract_state())
  step = step_lib.compile_train_step(exp, shardings, None)
  losses = []
  for b in _batches(STEPS):
    with shd.use_mesh(exp.mesh):
      state, metrics = step(state, trainer.global_batch(exp, b))
    losses.append(float(metrics["loss"]))
  params = {k: np.asarray(v) for k, v in jax.device_get(exp.full_params(state)).items()}
  placed = {k: v.sharding for k, v in exp.full_params(state).items()}
  return losses, params, placed


@pytest.fixture(scope="module")
def reference():
  """The same steps on one device."""
  losses, params, _ = _train_steps(dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
  return losses, params


@pytest.mark.parametrize(
  "name",
  [
    pytest.param("data8", marks=pytest.mark.slow),
    pytest.param("fsdp8", marks=pytest.mark.slow),
    pytest.param("data2_fsdp2_tensor2", marks=pytest.mark.slow),
    "sequence2_fsdp4",
  ],
)
def test_same_loss_and_params_on_every_mesh(name, reference):
  ref_losses, ref_params = reference
  losses, params, placed = _train_steps(MESHES[name], jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  assert set(params) == set(ref_params)
  moved = 0
  for k, v in params.items():
    np.testing.assert_allclose(v, ref_params[k], rtol=RTOL, atol=1e-7, err_msg=k)
    moved += int(np.any(v != 0))
  assert moved > len(params) // 2  # the comparison covers trained, non-trivial values
  # the parameters really are split as the mesh says (hidden 128 over fsdp·sequence)
  kernel = placed["blocks.attn1.to_q.kernel"]
  split = MESHES[name]["fsdp"] * MESHES[name]["sequence"]
  assert kernel.shard_shape((2, 128, 128))[1] == 128 // split


def test_sequence_parallel_attention_is_exact():
  """Joint [text; video] attention with video tokens split over sequence=2 (and heads over tensor=2, batch over
  data=2): outputs and gradients equal the unsharded attention, and the K/V are all-gathered."""
  rng = np.random.default_rng(1)
  b, text, video, h, d = 4, 12, 32, 4, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, text + video, h, d)), jnp.float32) for _ in range(3))
  w = jnp.asarray(rng.normal(size=(b, text + video, h, d)), jnp.float32)  # a loss weighting every output

  def loss(q, k, v):
    return jnp.sum(attention.joint_attention(q, k, v, text) * w)

  want = jax.nn.dot_product_attention(q, k, v)
  want_grads = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v) * w), (0, 1, 2))(
    q, k, v
  )
  mesh = shd.make_mesh(dict(data=2, fsdp=1, tensor=2, sequence=2))
  with shd.use_mesh(mesh):
    fwd = jax.jit(lambda q, k, v: attention.joint_attention(q, k, v, text))
    got = fwd(q, k, v)
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    hlo = fwd.lower(q, k, v).as_text()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, gw in zip(grads, want_grads):
    np.testing.assert_allclose(g, gw, rtol=1e-5, atol=1e-5)
  assert "all_gather" in hlo or "all-gather" in hlo

  # chunked (memory-bounded) attention is exact too, with a ragged last chunk, alone and sequence-parallel
  chunked = lambda q, k, v: attention.chunked_attention(q, k, v, chunk=10)
  np.testing.assert_allclose(jax.jit(chunked)(q, k, v), want, rtol=1e-5, atol=1e-6)
  cgrads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(chunked(q, k, v) * w), (0, 1, 2)))(q, k, v)
  for g, gw in zip(cgrads, want_grads):
    np.testing.assert_allclose(g, gw, rtol=1e-5, atol=1e-5)
  with shd.use_mesh(mesh):
    got = jax.jit(lambda q, k, v: attention.joint_attention(q, k, v, text, implementation="chunked"))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  with shd.use_mesh(shd.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=8))):
    with pytest.raises(ValueError, match="36 video tokens are not divisible by the 8 sequence shards"):
      jax.jit(lambda q, k, v: attention.joint_attention(q, k, v, 8))(q, k, v)


def _golden_table(mesh_cfg: dict) -> dict:
  """Every 2B parameter's layout on ``mesh_cfg``, from an abstract init (nothing materialised)."""
  cfg = load_config("configs/default.py:size=2b,layout=rgba")
  cfg.mesh.update(mesh_cfg)
  exp = Experiment(cfg, shd.make_mesh(cfg.mesh))
  shapes = {k: v.shape for k, v in exp.abstract_params.items()}
  return shd.sharding_table(shapes, exp.param_specs, exp.mesh)


@pytest.mark.parametrize("name", ["fsdp8", "data2_fsdp2_tensor2"])
def test_golden_partition_specs_2b(name):
  table = _golden_table(MESHES[name])
  path = GOLDEN / f"sharding_2b_{name}.json"
  if os.environ.get("LAYERFLOW_UPDATE_GOLDEN"):
    path.parent.mkdir(exist_ok=True)
    lines = [f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(table.items())]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one parameter per line: diffs read well
  golden = json.loads(path.read_text())
  assert sorted(table) == sorted(golden), "parameter set changed"
  changed = {k: (golden[k], table[k]) for k in table if table[k] != golden[k]}
  assert not changed, f"{len(changed)} parameter layouts changed, e.g. {next(iter(changed.items()))}"
  # sanity of what is pinned: 2B has 30 stacked blocks of hidden 1920, and every block matrix is split
  assert table["blocks.attn1.to_q.kernel"]["shape"] == [30, 1920, 1920]
  assert sum(np.prod(v["shape"]) for v in table.values()) > 1.6e9


def test_optimizer_state_sharded_like_params_2b():
  cfg = load_config("configs/default.py:size=2b,layout=rgba")
  cfg.mesh.update(MESHES["fsdp8"])
  exp = Experiment(cfg, shd.make_mesh(cfg.mesh))
  abstract = exp.abstract_state()
  shardings = exp.state_shardings(abstract)
  adam = [
    s for s in jax.tree.leaves(shardings.opt_state, is_leaf=lambda x: hasattr(x, "spec")) if s.spec != P()
  ]
  # two moments per trainable leaf, each with its parameter's spec
  assert len(adam) == 2 * len(shardings.trainable)
  specs = sorted(str(s.spec) for s in shardings.trainable.values()) * 2
  assert sorted(str(s.spec) for s in adam) == sorted(specs)
  q = shardings.trainable["blocks.attn1.to_q.kernel"]
  assert q.shard_shape((30, 1920, 1920)) == (30, 240, 1920)


def test_mesh_config_errors_and_hybrid():
  assert shd.mesh_shape(dict(data=-1, fsdp=2, tensor=1, sequence=2), 8) == dict(
    data=2, fsdp=2, tensor=1, sequence=2
  )
  with pytest.raises(ValueError, match="only one axis may be -1"):
    shd.mesh_shape(dict(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match="uses 4 devices but 8 are available"):
    shd.mesh_shape(dict(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match="unknown axis 'pipeline'"):
    shd.mesh_shape(dict(data=-1, pipeline=2), 8)
  with pytest.raises(ValueError, match=r"mesh.dcn.fsdp: 3 does not divide mesh.fsdp=4"):
    shd.make_mesh(dict(data=2, fsdp=4, dcn=dict(fsdp=3)))
  # dcn factors of 1 are the plain mesh; a DCN factor needs that many processes (here there is one)
  plain = shd.make_mesh(dict(data=2, fsdp=4, dcn=dict(data=1)))
  assert dict(plain.shape) == dict(data=2, fsdp=4, tensor=1, sequence=1)
  with pytest.raises(ValueError, match=r"mesh.dcn .*cannot lay out 8 devices"):
    shd.make_mesh(dict(data=2, fsdp=4, dcn=dict(data=2)))


@pytest.mark.slow
def test_aot_compile_reports_per_device_memory():
  """``layerflow compile``'s core on the 8 fake devices: a fsdp=4×sequence=2 train step compiles without running,
  and the memory row is consistent (the donated state is aliased; params+Adam per device ≈ a quarter)."""
  from layerflow_jax import aot

  assert aot.parse_topology("cpu:8") == ("cpu", "8", 8)
  assert aot.parse_topology("16") == ("cpu", "16", 16)
  assert aot.parse_topology("tpu:v5p:2x2x2") == ("tpu", "v5p:2x2x2", 8)
  assert aot.parse_topology("gpu:2x8") == ("gpu", "2x8", 16)
  with pytest.raises(ValueError, match="platform 'ipu' unknown"):
    aot.parse_topology("ipu:8")
  with pytest.raises(ValueError, match="cannot read a device count from 'v5p'"):
    aot.parse_topology("tpu:v5p")
  cfg = load_config(
    "configs/default.py:size=tiny",
    ["data.frames=2", "data.height=16", "data.width=16", "data.batch_size=4", "model.num_layers=1"],
  )
  cfg.mesh.update(dict(data=1, fsdp=4, tensor=1, sequence=2))
  row = aot.compile_train_step(cfg, jax.devices(), label="tiny")
  assert row["devices"] == 8 and row["mesh"] == "fsdp=4×sequence=2"
  assert row["alias_GiB"] > 0 and row["args_GiB"] >= row["state_GiB"] > 0
  assert row["peak_GiB"] == pytest.approx(
    row["args_GiB"] + row["out_GiB"] - row["alias_GiB"] + row["temp_GiB"]
  )
  table = aot.format_table([row], 80)
  assert "| tiny | 8 cpu | fsdp=4×sequence=2 | 4 |" in table and table.rstrip().endswith("| yes |")
