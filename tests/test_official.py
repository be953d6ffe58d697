"""``layerflow import-official``: the official LayerFlow SAT checkpoints, imported exactly.

Each of the five network layouts gets a tiny SAT-format checkpoint with random weights (non-zero LoRA B/D in a
trained block and one outside the trained blocks), written as a variant folder (``latest`` + ``1000/
mp_rank_00_model_states.pt``). The import goes through the CLI and ``trainer.load_params``; its forward is
compared with :func:`reference_forward`, a float64 PyTorch forward written from ``../shared/LAYERFLOW_OFFICIAL.md``
directly on the SAT state dict (condition splicing, sequence, table, layer embedding, expert adaLN, LoRA with the
per-sample motion switch, final norm eps 1e-6, unpatchify, output slicing) and sharing no code with the import.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from layerflow_jax import cli  # noqa: E402

pytestmark = pytest.mark.torch

REL_TOL = 1e-4
PREFIX = "model.diffusion_model."
D, HEADS, HEAD_DIM, TEMB, TEXT_DIM, C, P, MLP = 32, 2, 16, 16, 16, 4, 2, 128
LAYERS, RM, RC = 7, 8, 256
H, W = 4, 6  # latent size: a 2 × 3 token grid
TOKENS = (H // P) * (W // P)
LORA_BLOCKS = (2, 5)  # 5: a trained block of the releases; 2: outside them (must be kept)

# variant → (layer embedder, prompts, table frames, learnable table, task index, given frames spliced, RGB)
LAYOUTS = {
  "gen_rgba": (True, 3, 16, False, None, 0, False),
  "seg_rgba": (False, 2, 16, True, "seg", 4, False),
  "fg2bg_rgba": (True, 3, 17, False, 1, 9, False),
  "gen_rgb": (False, 3, 13, False, None, 0, True),
  "seg_rgb": (False, 2, 13, True, "seg", 2, True),
}


def _sincos_1d(dim, pos):
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _official_table(frames, text_rows):
  """§4: zero text rows, then [temporal D/4 | columns/1.875 3D/8 | rows/1.875 3D/8] per (frame, row, col)."""
  hp, wp = H // P, W // P
  t, r, c = np.meshgrid(np.arange(frames), np.arange(hp), np.arange(wp), indexing="ij")
  video = np.concatenate(
    [
      _sincos_1d(D // 4, t.reshape(-1)),
      _sincos_1d(3 * D // 8, c.reshape(-1) / 1.875),
      _sincos_1d(3 * D // 8, r.reshape(-1) / 1.875),
    ],
    axis=1,
  )
  return np.concatenate([np.zeros((text_rows, D)), video], axis=0)


def make_sat_state_dict(variant: str, seed: int = 0, dtype=torch.float32) -> dict:
  """A SAT ``["module"]`` dict of the variant's layout (§1), random weights, plus T5/VAE keys to be ignored."""
  embed, prompts, frames, learned, *_ = LAYOUTS[variant]
  g = torch.Generator().manual_seed(seed)
  rnd = lambda *shape, std=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * std
  lin = lambda o, i, std=None: (rnd(o, i, std=std if std is not None else 1 / math.sqrt(i)), rnd(o, std=0.1))
  ln = lambda n: (1 + rnd(n, std=0.1), rnd(n, std=0.1))
  sd = {}

  def put(name, pair):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = pair

  put("time_embed.0", lin(TEMB, D))
  put("time_embed.2", lin(TEMB, TEMB))
  sd["mixins.patch_embed.proj.weight"] = rnd(D, C, P, P, std=1 / math.sqrt(C * P * P))
  sd["mixins.patch_embed.proj.bias"] = rnd(D, std=0.1)
  put("mixins.patch_embed.text_proj", lin(D, TEXT_DIM))
  rows = prompts * 226 + frames * TOKENS
  table = rnd(rows, D) if learned else torch.from_numpy(_official_table(frames, prompts * 226))
  sd["mixins.pos_embed.pos_embedding"] = table[None]
  if embed:
    put("mixins.pos_embed.txt_embedder.0", (rnd(D, 1), rnd(D, std=0.1)))
    put("mixins.pos_embed.txt_embedder.1", ln(D))
  for n in range(LAYERS):
    a, tl = "mixins.adaln_layer.", f"transformer.layers.{n}."
    put(f"{a}adaLN_modulations.{n}.1", lin(12 * D, TEMB, std=0.3 / math.sqrt(TEMB)))
    put(f"{a}query_layernorm_list.{n}", ln(HEAD_DIM))
    put(f"{a}key_layernorm_list.{n}", ln(HEAD_DIM))
    put(f"{tl}input_layernorm", ln(D))
    put(f"{tl}post_attention_layernorm", ln(D))
    put(f"{tl}attention.query_key_value.original", lin(3 * D, D))
    put(f"{tl}attention.dense.original", lin(D, D))
    put(f"{tl}mlp.dense_h_to_4h", lin(MLP, D))
    put(f"{tl}mlp.dense_4h_to_h", lin(D, MLP))
    trained = n in LORA_BLOCKS
    for proj, parts in (("query_key_value", 3), ("dense", 1)):
      for i in range(parts):
        base = f"{tl}attention.{proj}."
        sd[f"{base}matrix_A.{i}"] = rnd(RM, D, std=1 / math.sqrt(D))
        sd[f"{base}matrix_B.{i}"] = rnd(D, RM) if trained else torch.zeros(D, RM, dtype=torch.float64)
        sd[f"{base}matrix_C.{i}"] = rnd(RC, D, std=1 / math.sqrt(D))
        sd[f"{base}matrix_D.{i}"] = rnd(D, RC) if trained else torch.zeros(D, RC, dtype=torch.float64)
  put("transformer.final_layernorm", ln(D))
  put("mixins.final_layer.norm_final", ln(D))
  put("mixins.final_layer.linear", lin(P * P * C, D))
  put("mixins.final_layer.adaLN_modulation.1", lin(2 * D, TEMB, std=0.3 / math.sqrt(TEMB)))
  module = {PREFIX + k: v.to(dtype) for k, v in sd.items()}
  module["conditioner.embedders.0.transformer.shared.weight"] = torch.zeros(3, 2)  # T5: ignored
  module["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3)  # VAE: ignored
  return module


def write_variant_folder(root, variant: str, module: dict):
  folder = root / variant
  (folder / "1000").mkdir(parents=True)
  (folder / "latest").write_text("1000")
  torch.save({"module": module, "iteration": 1000}, folder / "1000" / "mp_rank_00_model_states.pt")
  return folder


# ----------------------------------------------------------------------------- the reference (fact sheet §2-3)


def _ln(x, w, b, eps):
  return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def reference_forward(sd: dict, variant: str, x, cond, timesteps, context, scale):
  """Official forward in float64: x [B, T, C, H, W] (the generated frames), cond the given clips (or None),
  timesteps [B] ints, context [B, P·226, text_dim], motion LoRA switch ``scale`` [B]. Returns the generated frames."""
  sd = {k[len(PREFIX) :]: v.to(torch.float64) for k, v in sd.items() if k.startswith(PREFIX)}
  embed, prompts, frames, learned, task, given, rgb = LAYOUTS[variant]
  k = 4 if rgb else 9
  if task == 1:
    x = torch.cat([cond, x], 1)
  elif task == 2:
    x = torch.cat([x[:, :k], cond, x[:, k:]], 1)
  elif task == "seg":
    x = torch.cat([x, cond], 1)
  b, t = x.shape[:2]
  half = D // 2
  f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
  arg = timesteps.to(torch.float64)[:, None] * f[None]
  tproj = torch.cat([torch.cos(arg), torch.sin(arg)], -1)
  lin = lambda v, name: v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
  emb = lin(torch.nn.functional.silu(lin(tproj, "time_embed.0")), "time_embed.2")
  vid = torch.nn.functional.conv2d(
    x.reshape(b * t, C, H, W),
    sd["mixins.patch_embed.proj.weight"],
    sd["mixins.patch_embed.proj.bias"],
    stride=P,
  )
  vid = vid.reshape(b, t, D, -1).permute(0, 1, 3, 2).reshape(b, -1, D)  # tokens (frame, row, col)
  txt = lin(context, "mixins.patch_embed.text_proj")
  n_text, n_vid = txt.shape[1], vid.shape[1]
  seq = torch.cat([txt, vid], 1) + sd["mixins.pos_embed.pos_embedding"][:, : n_text + n_vid]
  if embed:
    idx = torch.arange(n_text // 226, dtype=torch.float64)[:, None]
    layer = _ln(
      idx @ sd["mixins.pos_embed.txt_embedder.0.weight"].T + sd["mixins.pos_embed.txt_embedder.0.bias"],
      sd["mixins.pos_embed.txt_embedder.1.weight"],
      sd["mixins.pos_embed.txt_embedder.1.bias"],
      1e-5,
    )
    seq = seq + torch.cat([layer.repeat_interleave(226, 0), torch.zeros(n_vid, D, dtype=torch.float64)])[None]
  s = scale.to(torch.float64)[:, None, None]

  def lora(v, name, parts):
    out = lin(v, f"{name}.original")
    mo = torch.cat(
      [v @ sd[f"{name}.matrix_A.{i}"].T @ sd[f"{name}.matrix_B.{i}"].T for i in range(parts)], -1
    )
    co = torch.cat(
      [v @ sd[f"{name}.matrix_C.{i}"].T @ sd[f"{name}.matrix_D.{i}"].T for i in range(parts)], -1
    )
    return out + s * mo / RM + co / RC

  def heads(v):
    return v.reshape(b, -1, HEADS, HEAD_DIM).transpose(1, 2)

  for n in range(LAYERS):
    tl, a = f"transformer.layers.{n}.", "mixins.adaln_layer."
    ch = lin(torch.nn.functional.silu(emb), f"{a}adaLN_modulations.{n}.1").chunk(12, -1)
    ch = [c[:, None] for c in ch]
    (sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp, tsh_msa, tsc_msa, tg_msa, tsh_mlp, tsc_mlp, tg_mlp) = ch

    def modulate(v, name, shift, sc, tshift, tsc):
      h = _ln(v, sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)
      return torch.cat([h[:, :n_text] * (1 + tsc) + tshift, h[:, n_text:] * (1 + sc) + shift], 1)

    h = modulate(seq, f"{tl}input_layernorm", sh_msa, sc_msa, tsh_msa, tsc_msa)
    q, kk, v = lora(h, f"{tl}attention.query_key_value", 3).chunk(3, -1)
    q = _ln(
      heads(q), sd[f"{a}query_layernorm_list.{n}.weight"], sd[f"{a}query_layernorm_list.{n}.bias"], 1e-6
    )
    kk = _ln(heads(kk), sd[f"{a}key_layernorm_list.{n}.weight"], sd[f"{a}key_layernorm_list.{n}.bias"], 1e-6)
    att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1) @ heads(v)
    att = lora(att.transpose(1, 2).reshape(b, -1, D), f"{tl}attention.dense", 1)
    seq = seq + torch.cat([tg_msa * att[:, :n_text], g_msa * att[:, n_text:]], 1)
    h = modulate(seq, f"{tl}post_attention_layernorm", sh_mlp, sc_mlp, tsh_mlp, tsc_mlp)
    ff = lin(
      torch.nn.functional.gelu(lin(h, f"{tl}mlp.dense_h_to_4h"), approximate="tanh"), f"{tl}mlp.dense_4h_to_h"
    )
    seq = seq + torch.cat([tg_mlp * ff[:, :n_text], g_mlp * ff[:, n_text:]], 1)
  seq = _ln(seq, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"], 1e-5)
  vid = seq[:, n_text:]
  shift, sc = lin(torch.nn.functional.silu(emb), "mixins.final_layer.adaLN_modulation.1").chunk(2, -1)
  vid = _ln(vid, sd["mixins.final_layer.norm_final.weight"], sd["mixins.final_layer.norm_final.bias"], 1e-6)
  vid = lin(vid * (1 + sc[:, None]) + shift[:, None], "mixins.final_layer.linear")
  out = vid.reshape(b, t, H // P, W // P, C, P, P).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, t, C, H, W)
  if task == 1:
    return out[:, k:]
  if task == 2:
    return torch.cat([out[:, :k], out[:, k + 4 :]], 1)
  if task == "seg":
    return out[:, :-given]
  return out


# ----------------------------------------------------------------------------- the tests


def _import(tmp_path, variant, module, *extra):
  folder = write_variant_folder(tmp_path / "src", variant, module)
  out = tmp_path / f"ckpt_{variant}"
  rc = cli.main(["import-official", str(folder), "--out", str(out), *extra])
  assert rc == 0
  return out


def _packed_inputs(variant, seed=1):
  """(x generated, cond given) in SAT layout [B, T, C, H, W], the packed sequence, timesteps, context."""
  embed, prompts, frames, learned, task, given, rgb = LAYOUTS[variant]
  total = frames - 1 if rgb else frames  # RGB: the table has 13 frames, the network takes 12
  g = torch.Generator().manual_seed(seed)
  full = torch.randn(2, total, C, H, W, generator=g, dtype=torch.float64)
  k = 4 if rgb else 9
  if task == 1:
    cond, x = full[:, :given], full[:, given:]
  elif task == 2:
    cond, x = full[:, k : k + 4], torch.cat([full[:, :k], full[:, k + 4 :]], 1)
  elif task == "seg":
    cond, x = full[:, total - given :], full[:, : total - given]
  else:
    cond, x = None, full
  context = torch.randn(2, prompts * 226, TEXT_DIM, generator=g, dtype=torch.float64)
  return x, cond, full, torch.tensor([999, 412]), context


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
def test_import_matches_the_official_forward(tmp_path, capsys, variant):
  import jax
  import jax.numpy as jnp

  from layerflow_jax.train import trainer
  from layerflow_jax.train.experiment import Experiment

  module = make_sat_state_dict(variant)
  out = _import(tmp_path, variant, module)
  err = capsys.readouterr().err
  assert (
    f"variant {variant}" in err and "txt_embedder" in err and "pos_embedding" in err
  )  # which keys decided
  params, config = trainer.load_params(out)
  exp = Experiment(config)
  assert config.model.adapters.motion.blocks == [2, 5] and config.model.adapters.content.blocks == [2, 5]
  fn = jax.jit(lambda p, x, t, c, s: exp.model(p)(x, t, c, adapter_scales={"motion": s}))
  x, cond, full, t, context = _packed_inputs(variant)
  embed, prompts, frames, learned, task, given, rgb = LAYOUTS[variant]
  task_name = {None: "generate", 1: "fg2bg", 2: "bg2fg", "seg": "decompose"}[task]
  keep = ~np.asarray(exp.given_frame_table[list(exp.task_probs > 0).index(True)])
  assert config.diffusion.task_weights[task_name] == 1.0
  assert keep.shape[0] == full.shape[1]
  errors = {}
  outputs = {}
  for label, s in (("1", [1.0, 1.0]), ("0", [0.0, 0.0]), ("[1,0]", [1.0, 0.0])):
    ref = reference_forward(module, variant, x, cond, t, context, torch.tensor(s)).numpy()
    ours = fn(
      params,
      jnp.asarray(full.permute(0, 1, 3, 4, 2).numpy(), jnp.float32),
      jnp.asarray(t.numpy()),
      jnp.asarray(context.numpy(), jnp.float32),
      jnp.asarray(s, jnp.float32),
    )
    ours = np.asarray(ours).transpose(0, 1, 4, 2, 3)[:, keep]
    errors[label] = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    outputs[label] = ref
  print(
    f"\n[official] {variant}: max rel err " + ", ".join(f"motion {k}: {v:.2e}" for k, v in errors.items())
  )
  assert max(errors.values()) <= REL_TOL, errors
  # The switch matters (the test would not see a wrong LoRA otherwise): sample 0 of [1, 0] is scale 1's.
  assert np.max(np.abs(outputs["1"] - outputs["0"])) > 1e-2 * np.max(np.abs(outputs["1"]))
  np.testing.assert_array_equal(outputs["[1,0]"][0], outputs["1"][0])


def test_bf16_tensors_are_kept_as_stored(tmp_path):
  from layerflow_jax.train import trainer

  module = make_sat_state_dict("gen_rgba", dtype=torch.bfloat16)
  out = _import(tmp_path, "gen_rgba", module)
  params, config = trainer.load_params(out)
  assert config.model.param_dtype == "bfloat16"
  qkv = module[PREFIX + "transformer.layers.3.attention.query_key_value.original.weight"].float().numpy()
  kernel = np.asarray(params["blocks.attn1.to_k.kernel"][3])
  assert str(kernel.dtype) == "bfloat16"
  np.testing.assert_array_equal(kernel.astype(np.float32), qkv[D : 2 * D].T)
  table = np.asarray(params["pos_table"])
  assert str(table.dtype) == "bfloat16"
  np.testing.assert_array_equal(
    table.astype(np.float32), module[PREFIX + "mixins.pos_embed.pos_embedding"][0].float().numpy()
  )
  # Fine-tuning: configs/official.py is the checkpoint's config with train.init_from set; its state takes them.
  from configs import official
  from layerflow_jax.train.experiment import Experiment

  ft = official.get_config(f"checkpoint={out}")
  assert ft.train.init_from == str(out) and ft.model.to_dict() == config.model.to_dict()
  state = Experiment(ft).init_state(params=params)
  assert "adapters.content.q_b" in state.trainable and "blocks.attn1.to_q.kernel" in state.frozen


def _bad(tmp_path, capsys, src, *extra):
  out = tmp_path / "bad_out"
  rc = cli.main(["import-official", str(src), "--out", str(out), *extra])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and not out.exists(), (rc, err)
  assert len(err.splitlines()) == 1, err
  return err


def test_without_torch_one_line(tmp_path, capsys, monkeypatch):
  import sys

  folder = write_variant_folder(tmp_path, "gen_rgb", {PREFIX + "time_embed.0.bias": torch.zeros(2)})
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  assert "needs PyTorch: pip install 'layerflow-jax[torch]'" in _bad(tmp_path, capsys, folder)


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, capsys):
  module = make_sat_state_dict("seg_rgb")
  folder = write_variant_folder(tmp_path, "seg_rgb", module)
  pt = folder / "1000" / "mp_rank_00_model_states.pt"
  (folder / "latest").unlink()
  assert "latest: missing" in _bad(tmp_path, capsys, folder)
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
  assert "truncated.pt: not a readable PyTorch checkpoint" in _bad(tmp_path, capsys, truncated)
  wrong = tmp_path / "wrong.pt"
  wrong.write_text("not a checkpoint")
  assert "wrong.pt: not a readable" in _bad(tmp_path, capsys, wrong)

  def variant_file(name, change):
    sd = dict(module)
    change(sd)
    path = tmp_path / f"{name}.pt"
    torch.save({"module": sd}, path)
    return path

  key = PREFIX + "transformer.layers.4.mlp.dense_4h_to_h.weight"
  err = _bad(tmp_path, capsys, variant_file("missing", lambda sd: sd.pop(key)))
  assert key in err and f"expected shape [{D}, {MLP}]" in err
  err = _bad(tmp_path, capsys, variant_file("shape", lambda sd: sd.__setitem__(key, torch.zeros(D, MLP + 1))))
  assert key in err and f"[{D}, {MLP + 1}], expected [{D}, {MLP}]" in err
  extra = PREFIX + "transformer.layers.4.mlp.extra.weight"
  err = _bad(tmp_path, capsys, variant_file("unknown", lambda sd: sd.__setitem__(extra, torch.zeros(2))))
  assert extra in err and "unknown key" in err
  table = PREFIX + "mixins.pos_embed.pos_embedding"
  err = _bad(
    tmp_path, capsys, variant_file("table", lambda sd: sd.__setitem__(table, torch.zeros(1, 451, D)))
  )
  assert table in err and "fits no official layout" in err
  err = _bad(tmp_path, capsys, pt, "--variant", "gen_rgba")
  assert table in err and "[1, 678 + 16·tokens" in err


def test_export_to_diffusers_reproduces_the_official_forward(tmp_path):
  """import → export → diffusers CogVideoXTransformer3DModel + PEFT content LoRA + the extras' hook = the
  official forward (motion LoRA off, as sampling runs it; and every adapter on = motion scale 1)."""
  from layerflow_jax.export import torch_extras

  variant = "fg2bg_rgba"  # layer embedding, 17 frames, a table
  module = make_sat_state_dict(variant, seed=3)
  out = _import(tmp_path, variant, module)
  export = tmp_path / "export"
  assert cli.main(["export", "--checkpoint", str(out), "--out", str(export)]) == 0
  x, cond, full, t, context = _packed_inputs(variant, seed=5)
  keep = np.ones(full.shape[1], bool)
  keep[:9] = False  # fg2bg gives the first 9 latent frames
  errors = {}
  for adapters, scale in (("inference", 0.0), ("all", 1.0)):
    model = torch_extras.LayerFlowTransformer.from_export(export, adapters=adapters)
    assert model.info["given_latent_frames"]["fg2bg"] == list(range(9))
    with torch.no_grad():
      got = model(full.float(), context.float(), t).double().numpy()[:, keep]
    ref = reference_forward(module, variant, x, cond, t, context, torch.tensor([scale, scale])).numpy()
    errors[adapters] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  print(
    f"\n[official export] {variant}: max rel err " + ", ".join(f"{k}: {v:.2e}" for k, v in errors.items())
  )
  assert max(errors.values()) <= REL_TOL, errors


# ----------------------------------------------------------------------------- the official sampler (§4)


def _sat_sampler_reference(velocity, x, noises, given_mask, given, num_steps=50, scale=6.0):
  """VPSDEDPMPP2MSampler + DynamicCFG + VideoScaling denoiser of the SAT code, written from §4 (float64 NumPy)."""
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
  ac = np.cumprod(1 - betas)
  ac = ac / (3 - 2 * ac)  # SNR shift 3
  s_full = np.sqrt(ac)
  s_full = (s_full - s_full[-1]) * s_full[0] / (s_full[0] - s_full[-1])  # denoiser table, zero SNR at 999
  steps = np.linspace(999, 0, num_steps, endpoint=False).astype(int)[::-1]  # 19 … 999
  s = np.sqrt(ac[steps])
  s = (s - s[-1]) * s[0] / (s[0] - s[-1])  # the sub-sampled rescale: anchor at t = 19
  s = np.concatenate([s[::-1], [1.0]])
  timesteps = steps[::-1]
  lam = lambda v: np.log(v / np.sqrt(1 - v**2))
  old = None
  for i in range(num_steps):
    x = np.where(given_mask, given, x)
    q = int(np.abs(s[i] - s_full).argmin())
    v_c, v_u = velocity(x, timesteps[i])  # the network gets the step; x0 the snapped sqrt(alpha)
    d_c, d_u = (
      s_full[q] * x - np.sqrt(1 - s_full[q] ** 2) * v_c,
      s_full[q] * x - np.sqrt(1 - s_full[q] ** 2) * v_u,
    )
    g = 1 + scale * (1 - math.cos(math.pi * ((num_steps - timesteps[i]) / num_steps) ** 5)) / 2
    den = d_u + g * (d_c - d_u)
    if num_steps - i == 1:
      x = den
      break
    with np.errstate(divide="ignore"):
      h = lam(s[i + 1]) - lam(s[i])
      mult1 = np.sqrt((1 - s[i + 1] ** 2) / (1 - s[i] ** 2)) * np.exp(-h)
      mult2 = np.expm1(-2 * h) * s[i + 1]
      noise = np.sqrt(1 - s[i + 1] ** 2) * np.sqrt(1 - np.exp(-2 * h)) * noises[i]
      if old is None:
        x_new = mult1 * x - mult2 * den + noise
      else:
        r = (lam(s[i]) - lam(s[i - 1])) / h
        x_new = mult1 * x - mult2 * ((1 + 1 / (2 * r)) * den - 1 / (2 * r) * old) + noise
    old, x = den, x_new
  return np.where(given_mask, given, x)


def test_sat_sampler_matches_the_official_loop():
  import jax
  import jax.numpy as jnp

  from layerflow_jax.diffusion import samplers, schedule

  sched = schedule.make_schedule({})
  coefs = samplers.sat_dpmpp_2m_coefficients(sched, 50)
  np.testing.assert_array_equal(coefs["t"], np.arange(999, 0, -20))
  # The denoiser's snap of the sub-sampled sqrt(alpha) to the full table: the same step, except the last 8 (t - 1).
  np.testing.assert_array_equal(coefs["t"] - coefs["t_x0"], [0] * 42 + [1] * 8)
  g = samplers.dynamic_guidance(6.0, coefs["t"], 50)
  np.testing.assert_allclose(g[:4], [2.29, 2.54, 6.97, 6.42], atol=5e-3)
  np.testing.assert_allclose(g[-1], 1.12, atol=5e-3)

  shape = (1, 5, 2, 2, 3)
  rng = jax.random.key(7)
  x_T = np.asarray(jax.random.normal(jax.random.key(3), shape), np.float64)
  noises = [np.asarray(samplers.step_noise(rng, jnp.int32(i), shape), np.float64) for i in range(50)]
  given_mask = np.zeros((1, 5, 1, 1, 1), bool)
  given_mask[:, 3:] = True
  given = np.asarray(jax.random.normal(jax.random.key(4), shape), np.float64)
  w = np.linspace(-1, 1, 3)

  def vel_np(x, t):
    return np.tanh(x) * w + 1e-3 * t * x, 0.5 * np.tanh(x)

  def vel_jax(x, t):
    return jnp.tanh(x) * w + 1e-3 * t[0] * x, 0.5 * jnp.tanh(x)

  ref = _sat_sampler_reference(vel_np, x_T, noises, given_mask, given)
  ours = samplers.sample(
    vel_jax,
    jnp.asarray(x_T, jnp.float32),
    sched=sched,
    num_steps=50,
    sampler="sat_dpmpp_2m",
    guidance_scale=6.0,
    dynamic_cfg=True,
    dynamic_cfg_steps=50,
    given_latents=jnp.asarray(given, jnp.float32),
    given_frames=jnp.asarray(given_mask[:, :, 0, 0, 0]),
    rng=rng,
  )
  err = float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))
  print(f"\n[official sampler] 50 steps: max rel err {err:.2e}")
  assert err <= REL_TOL


