"""The speed levers of issue 6 change no values, and the benchmark measures the model the peer measures."""

import dataclasses
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerflow_jax.model import DiTConfig, create_model, dit
from layerflow_jax.model import lora as lora_lib

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
LORA = (lora_lib.AdapterSpec("content", rank=4, alpha=4.0, targets=("q", "k", "v", "out"), blocks=(1,)),)


def inputs(b=2, f=8, h=4, w=4, c=8, text=12, d=24, seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  return (
    jax.random.normal(k[0], (b, f, h, w, c)),
    jnp.array([5, 900][:b]),
    jax.random.normal(k[1], (b, text, d)),
  )


def randomized_state(cfg, seed=1, scale=0.05):
  """Parameters with the zero-initialised ones (adaLN-zero, proj_out, LoRA B) made non-zero."""
  state = nnx.state(create_model(cfg), nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  )


def value_and_grads(cfg, state):
  model = create_model(cfg)
  nnx.update(model, state)
  graphdef, params = nnx.split(model)
  x, t, txt = inputs()

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x, t, txt) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, jax.tree.leaves(grads)


def assert_same(got, want, what):
  (v1, g1), (v0, g0) = got, want
  np.testing.assert_allclose(v1, v0, rtol=1e-5, err_msg=what)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=what)


def test_fused_qkv_and_attention_saving_remat_keep_values_and_gradients():
  """One stacked [in, 3, out] matmul gives the values and gradients of to_q / to_k / to_v, and the remat policies
  that save attention change nothing but what is recomputed (fp32)."""
  cfg = dataclasses.replace(CFG, num_layers=1, scan_layers=False)  # one block, no loop: cheap to compile
  state = randomized_state(cfg)
  want = value_and_grads(cfg, state)
  for kw in (
    dict(fused_qkv=True),
    dict(remat="save_attention"),
    dict(remat="dots_attention"),
    dict(pad_tokens_to=16),
    dict(pad_tokens_to=16, attention="chunked"),
  ):
    assert_same(value_and_grads(dataclasses.replace(cfg, **kw), state), want, str(kw))


def test_padding_the_joint_sequence_keeps_values_and_gradients_with_rope():
  """12 text + 32 video tokens padded to 48: the padding keys are masked and the padded rows dropped, so the
  loss and every gradient match the unpadded model (fp32), RoPE on the video tokens included."""
  cfg = dataclasses.replace(CFG, num_layers=1, scan_layers=False, pos_embed="rope")
  state = randomized_state(cfg)
  padded = dataclasses.replace(cfg, pad_tokens_to=16)
  assert_same(value_and_grads(padded, state), value_and_grads(cfg, state), "pad_tokens_to=16 with RoPE")
  x, t, txt = inputs()
  model = create_model(padded)
  nnx.update(model, state)
  assert model(x, t, txt).shape == x.shape


@pytest.mark.slow
def test_fused_qkv_keeps_separate_projections_where_lora_targets_them():
  """Block 1 carries a q/k/v/out LoRA: it keeps the separate projections (and the adapter's update), block 0 is
  fused; together they equal the unfused model."""
  cfg = dataclasses.replace(CFG, adapters=LORA)
  state = randomized_state(cfg)
  assert_same(
    value_and_grads(dataclasses.replace(cfg, fused_qkv=True), state),
    value_and_grads(cfg, state),
    "fused_qkv with LoRA on block 1",
  )


def test_attention_policy_matches_the_cudnn_forward_primitive():
  """The policy saves jax's fused-attention forward kernel by primitive name: guard against a rename in jax."""
  fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  names = [
    getattr(fused, n).name
    for n in ("_dot_product_attention_fwd_p", "_dot_product_attention_fwd_p_wrapper")
    if hasattr(fused, n)
  ]
  assert names, "jax's cuDNN attention forward primitives not found"
  for name in names:
    assert dit._attention_kernel_saveable(types.SimpleNamespace(name=name))
  for other in ("dot_general", "dot_product_attention_bwd", "dot_product_attention_bwd_wrapper", "name"):
    assert not dit._attention_kernel_saveable(types.SimpleNamespace(name=other))


def test_flop_formula_matches_the_issue():
  from benchmarks import common as bc

  s = bc.SHAPES["2b"]
  assert (s.video_tokens, s.text_tokens, s.tokens, s.hidden) == (21600, 678, 22278, 1920)
  assert abs(bc.train_flops(s.num_layers, s.tokens, s.hidden) - 5.2e14) / 5.2e14 < 0.01  # "≈ 5.2e14"
  assert bc.train_flops(30, 100, 64) == pytest.approx(3 * bc.forward_flops(30, 100, 64))
  # LoRA with adapters from block 0 on: forward + input gradients = 2/3 of the dense and all of the attention work
  n, d = 100, 64
  assert bc.lora_flops(30, 0, n, d) == pytest.approx(30 * (48 * n * d * d + 12 * n * n * d))


