"""PyTorch interop end to end: export → diffusers + PEFT + extras, import of diffusers' own checkpoints, sampling.

Error measure of forwards: max|ours − theirs| / max|theirs| (≤ 1e-4, float32, matmuls at "highest").
Each test prints the errors it measured (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: E402

from configs import default  # noqa: E402
from layerflow_jax import cli  # noqa: E402
from layerflow_jax.diffusion import samplers  # noqa: E402
from layerflow_jax.export import (  # noqa: E402
  convert,
  diffusers_folder,
  peft_lora,
  torch_extras,  # noqa: E402
)
from layerflow_jax.export import diffusers_weights as dw  # noqa: E402
from layerflow_jax.model import DiTConfig  # noqa: E402
from layerflow_jax.model import lora as lora_lib  # noqa: E402
from layerflow_jax.train import checkpoint as ckpt_lib  # noqa: E402
from layerflow_jax.train import trainer  # noqa: E402
from layerflow_jax.train.experiment import Experiment  # noqa: E402

REL_TOL = 1e-4
SAMPLE_TOL = 1e-3
B = 2
# Tiny layered setup: 4 clips × 4 frames of 8×12 pixels; pixel codec 2×2×2 → 24 latent channels, each clip
# 2 latent frames of 4×6 (non-square); 3 prompts × 4 tokens of width 32; hidden 2 × 16.
TINY = dict(num_layers=2, num_heads=2, head_dim=16, time_embed_dim=32)


@pytest.fixture(autouse=True)
def highest_precision():
  old = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", "highest")
  yield
  jax.config.update("jax_default_matmul_precision", old)


def _config(pos_embed: str = "sincos", layer_embed: str = "text+video", adapters: bool = True):
  c = default.get_config("size=tiny")
  c.model.update(TINY)
  c.model.pos_embed = pos_embed
  c.model.layer_embed = layer_embed
  c.text_encoder.dim, c.text_encoder.max_length = 32, 4
  c.autoencoder.spatial, c.autoencoder.temporal = 2, 2
  c.data.frames, c.data.height, c.data.width = 4, 8, 12
  c.sampling.num_steps = 8
  if adapters:
    # A stage-3 shape: motion (removed at sampling) and content (kept, at a non-unit scale).
    c.model.adapters.motion = dict(rank=2, alpha=4.0, targets="q,v,out,ff_in", blocks=[1])
    c.model.adapters.content = dict(rank=3, alpha=1.5, targets="q,k,v,out,ff_out", blocks="all")
    c.sampling.remove_adapters = ("motion",)
    c.sampling.adapter_scales.content = 0.7
  return c


def _perturbed_params(exp: Experiment, seed: int) -> dict:
  """Init + 0.05·N(0, 1) on every parameter (so zero-init modulations, LoRA B and norms are all non-trivial)."""
  rng = np.random.default_rng(seed)
  params = jax.device_get(exp._init_params(seed))
  return {k: (np.asarray(v) + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params.items()}


def _inputs(exp: Experiment, seed: int = 0):
  rng = np.random.default_rng(seed)
  t, h, w, c = exp.latent_shape
  latents = rng.standard_normal((B, exp.layout.num_clips * t, h, w, c)).astype(np.float32)
  text = rng.standard_normal((B, 3 * exp.text_encoder.max_length, exp.text_encoder.dim)).astype(np.float32)
  return latents, np.array([3, 999], np.int64), text


def _ours(exp, params, latents, timesteps, text, *, sampling_view: bool = True):
  """Our forward as sampling runs it: adapters removed at sampling detached, the rest at their scales."""
  model = exp.model({k: jnp.asarray(v) for k, v in params.items()})
  scales = {}
  if sampling_view:
    for name in exp.config.sampling.remove_adapters:
      lora_lib.remove(model, name)
    scales = {
      k: jnp.full((latents.shape[0],), v, jnp.float32) for k, v in exp.config.sampling.adapter_scales.items()
    }
  return model, np.asarray(
    model(jnp.asarray(latents), jnp.asarray(timesteps, jnp.int32), jnp.asarray(text), adapter_scales=scales)
  )


def _torch_forward(module, latents, timesteps, text):
  with torch.no_grad():
    out = module(
      torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy()),
      torch.from_numpy(text),
      torch.from_numpy(timesteps),
    )
  return out.float().numpy().transpose(0, 1, 3, 4, 2)


def _rel(ours, theirs) -> float:
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _lora_layers(transformer) -> dict[str, dict]:
  from peft.tuners.lora import LoraLayer

  return {name: dict(m.scaling) for name, m in transformer.named_modules() if isinstance(m, LoraLayer)}


# ----------------------------------------------------------------------------- export → PyTorch forward


@pytest.mark.parametrize("merge", [False, True], ids=["lora=separate", "lora=merged"])
@pytest.mark.parametrize("pos_embed,layer_embed", [("sincos", "text+video"), ("rope", "text")])
def test_export_forward_matches_pytorch(tmp_path, pos_embed, layer_embed, merge):
  exp = Experiment(_config(pos_embed, layer_embed))
  params = _perturbed_params(exp, seed=1)
  summary = convert.export_params(params, exp.config, tmp_path, merge_lora=merge)
  by_name = {a["name"]: a for a in summary["adapters"]}
  assert by_name["content"]["merged"] is merge and by_name["motion"]["merged"] is False
  assert (tmp_path / "motion" / peft_lora.WEIGHT_NAME).is_file()  # removed at sampling: never merged
  assert (tmp_path / "content" / peft_lora.WEIGHT_NAME).is_file() is (not merge)

  theirs_model = torch_extras.LayerFlowTransformer.from_export(tmp_path)
  lora = _lora_layers(theirs_model.transformer)
  if merge:
    assert not lora
  else:  # PEFT put content where (and only where) ours has it, scaled alpha / r · sampling scale
    assert len(lora) == 2 * 5
    assert all(s == {"content": pytest.approx(1.5 / 3 * 0.7)} for s in lora.values())
  latents, timesteps, text = _inputs(exp)
  _, ours = _ours(exp, params, latents, timesteps, text)
  theirs = _torch_forward(theirs_model, latents, timesteps, text)
  err = _rel(ours, theirs)
  theirs_model._handle.remove()  # the same model without the extras is far off: the extras matter
  bare = _rel(ours, _torch_forward(theirs_model, latents, timesteps, text))
  print(
    f"\n[export] {pos_embed} {layer_embed} merged={merge}: max rel err {err:.3e} (without extras {bare:.2e})"
  )
  assert err <= REL_TOL
  assert bare > 100 * REL_TOL


def test_peft_files_round_trip_and_diffusers_config(tmp_path):
  """The PEFT file carries the adapter bitwise and its LoraConfig; diffusers' pipeline loader accepts it too."""
  exp = Experiment(_config("rope", "text+video"))
  params = _perturbed_params(exp, seed=2)
  convert.export_params(params, exp.config, tmp_path)
  sd, conf = peft_lora.read_adapter(tmp_path / "motion")
  assert conf["r"] == 2 and conf["lora_alpha"] == 4.0
  assert sorted(conf["target_modules"]) == sorted(
    f"transformer_blocks.1.{m}" for m in ("attn1.to_q", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj")
  )
  assert all(k.startswith("transformer.transformer_blocks.1.") and ".lora_" in k for k in sd)
  assert sd["transformer.transformer_blocks.1.ff.net.0.proj.lora_A.weight"].shape == (2, 32)
  src = exp.model({k: jnp.asarray(v) for k, v in params.items()})
  dst = exp.model({k: jnp.zeros_like(v) for k, v in params.items()})
  for name in ("motion", "content"):
    peft_lora.load_adapter(dst, tmp_path / name, name)
    for t in src.adapters[name].__dict__:
      if t.endswith(("_a", "_b")):
        assert np.array_equal(
          np.asarray(getattr(src.adapters[name], t)[...]), np.asarray(getattr(dst.adapters[name], t)[...])
        ), (name, t)
  with pytest.raises(ValueError, match="does not fit adapter 'content'"):
    peft_lora.load_adapter(dst, tmp_path / "motion", "content")
  # diffusers' pipeline-level loader reads the same file (keys prefixed "transformer.").
  transformer = CogVideoXTransformer3DModel.from_pretrained(tmp_path)
  pipe = CogVideoXPipeline(
    tokenizer=None,
    text_encoder=None,
    vae=None,
    transformer=transformer,
    scheduler=CogVideoXDDIMScheduler.from_pretrained(tmp_path / "scheduler"),
  )
  pipe.load_lora_weights(str(tmp_path / "motion"), weight_name=peft_lora.WEIGHT_NAME, adapter_name="motion")
  assert len(_lora_layers(transformer)) == 4
  info = torch_extras.read_info(tmp_path)
  assert info["clips"] == ["fg", "alpha", "bg", "blend"] and info["tasks"]["fg2bg"] == ["fg", "alpha"]
  assert info["prompt_length"] == 4 and info["num_prompts"] == 3 and info["layer_embed"] == "text+video"
  assert torch_extras.LayerFlowExtras(info).given_clips("decompose") == [False, False, False, True]


def _save_checkpoint(exp: Experiment, params: dict, workdir: pathlib.Path, step: int = 7) -> None:
  ck = ckpt_lib.Checkpointer(workdir)
  try:
    ck.save(
      step, exp.init_state(params=params), meta={"config": ckpt_lib.config_to_meta(exp.config), "step": step}
    )
  finally:
    ck.close()


def test_export_cli_bfloat16_sharded_and_refusals(tmp_path, capsys):
  exp = Experiment(_config("sincos", "text"))
  params = _perturbed_params(exp, seed=3)
  _save_checkpoint(exp, params, tmp_path / "run")
  out = tmp_path / "out"
  assert (
    cli.main(
      [
        "export",
        "--checkpoint",
        str(tmp_path / "run"),
        "--out",
        str(out),
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "20KB",
      ]
    )
    == 0
  )
  index = json.loads((out / diffusers_folder.INDEX_NAME).read_text())
  assert len(set(index["weight_map"].values())) > 1
  transformer = CogVideoXTransformer3DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
  model = exp.model({k: jnp.asarray(v) for k, v in params.items()})
  want = dw.to_diffusers_state_dict(model, dtype="bfloat16")
  got = {k: v.view(torch.int16).numpy() for k, v in transformer.state_dict().items()}
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k].view(np.int16)) for k in want)
  _, conf = peft_lora.read_adapter(out / "content")
  sd, _ = peft_lora.read_adapter(out / "content")
  assert conf["lora_alpha"] == 1.5 and all(str(v.dtype) == "bfloat16" for v in sd.values())
  # The same export with its sizes changed no longer fits the checkpoint: one line, naming what differs.
  capsys.readouterr()
  rc = cli.main(
    [
      "export",
      "--checkpoint",
      str(tmp_path / "run"),
      "--out",
      str(tmp_path / "bad"),
      "--config.model.num_layers=3",
    ]
  )
  err = capsys.readouterr().err.strip()
  print(f"\n[export refusal] {err}")
  assert rc == 2 and len(err.splitlines()) == 1
  assert (
    "does not match its config" in err
    and "shape (checkpoint vs config)" in err
    and "(2, 32, 3) vs (3, 32, 3)" in err
  )
  assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- import diffusers' own checkpoints


