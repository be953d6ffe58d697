"""Parity with diffusers' ``CogVideoXTransformer3DModel`` (PyTorch, CPU, float32).

Direction: always diffusers → ours. diffusers' random init gives non-zero modulation / output weights, ours
zero-inits them (adaLN-zero), so a torch model's state dict is loaded into our model with
``from_diffusers_state_dict`` and both forwards are run on the same random inputs.

Error measure of the forwards: **max relative error = max|ours − theirs| / max|theirs|**, required ≤ 1e-4
in float32 (matmuls at precision "highest").
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import (  # noqa: E402
  get_3d_rotary_pos_embed,
  get_3d_sincos_pos_embed,
  get_timestep_embedding,
)
from flax import nnx  # noqa: E402

from layerflow_jax.export import diffusers_weights as dw  # noqa: E402
from layerflow_jax.model import DiTConfig, create_model  # noqa: E402
from layerflow_jax.model import embeddings as emb  # noqa: E402
from layerflow_jax.model import lora as lora_lib  # noqa: E402

REL_TOL = 1e-4

# Tiny model: hidden 2·16 = 32; latents F=4 frames of 8×12 (non-square on purpose), 4 channels, patch 2;
# text = 3 prompts · 4 tokens = 12 = max_text_seq_length.
B, F, H, W, C = 2, 4, 8, 12, 4
NUM_PROMPTS, PROMPT_LEN, TEXT_DIM = 3, 4, 32
T = NUM_PROMPTS * PROMPT_LEN


def _cfg(pos_embed: str, **kw) -> DiTConfig:
  base = dict(
    num_layers=2,
    num_heads=2,
    head_dim=16,
    time_embed_dim=32,
    in_channels=C,
    out_channels=C,
    text_embed_dim=TEXT_DIM,
    patch_size=2,
    pos_embed=pos_embed,
    layer_embed="none",
    num_prompts=NUM_PROMPTS,
    num_clips=4,
    dtype="float32",
    param_dtype="float32",
  )
  base.update(kw)
  return DiTConfig(**base)


def _torch_model(cfg: DiTConfig, sample=(F, H, W), seed: int = 0):
  config = dw.diffusers_config(
    cfg, sample_frames=sample[0], sample_height=sample[1], sample_width=sample[2], max_text_seq_length=T
  )
  torch.manual_seed(seed)
  model = CogVideoXTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
  # Randomize the LayerNorm affines too (torch inits them to 1 / 0, which would hide a scale/bias mix-up).
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
        module.weight.add_(0.1 * torch.randn_like(module.weight))
        module.bias.add_(0.1 * torch.randn_like(module.bias))
  return model.float().eval()


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((B, F, H, W, C)).astype(np.float32)
  text = rng.standard_normal((B, T, TEXT_DIM)).astype(np.float32)
  timesteps = np.array([3, 999], np.int64)
  return latents, timesteps, text


def _theirs(model, cfg, latents, timesteps, text):
  rope = None
  if cfg.pos_embed == "rope":
    p = cfg.patch_size
    rope = get_3d_rotary_pos_embed(
      embed_dim=cfg.head_dim,
      crops_coords=((0, 0), (H // p, W // p)),
      grid_size=(H // p, W // p),
      temporal_size=F,
      device=torch.device("cpu"),
    )
  with torch.no_grad():
    out = model(
      hidden_states=torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy()),
      encoder_hidden_states=torch.from_numpy(text),
      timestep=torch.from_numpy(timesteps),
      image_rotary_emb=rope,
      return_dict=False,
    )[0]
  return out.numpy().transpose(0, 1, 3, 4, 2)


def _ours(model, latents, timesteps, text):
  return np.asarray(model(jnp.asarray(latents), jnp.asarray(timesteps.astype(np.int32)), jnp.asarray(text)))


def _rel_err(ours, theirs) -> float:
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _torch_sd(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _params(model) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _randomize(model, seed: int) -> None:
  rng = np.random.default_rng(seed)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pure = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.asarray(x).dtype)), pure)
  nnx.update(model, pure)


@pytest.fixture
def highest_precision():
  old = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", "highest")
  yield
  jax.config.update("jax_default_matmul_precision", old)


# ----------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("sample", [(F, H, W), (2, 16, 16)], ids=["sample=input", "sample!=input"])
@pytest.mark.usefixtures("highest_precision")
def test_forward_matches_diffusers(pos_embed, sample):
  cfg = _cfg(pos_embed)
  theirs_model = _torch_model(cfg, sample=sample)
  ours_model = create_model(cfg, seed=1)
  dw.from_diffusers_state_dict(ours_model, theirs_model.state_dict())
  if pos_embed == "sincos":  # the stored table covers the sample size; a different input size rebuilds it
    stored = theirs_model.patch_embed.pos_embedding.shape[1]
    assert (stored == T + F * (H // 2) * (W // 2)) == (sample == (F, H, W))
  latents, timesteps, text = _inputs()
  theirs = _theirs(theirs_model, cfg, latents, timesteps, text)
  ours = _ours(ours_model, latents, timesteps, text)
  assert ours.shape == theirs.shape == (B, F, H, W, C)
  err = _rel_err(ours, theirs)
  print(
    f"\n[parity] pos_embed={pos_embed} sample={sample}: max rel err {err:.3e} "
    f"(max|theirs| {np.max(np.abs(theirs)):.3f})"
  )
  assert err <= REL_TOL, f"max|ours − theirs| / max|theirs| = {err:.3e} > {REL_TOL}"


@pytest.mark.usefixtures("highest_precision")
def test_forward_matches_diffusers_clips2_fractional_t():
  """num_clips 2, 8 output channels, fractional timesteps, RoPE."""
  cfg = _cfg("rope", num_clips=2, out_channels=8)
  theirs_model = _torch_model(cfg, seed=3)
  ours_model = create_model(cfg, seed=1)
  dw.from_diffusers_state_dict(ours_model, theirs_model.state_dict())
  latents, _, text = _inputs(seed=5)
  rope = get_3d_rotary_pos_embed(
    embed_dim=cfg.head_dim,
    crops_coords=((0, 0), (H // 2, W // 2)),
    grid_size=(H // 2, W // 2),
    temporal_size=F,
    device=torch.device("cpu"),
  )
  t = np.array([0.5, 417.25], np.float32)
  with torch.no_grad():
    theirs = (
      theirs_model(
        hidden_states=torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy()),
        encoder_hidden_states=torch.from_numpy(text),
        timestep=torch.from_numpy(t),
        image_rotary_emb=rope,
        return_dict=False,
      )[0]
      .numpy()
      .transpose(0, 1, 3, 4, 2)
    )
  ours = np.asarray(ours_model(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(text)))
  assert ours.shape == (B, F, H, W, 8)
  err = _rel_err(ours, theirs)
  print(f"\n[parity] rope clips=2 out=8 fractional t: max rel err {err:.3e}")
  assert err <= REL_TOL


# ----------------------------------------------------------------------------- conversion


def test_export_of_loaded_diffusers_model_is_bitwise():
  cfg = _cfg("sincos")
  theirs_model = _torch_model(cfg)
  ours_model = create_model(cfg, seed=1)
  dw.from_diffusers_state_dict(ours_model, theirs_model.state_dict())
  exported = dw.to_diffusers_state_dict(ours_model, cfg)
  ref = _torch_sd(theirs_model)
  assert set(exported) == set(ref)
  for k, v in ref.items():
    assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    assert np.array_equal(exported[k], v), k
  # Also from a bare state / pure dict.
  from_state = dw.to_diffusers_state_dict(nnx.state(ours_model, nnx.Param), cfg)
  from_pure = dw.to_diffusers_state_dict(nnx.to_pure_dict(nnx.state(ours_model, nnx.Param)), cfg)
  assert all(np.array_equal(from_state[k], ref[k]) and np.array_equal(from_pure[k], ref[k]) for k in ref)
  assert set(dw.expected_shapes(cfg)) == set(ref)


def test_round_trip_ours_diffusers_ours_is_bitwise():
  spec = lora_lib.AdapterSpec(
    name="motion", rank=2, alpha=4.0, targets=("q", "v", "out", "ff_in"), blocks=(1,)
  )
  cfg = _cfg("rope", layer_embed="text+video", num_clips=2, adapters=(spec,))
  src = create_model(cfg, seed=0)
  _randomize(src, seed=7)
  base = dw.to_diffusers_state_dict(src)
  extras = dw.extras_state_dict(src)
  assert not any(k.startswith(("layer_embed", "clip_embed", "adapters")) for k in base)
  assert set(extras) == {
    "layer_embed.linear.weight",
    "layer_embed.linear.bias",
    "layer_embed.norm.weight",
    "layer_embed.norm.bias",
    "clip_embed.weight",
    *(
      f"adapters.motion.transformer_blocks.1.{m}.lora_{ab}.weight"
      for m in ("attn1.to_q", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj")
      for ab in "AB"
    ),
  }
  assert extras["layer_embed.linear.weight"].shape == (cfg.hidden, 1)
  ff_in = "adapters.motion.transformer_blocks.1.ff.net.0.proj"
  assert extras[f"{ff_in}.lora_A.weight"].shape == (2, cfg.hidden)
  assert extras[f"{ff_in}.lora_B.weight"].shape == (4 * cfg.hidden, 2)

  dst = create_model(cfg, seed=1)
  _randomize(dst, seed=8)
  dw.from_diffusers_state_dict(dst, base)
  dw.from_extras_state_dict(dst, extras)
  a, b = _params(src), _params(dst)
  assert set(a) == set(b)
  for path in a:
    assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path

  # The export (extras skipped) loads strictly into diffusers' model.
  theirs = _torch_model(cfg)
  theirs.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()}, strict=True)
  assert all(np.array_equal(v, base[k]) for k, v in _torch_sd(theirs).items())


def test_round_trip_bfloat16_params():
  cfg = _cfg("sincos", param_dtype="bfloat16", dtype="bfloat16")
  src = create_model(cfg, seed=0)
  _randomize(src, seed=3)
  sd = dw.to_diffusers_state_dict(src)
  # Each array keeps its parameter's dtype (our LayerNorm parameters stay float32 in a bfloat16 model).
  ours = _params(src)
  assert str(sd["proj_out.weight"].dtype) == "bfloat16" and sd["norm_final.weight"].dtype == np.float32
  assert (
    str(sd["transformer_blocks.1.attn1.to_q.weight"].dtype)
    == str(ours[("blocks", "attn1", "to_q", "kernel")].dtype)
    == "bfloat16"
  )
  dst = create_model(cfg, seed=1)
  dw.from_diffusers_state_dict(dst, sd)
  a, b = _params(src), _params(dst)
  assert all(a[p].dtype == b[p].dtype and np.array_equal(a[p], b[p]) for p in a)
  # dtype= casts everything; torch bfloat16 tensors are accepted and give back the same bits.
  sd16 = dw.to_diffusers_state_dict(src, dtype="bfloat16")
  assert all(str(v.dtype) == "bfloat16" for v in sd16.values())
  theirs = _torch_model(cfg).to(torch.bfloat16)
  theirs.load_state_dict(
    {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in sd16.items()}
  )
  dst2 = create_model(cfg, seed=2)
  dw.from_diffusers_state_dict(dst2, theirs.state_dict())
  c = _params(dst2)
  assert all(np.array_equal(c[p], b[p]) for p in a if str(a[p].dtype) == "bfloat16")


def test_load_refuses_bad_state_dict_and_lists_keys():
  cfg = _cfg("sincos")
  sd = _torch_sd(_torch_model(cfg))
  model = create_model(cfg, seed=1)
  before = _params(model)

  bad = dict(sd)
  del bad["transformer_blocks.1.attn1.to_k.weight"]
  bad["proj_out.bias"] = np.zeros(17, np.float32)
  bad["ofs_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)
  bad["patch_embed.proj.weight"] = np.transpose(sd["patch_embed.proj.weight"], (2, 3, 1, 0))
  with pytest.raises(ValueError) as info:
    dw.from_diffusers_state_dict(model, bad)
  msg = str(info.value)
  assert "missing keys" in msg and "transformer_blocks.1.attn1.to_k.weight" in msg
  assert "unexpected keys" in msg and "ofs_embedding.linear_1.weight" in msg
  assert "shape mismatches" in msg and "proj_out.bias: got (17,)" in msg and "patch_embed.proj.weight" in msg
  # Nothing was written.
  after = _params(model)
  assert all(np.array_equal(before[p], after[p]) for p in before)

  with pytest.raises(ValueError, match=r"missing keys \(1\).*norm_final\.weight"):
    dw.from_diffusers_state_dict(model, {k: v for k, v in sd.items() if k != "norm_final.weight"})
  # A checkpoint with more layers than the model.
  with pytest.raises(ValueError, match=r"transformer_blocks\.2\.norm1\.linear\.weight"):
    dw.from_diffusers_state_dict(
      model,
      {**sd, "transformer_blocks.2.norm1.linear.weight": sd["transformer_blocks.1.norm1.linear.weight"]},
    )


def test_load_keeps_parameter_shardings():
  """Loading into a sharded model keeps each parameter's sharding (8 fake CPU devices from conftest)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  cfg = _cfg("sincos")
  model = create_model(cfg, seed=1)
  mesh = jax.make_mesh((len(jax.devices()),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  n = len(jax.devices())

  def spec_for(path, x):
    if x.ndim >= 2 and x.shape[-1] % n == 0 and "kernel" in str(path[-1]):
      return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "x"))
    return NamedSharding(mesh, P())

  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  nnx.update(model, jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(x, spec_for(p, x)), pure))
  before = {p: v[...].sharding for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  sd = _torch_sd(_torch_model(cfg))
  dw.from_diffusers_state_dict(model, sd)
  after = {p: v[...].sharding for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert all(before[p].is_equivalent_to(after[p], v.ndim) for p, v in _params(model).items())
  assert after[("blocks", "ff", "proj_in", "kernel")].spec == P(None, None, "x")
  exported = dw.to_diffusers_state_dict(model)
  assert all(np.array_equal(exported[k], v) for k, v in sd.items())


def test_diffusers_config_fields():
  cfg = _cfg("rope", norm_eps=1e-5)
  conf = dw.diffusers_config(
    cfg, sample_frames=13, sample_height=60, sample_width=90, max_text_seq_length=226
  )
  assert conf["sample_frames"] == 49  # pixel frames: (13 − 1) · 4 + 1
  assert (conf["sample_height"], conf["sample_width"], conf["max_text_seq_length"]) == (60, 90, 226)
  assert conf["use_rotary_positional_embeddings"] is True
  assert conf["num_attention_heads"] == 2 and conf["attention_head_dim"] == 16 and conf["num_layers"] == 2
  assert conf["time_embed_dim"] == 32 and conf["text_embed_dim"] == TEXT_DIM and conf["norm_eps"] == 1e-5
  model = CogVideoXTransformer3DModel.from_config(conf)
  assert model.patch_embed.sample_frames == 49
  assert dw.diffusers_config(_cfg("sincos"), 4, 8, 12, 12)["use_rotary_positional_embeddings"] is False
  with pytest.raises(ValueError):
    dw.diffusers_config(_cfg("none"), 4, 8, 12, 12)
  with pytest.raises(ValueError):
    dw.diffusers_config(dataclasses.replace(_cfg("rope"), mlp_ratio=2), 4, 8, 12, 12)


# ----------------------------------------------------------------------------- fixed tables


def test_sincos_table_matches_diffusers_non_square():
  dim, frames, height, width = 64, 5, 3, 7
  ours = emb.sincos_3d(dim, frames, height, width, 1.875, 1.0)
  theirs = get_3d_sincos_pos_embed(dim, (width, height), frames, 1.875, 1.0, output_type="pt")
  theirs = theirs.flatten(0, 1).float().numpy()
  assert ours.shape == theirs.shape == (frames * height * width, dim)
  err = float(np.max(np.abs(ours - theirs)))
  print(f"\n[parity] sincos_3d {frames}x{height}x{width} dim {dim}: max abs err {err:.3e}")
  assert err <= 1e-6


def _timestep_embedding_f64(t: np.ndarray, dim: int, max_period: float = 10000.0):
  """Float64 reference of the flip_sin_to_cos, shift-0 sinusoidal embedding, and its float32 error bound.

  Both implementations compute ``x_j = -ln(P)·j/half`` (a few float32 roundings: |δx| ≤ 3u|x|), ``f_j = exp(x_j)``
  (≤ 2 ulp = 4u relative, plus |δx|), ``a = t·f_j`` (one more rounding, u) and ``sin/cos(a)``, whose range
  reduction and polynomial add ≤ u|a| + 4u absolute. An argument error δa moves sin/cos by ≤ |δa|, so with
  u = 2⁻²⁴: |err| ≤ u·(|a|·(3|x| + 7) + 4). One float32 ulp of a = 999 is 6e-5: no fixed absolute tolerance holds
  for large t on every CPU's float32 sin, but this bound does.
  """
  half = dim // 2
  x = -math.log(max_period) * np.arange(half, dtype=np.float64) / half
  args = t.astype(np.float64)[:, None] * np.exp(x)[None, :]
  ref = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  u = 2.0**-24
  bound = u * (np.abs(args) * (3 * np.abs(x) + 7) + 4)
  bound = np.concatenate([bound, bound], axis=-1)
  if dim % 2:
    ref, bound = np.pad(ref, ((0, 0), (0, 1))), np.pad(bound, ((0, 0), (0, 1)), constant_values=4 * u)
  return ref, bound


def test_timestep_embedding_matches_diffusers():
  """Each side against a float64 reference, within the float32 error bound of the computation (any CPU)."""
  t = np.array([0, 1, 3, 0.5, 417.25, 999], np.float32)
  for dim in (32, 33, 64):
    ref, bound = _timestep_embedding_f64(t, dim)
    ours = np.asarray(emb.timestep_embedding(jnp.asarray(t), dim))
    theirs = get_timestep_embedding(
      torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0
    ).numpy()
    assert ours.shape == theirs.shape == ref.shape
    for name, side in (("ours", ours), ("diffusers", theirs)):
      err = np.abs(side.astype(np.float64) - ref)
      print(
        f"\n[parity] timestep_embedding dim {dim} {name}: max abs err {err.max():.3e}, "
        f"max err/bound {(err / bound).max():.3f}"
      )
      assert np.all(err <= bound), (
        f"{name}: float32 error exceeds its bound at {np.argwhere(err > bound)[:4]}"
      )
    # Small timesteps have small arguments: there the bound is tight (≤ 2e-6), so a wrong frequency or phase fails.
    assert float(bound[:4].max()) < 2e-6


def test_rope_table_matches_diffusers():
  head_dim, frames, gh, gw = 64, 3, 4, 6
  ours_cos, ours_sin = emb.rope_3d(head_dim, frames, gh, gw)
  cos, sin = get_3d_rotary_pos_embed(
    embed_dim=head_dim,
    crops_coords=((0, 0), (gh, gw)),
    grid_size=(gh, gw),
    temporal_size=frames,
    device=torch.device("cpu"),
  )
  err = max(float(np.max(np.abs(ours_cos - cos.numpy()))), float(np.max(np.abs(ours_sin - sin.numpy()))))
  print(f"\n[parity] rope_3d {frames}x{gh}x{gw} head_dim {head_dim}: max abs err {err:.3e}")
  assert err <= 1e-5