def test_benchmark_model_is_the_peers_size():
  """The JAX benchmark's 2B model (16 latent channels, T5 width) has the diffusers peer's parameters plus only the
  LayerFlow layer embedder (Linear 1→d and a LayerNorm)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from benchmarks import common as bc
  from benchmarks import train_step as ts
  from layerflow_jax import sharding as shd

  shape = bc.SHAPES["2b"]
  args = ts.parse_args(["--attention", "xla"])
  _, config = ts.build_config(args, shape, "train")
  exp = ts.Experiment(config, shd.make_mesh(config.mesh, devices=jax.devices()[:1]))
  n_jax = sum(int(np.prod(v.shape)) for v in exp.abstract_params.values())
  with torch.device("meta"):
    peer = diffusers.CogVideoXTransformer3DModel(max_text_seq_length=shape.text_tokens)
  n_peer = sum(p.numel() for p in peer.parameters())
  d = shape.hidden
  assert n_jax - n_peer == 4 * d  # layer_embed_linear (kernel + bias) and layer_embed_norm (scale + bias)
  assert exp.model_cfg.in_channels == 16 and exp.model_cfg.text_embed_dim == 4096
  assert exp.model_cfg.fused_qkv and exp.model_cfg.remat == "dots_attention"


@pytest.mark.slow
def test_train_step_benchmark_runs_tiny(tmp_path, repo_root):
  """The benchmark script end to end on the tiny shape (every mode; CPU)."""
  out = tmp_path / "r.json"
  cmd = [
    sys.executable,
    str(repo_root / "benchmarks" / "train_step.py"),
    "--tiny",
    "--modes",
    "train,lora,sample",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--sample-steps",
    "3",
    "--out-json",
    str(out),
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  import json

  recs = {r["mode"]: r for r in json.loads(out.read_text())}
  assert set(recs) == {"train", "lora", "sample"}
  assert recs["train"]["loss_finite"] and recs["lora"]["loss_finite"] and recs["sample"]["finite"]
  assert recs["lora"]["trainable_params"] < recs["lora"]["params"]
  assert recs["train"]["trainable_params"] == recs["train"]["params"]


def test_profile_summary_splits_kernel_time_by_category(tmp_path):
  """A hand-made Chrome trace: device kernels are summed per category and per step; host events are ignored."""
  import gzip
  import json

  from benchmarks import profile_summary as ps

  gpu, host = 7, 1
  events = [
    {"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "pid": gpu, "tid": 3, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
    {"ph": "M", "pid": gpu, "tid": 4, "name": "thread_name", "args": {"name": "XLA Ops"}},
    {"ph": "M", "pid": host, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": host, "tid": 1, "name": "thread_name", "args": {"name": "python"}},
    {
      "ph": "X",
      "pid": gpu,
      "tid": 3,
      "ts": 0,
      "dur": 400,
      "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
    },
    {
      "ph": "X",
      "pid": gpu,
      "tid": 3,
      "ts": 400,
      "dur": 1000,
      "name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop",
    },
    {"ph": "X", "pid": gpu, "tid": 3, "ts": 1500, "dur": 300, "name": "nvjet_tst_128x256_64x4_2x1_v_bz_TNT"},
    {"ph": "X", "pid": gpu, "tid": 3, "ts": 1900, "dur": 100, "name": "loop_multiply_fusion_3"},
    {"ph": "X", "pid": gpu, "tid": 4, "ts": 0, "dur": 2000, "name": "fusion.1"},  # op line: not a kernel
    {"ph": "X", "pid": host, "tid": 1, "ts": 0, "dur": 5000, "name": "PjitFunction(step)"},
  ]
  path = tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  s = ps.summarize(ps.load_events(ps.find_trace(tmp_path)), steps=2)
  assert s["by_category_ms"] == {
    "attention bwd": 0.5,
    "attention fwd": 0.2,
    "gemm": 0.15,
    "elementwise fusions": 0.05,
  }
  assert s["span_ms"] == 1.0 and s["busy_ms"] == 0.9 and abs(s["idle_ms"] - 0.1) < 1e-12
  assert s["top_kernels"][0]["category"] == "attention bwd" and s["top_kernels"][0]["calls"] == 0.5
  assert "attention bwd" in ps.format_table(s)
  with pytest.raises(ValueError, match="no device kernels"):
    ps.summarize([e for e in events if e["pid"] == host], steps=1)
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    ps.find_trace(tmp_path / "plugins" / "profile" / "missing")