@pytest.mark.slow  # a VAE over 48-64 frames on CPU: about 1.5 min each
def _import_with_pipeline(tmp_path, variant, module=None):
  """``import-official --pipeline`` with a tiny random CogVideoX VAE, so the checkpoint can do pixel work."""
  from diffusers import AutoencoderKLCogVideoX

  torch.manual_seed(0)
  AutoencoderKLCogVideoX(
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    latent_channels=C,
    norm_num_groups=4,
    sample_height=32,
    sample_width=48,
  ).eval().save_pretrained(tmp_path / "pipe" / "vae")
  module = make_sat_state_dict(variant) if module is None else module
  folder = write_variant_folder(tmp_path / "src", variant, module)
  ck = tmp_path / "ck"
  assert (
    cli.main(["import-official", str(folder), "--out", str(ck), "--pipeline", str(tmp_path / "pipe")]) == 0
  )
  return ck


def test_fine_tune_an_imported_checkpoint(tmp_path):
  """``layerflow train --config configs/official.py:checkpoint=CKPT``: real train steps from the imported weights
  (pixels encoded by the pipeline's VAE). The content LoRA trains; the frozen base and the motion LoRA stay the
  imported ones, bit for bit."""
  from data_pipelines import registry
  from layerflow_jax.config import load_config
  from layerflow_jax.train import trainer

  ck = _import_with_pipeline(tmp_path, "gen_rgba")
  imported, _ = trainer.load_params(ck)
  spec = f"configs/official.py:checkpoint={ck}"
  overrides = [
    f"data.data_dir='{tmp_path / 'tfds'}'",
    "data.num_train=8",
    "data.num_validation=2",
    "data.batch_size=8",  # one clip per (fake) device
    "train.steps=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "eval.num_batches=0",
  ]
  registry.build(load_config(spec, overrides).data)
  work = tmp_path / "ft"
  argv = ["train", "--config", spec, "--workdir", str(work), "--no-progress"]
  assert cli.main(argv + [f"--config.{o}" for o in overrides]) == 0
  tuned, config = trainer.load_params(work)
  assert config.train.init_from == str(ck)
  assert set(tuned) == set(imported)
  changed = {k for k in tuned if not np.array_equal(np.asarray(tuned[k]), np.asarray(imported[k]))}
  assert changed and all(k.startswith("adapters.content.") for k in changed), sorted(changed)
  for k in imported:
    if k.startswith("adapters.content."):
      continue
    assert np.isfinite(np.asarray(tuned[k], np.float32)).all()