def _diffusers_model(seed: int = 0, **kw):
  conf = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=24,
    out_channels=24,
    time_embed_dim=32,
    text_embed_dim=32,
    num_layers=2,
    sample_frames=29,
    sample_height=4,
    sample_width=6,
    max_text_seq_length=12,
  )
  conf.update(kw)
  torch.manual_seed(seed)
  model = CogVideoXTransformer3DModel(**conf)
  with torch.no_grad():  # torch inits LayerNorms to 1 / 0, which would hide a scale/bias mix-up
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
        module.weight.add_(0.1 * torch.randn_like(module.weight))
        module.bias.add_(0.1 * torch.randn_like(module.bias))
  return model.eval()


_IMPORT_OVERRIDES = [
  "--config.text_encoder.max_length=4",
  "--config.data.frames=4",
  "--config.data.height=8",
  "--config.data.width=12",
]


@pytest.mark.parametrize(
  "case",
  [
    "fp32-sharded",
    pytest.param("fp32-single", marks=pytest.mark.slow),
    pytest.param("bf16-rope-sharded", marks=pytest.mark.slow),
  ],
)
def test_import_diffusers_checkpoint(tmp_path, case):
  rope = "rope" in case
  theirs = _diffusers_model(use_rotary_positional_embeddings=rope)
  if case.startswith("bf16"):
    theirs = theirs.to(torch.bfloat16)
  src = tmp_path / "src"
  theirs.save_pretrained(src, max_shard_size="30KB" if "sharded" in case else "10GB")
  assert (src / diffusers_folder.INDEX_NAME).is_file() == ("sharded" in case)
  # layer_embed none: the imported model is exactly diffusers' model; otherwise the extras start at init.
  layer_embed = "none" if case == "fp32-sharded" else "text+video"
  rc = cli.main(
    [
      "import-diffusers",
      str(src),
      "--out",
      str(tmp_path / "ck"),
      *_IMPORT_OVERRIDES,
      f"--config.model.layer_embed={layer_embed}",
    ]
  )
  assert rc == 0
  params, config = trainer.load_params(tmp_path / "ck")
  m = config.model
  assert (m.num_layers, m.num_heads, m.head_dim, m.time_embed_dim, m.pos_embed) == (
    2,
    2,
    16,
    32,
    "rope" if rope else "sincos",
  )
  assert config.text_encoder.dim == 32 and config.autoencoder.temporal == 2
  exp = Experiment(config)
  latents, timesteps, text = _inputs(exp, seed=4)

  # import → export is bitwise the source (dtype included).
  out = tmp_path / "export"
  rc = cli.main(
    ["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(out)]
    + (["--dtype", "bfloat16"] if case.startswith("bf16") else [])
  )
  assert rc == 0
  a, b = diffusers_folder.read_state_dict(src), diffusers_folder.read_state_dict(out)
  assert set(a) == set(b)
  for k in a:
    assert (
      a[k].dtype == b[k].dtype
      and a[k].shape == b[k].shape
      and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8))
    ), k
  src_conf, out_conf = diffusers_folder.read_config(src), diffusers_folder.read_config(out)
  layered = {"sample_frames", "sample_height", "sample_width", "max_text_seq_length", "_diffusers_version"}
  assert {k: v for k, v in src_conf.items() if k not in layered} == {
    k: v for k, v in out_conf.items() if k not in layered
  }

  # Our forward of the imported checkpoint = PyTorch's (the source model itself, plus the exported extras).
  _, ours = _ours(exp, params, latents, timesteps, text)
  reference = theirs.float()
  if case.startswith(
    "bf16"
  ):  # the bfloat16 export rounded the (float32, at init) extras: take them unrounded
    convert.export_params(params, config, tmp_path / "extras32")
    out = tmp_path / "extras32"
  mod = torch_extras.LayerFlowTransformer(reference, torch_extras.LayerFlowExtras.from_file(out))
  if layer_embed != "none":
    assert np.abs(np.asarray(params["clip_embed"])).max() > 0  # extras at init, not zero
  got = _torch_forward(mod, latents, timesteps, text)
  err = _rel(ours, got)
  print(f"\n[import] {case}: max rel err vs PyTorch {err:.3e}")
  assert err <= REL_TOL

  # A stage config over the imported work dir (train.init_from) builds its state from these parameters.
  stage = _config("rope" if rope else "sincos", layer_embed)
  state = Experiment(stage).init_state(params=params)
  assert "adapters.motion.q_a" in state.frozen or "adapters.motion.q_a" in state.trainable
  full = {**state.frozen, **state.trainable}
  assert np.array_equal(
    np.asarray(full["blocks.attn1.to_q.kernel"]), np.asarray(params["blocks.attn1.to_q.kernel"])
  )


@pytest.mark.slow
def test_imported_checkpoint_samples_with_the_cli(tmp_path):
  """``layerflow sample --checkpoint`` runs on an imported work dir (2 steps, every layer written)."""
  src = tmp_path / "src"
  _diffusers_model().save_pretrained(src)
  assert cli.main(["import-diffusers", str(src), "--out", str(tmp_path / "ck"), *_IMPORT_OVERRIDES]) == 0
  assert (
    cli.main(
      [
        "sample",
        "--checkpoint",
        str(tmp_path / "ck"),
        "--task",
        "generate",
        "--fg-prompt",
        "a ball",
        "--bg-prompt",
        "grass",
        "--blend-prompt",
        "a ball on grass",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "samples"),
      ]
    )
    == 0
  )
  names = {p.stem for p in (tmp_path / "samples").iterdir()}
  assert {"fg", "alpha", "bg", "blend"} <= names


def test_import_refuses_mismatches(tmp_path, capsys):
  from safetensors.numpy import save_file

  src = tmp_path / "src"
  _diffusers_model().save_pretrained(src)
  sd = diffusers_folder.read_state_dict(src)
  del sd["transformer_blocks.1.attn1.to_k.weight"]
  sd["proj_out.bias"] = np.zeros(17, np.float32)
  sd["ofs_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)
  save_file(sd, str(src / diffusers_folder.WEIGHTS_NAME))
  capsys.readouterr()
  assert cli.main(["import-diffusers", str(src), "--out", str(tmp_path / "ck"), *_IMPORT_OVERRIDES]) == 2
  err = capsys.readouterr().err
  assert "missing keys (1)" in err and "transformer_blocks.1.attn1.to_k.weight" in err
  assert "unexpected keys (1)" in err and "ofs_embedding.linear_1.weight" in err
  assert "proj_out.bias: got (17,), expected (96,)" in err
  assert not (tmp_path / "ck" / "checkpoints").exists() or not any(
    (tmp_path / "ck" / "checkpoints").iterdir()
  )

  conf = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**conf, "patch_size_t": 2, "ofs_embed_dim": 512}))
  assert cli.main(["import-diffusers", str(src), "--out", str(tmp_path / "ck2"), *_IMPORT_OVERRIDES]) == 2
  err = capsys.readouterr().err
  assert "patch_size_t=2" in err and "ofs_embed_dim=512" in err