@pytest.mark.parametrize("variant", ["seg_rgb", "fg2bg_rgba"])
def test_sample_cli_runs_the_variant_task(tmp_path, variant):
  """``layerflow sample --checkpoint CKPT --task <its task>`` with the variant's own inputs (a tiny random
  CogVideoX VAE from ``--pipeline``): RGB writes fg, bg, blend and no alpha; two prompts for decomposition."""
  from PIL import Image

  ck = _import_with_pipeline(tmp_path, variant)
  video = tmp_path / "clip"
  video.mkdir()
  rng = np.random.default_rng(0)
  for i in range(16):
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(video / f"{i:04d}.png")
  inputs = (
    ["--task", "decompose", "--video", str(video)]
    if variant == "seg_rgb"
    else ["--task", "fg2bg", "--fg-video", str(video), "--alpha-video", str(video), "--blend-prompt", "c"]
  )
  out = tmp_path / "samples"
  assert (
    cli.main(
      [
        "sample",
        "--checkpoint",
        str(ck),
        *inputs,
        "--fg-prompt",
        "a",
        "--bg-prompt",
        "b",
        "--steps",
        "2",
        "--out",
        str(out),
        "--config.autoencoder.tiling=False",
      ]
    )
    == 0
  )
  names = {p.name.split(".")[0] for p in out.iterdir()}
  assert {"fg", "bg", "blend"} <= names
  assert ("alpha" in names) == (variant == "fg2bg_rgba")