def test_import_diffusers_cogvideox_without_config(tmp_path, capsys):
  """``layerflow import-diffusers <CogVideoX transformer, in_channels 16> --out CKPT`` with no --config: the
  CogVideoX VAE of the pipeline folder when it has one, else the latents-only codec, which refuses pixels."""
  from layerflow_jax import codec as codec_lib

  pipe = tmp_path / "CogVideoX-tiny"
  _diffusers_model(in_channels=16, out_channels=16).save_pretrained(pipe / "transformer")
  assert cli.main(["import-diffusers", str(pipe / "transformer"), "--out", str(tmp_path / "ck")]) == 0
  params, config = trainer.load_params(tmp_path / "ck")
  assert (config.autoencoder.kind, config.autoencoder.latent_channels) == ("latent", 16)
  assert (config.data.height, config.data.width) == (32, 48)  # the transformer's sample size × 8
  codec = codec_lib.make_codec(config.autoencoder)
  with pytest.raises(ValueError, match="no pixel encoder/decoder .*autoencoder.kind=cogvideox"):
    codec.encode(np.zeros((1, 16, 32, 48, 3), np.float32))
  (pipe / "vae").mkdir()
  (pipe / "vae" / "config.json").write_text(
    json.dumps({"_class_name": "AutoencoderKLCogVideoX", "latent_channels": 16})
  )
  with_vae = convert.import_config(
    diffusers_folder.read_config(pipe / "transformer"), default.get_config(), pipe / "transformer"
  )
  assert (with_vae.autoencoder.kind, with_vae.autoencoder.path) == ("cogvideox", str(pipe / "vae"))


@pytest.mark.parametrize("size", ["2b", "5b"])
def test_import_config_infers_2b_and_5b(size):
  """config.json of CogVideoX-2B (sin-cos) / 5B (RoPE) → our model; its shapes = diffusers' (meta device)."""
  conf = dict(diffusers_folder.DIFFUSERS_DEFAULTS)
  if size == "5b":
    conf.update(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
  fields = diffusers_folder.model_fields(conf)
  cfg = DiTConfig(**{k: v for k, v in fields.items()}, in_channels=16, out_channels=16, text_embed_dim=4096)
  assert (cfg.hidden, cfg.num_layers, cfg.pos_embed) == (
    (1920, 30, "sincos") if size == "2b" else (3072, 42, "rope")
  )
  with torch.device("meta"):
    model = CogVideoXTransformer3DModel(**{k: v for k, v in conf.items() if not k.startswith("_")})
  assert dw.expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
  # A base config with T5-width text takes these sizes as they are; the built-in pixel codec cannot have 16
  # channels, so the importer picks the latents-only codec (no pipeline folder with a vae/ here).
  base = default.get_config("size=tiny")
  base.text_encoder.dim = 4096
  latent = convert.import_config(conf, base)
  assert (latent.autoencoder.kind, latent.autoencoder.latent_channels) == ("latent", 16)
  assert (latent.data.height, latent.data.width) == (480, 720)
  base.autoencoder.spatial, base.autoencoder.temporal = 2, 2  # 24 channels
  imported = convert.import_config({**conf, "in_channels": 24, "out_channels": 24}, base)
  assert imported.model.size == size and imported.model.num_layers == cfg.num_layers
  assert imported.model.pos_embed == cfg.pos_embed and imported.text_encoder.dim == 4096


# ----------------------------------------------------------------------------- sampling parity


@pytest.mark.parametrize("pos_embed", ["sincos", pytest.param("rope", marks=pytest.mark.slow)])
def test_ddim_sampling_matches_diffusers_pipeline(tmp_path, pos_embed):
  """Our DDIM loop vs diffusers' CogVideoXPipeline + CogVideoXDDIMScheduler on the exported transformer."""
  exp = Experiment(_config(pos_embed, "text+video"))
  params = _perturbed_params(exp, seed=5)
  convert.export_params(params, exp.config, tmp_path)
  steps, guidance = exp.config.sampling.num_steps, exp.config.sampling.guidance_scale
  latents, _, text = _inputs(exp, seed=6)
  x_T = latents

  model, _ = _ours(exp, params, latents[:1], np.array([0]), text[:1])  # motion removed, content at 0.7
  scales = {k: jnp.full((2 * B,), v, jnp.float32) for k, v in exp.config.sampling.adapter_scales.items()}
  both = jnp.concatenate([jnp.asarray(text), jnp.zeros_like(jnp.asarray(text))])

  def velocity(x, t):
    v = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both, adapter_scales=scales)
    return v[:B], v[B:]

  ours = np.asarray(
    samplers.sample(
      velocity, jnp.asarray(x_T), sched=exp.schedule, num_steps=steps, sampler="ddim", guidance_scale=guidance
    )
  )

  wrapped = torch_extras.LayerFlowTransformer.from_export(tmp_path)
  scheduler = CogVideoXDDIMScheduler.from_pretrained(tmp_path / "scheduler")
  pipe = CogVideoXPipeline(
    tokenizer=None, text_encoder=None, vae=None, transformer=wrapped.transformer, scheduler=scheduler
  )
  pipe.set_progress_bar_config(disable=True)
  f, h, w = x_T.shape[1:4]
  with torch.no_grad():
    theirs = pipe(
      prompt_embeds=torch.from_numpy(text),
      negative_prompt_embeds=torch.zeros(text.shape),
      latents=torch.from_numpy(x_T.transpose(0, 1, 4, 2, 3).copy()),
      num_inference_steps=steps,
      guidance_scale=guidance,
      use_dynamic_cfg=False,
      height=8 * h,
      width=8 * w,
      num_frames=(f - 1) * 4 + 1,
      output_type="latent",
      return_dict=False,
    )[0]
  theirs = theirs.float().numpy().transpose(0, 1, 3, 4, 2)
  err = float(np.max(np.abs(ours - theirs)))
  print(
    f"\n[sampling] {pos_embed} DDIM {steps} steps, CFG {guidance}: max abs err {err:.3e}, "
    f"max rel err {_rel(ours, theirs):.3e} (max|latent| {np.max(np.abs(theirs)):.2f})"
  )
  assert ours.shape == theirs.shape
  assert err <= SAMPLE_TOL