def test_vae_packed_pass_matches_diffusers_without_frame_batching(tmp_path):
  """``autoencoder.packed_pass``: the whole stack in one pass = diffusers' encoder with its frame batch set to the
  frame count (no 8-frame batching, causal context and GroupNorm statistics across clips), the posterior mode;
  ``sample_posterior`` draws mean + std · N(0, 1) instead."""
  import jax
  import jax.numpy as jnp
  from diffusers import AutoencoderKLCogVideoX

  from layerflow_jax.encoders import vae

  torch.manual_seed(0)
  theirs = AutoencoderKLCogVideoX(
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    latent_channels=C,
    norm_num_groups=4,
    sample_height=16,
    sample_width=16,
    scaling_factor=0.7,
  ).eval()
  theirs.save_pretrained(tmp_path / "vae")
  codec = vae.CogVideoXCodec.from_pretrained(str(tmp_path / "vae"), tiling=False)
  video = np.random.default_rng(0).uniform(-1, 1, (1, 17, 16, 16, 3)).astype(np.float32)  # [dup, 4 clips × 4]
  theirs.num_sample_frames_batch_size = 17
  with torch.no_grad():
    ref = theirs.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist
    mode = (ref.mode() * 0.7).permute(0, 2, 3, 4, 1).numpy()
    std = (ref.std * 0.7).permute(0, 2, 3, 4, 1).numpy()
  ours = np.asarray(codec.encode_packed(jnp.asarray(video)))
  assert ours.shape == (1, 5, 2, 2, C)
  err = float(np.max(np.abs(ours - mode)) / np.max(np.abs(mode)))
  print(f"\n[official vae] one pass over 17 frames: max rel err {err:.2e}")
  assert err <= REL_TOL
  batched = np.asarray(codec.encode(jnp.asarray(video)))  # diffusers' 8-frame batching: different latents
  assert np.max(np.abs(batched - mode)) > 1e-3 * np.max(np.abs(mode))
  key = jax.random.key(2)
  drawn = np.asarray(codec.encode_packed(jnp.asarray(video), key))
  noise = np.asarray(jax.random.normal(key, ours.shape, jnp.float32))
  np.testing.assert_allclose(drawn, ours + std * noise, rtol=1e-4, atol=1e-5 * np.max(np.abs(mode)))


def test_each_variant_gives_the_fact_sheet_frames():
  """§4: which packed latent frames each of the eight variants keeps clean (the rest is generated)."""
  from layerflow_jax import layers
  from layerflow_jax.export import official

  expected = {
    "gen_rgba": [],
    "seg_rgba": list(range(12, 16)),
    "fg2bg_rgba": list(range(9)),
    "bg2fg_rgba": list(range(9, 13)),
    "gen_rgb": [],
    "seg_rgb": [10, 11],
    "fg2bg_rgb": list(range(4)),
    "bg2fg_rgb": list(range(4, 8)),
  }
  assert set(official.VARIANTS) == set(expected)
  for name, v in official.VARIANTS.items():
    mask = layers.given_frame_mask(
      v.task, layers.get_layout(v.layout), 4, v.lead_frames, list(v.given_latent_frames) or None
    )
    assert mask.shape[0] == v.lead_frames + 4 * layers.get_layout(v.layout).num_clips
    assert np.flatnonzero(mask).tolist() == expected[name], name
