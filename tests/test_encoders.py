"""Parity of our T5-v1.1 encoder and CogVideoX VAE with transformers / diffusers (PyTorch, CPU, float32).

Tiny random PyTorch models are saved in the diffusers pipeline layout (``text_encoder/``, ``tokenizer/``,
``vae/``) and loaded back through our safetensors importer and the config (``encoders=cogvideox``), so every test
also exercises the import path. The SentencePiece model is trained on the fly (no downloads).

Error measure: **max relative error = max|ours − theirs| / max|theirs|**, required ≤ 1e-4 in float32.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers import AutoencoderKLCogVideoX  # noqa: E402
from transformers import T5Config as HFT5Config  # noqa: E402
from transformers import T5EncoderModel, T5Tokenizer  # noqa: E402

from layerflow_jax import codec as codec_lib  # noqa: E402
from layerflow_jax import text as text_lib  # noqa: E402
from layerflow_jax.config import load_config  # noqa: E402
from layerflow_jax.encoders import (
  t5,  # noqa: E402
  vae,  # noqa: E402
)

REL_TOL = 1e-4
TEXT_LEN = 16
CORPUS = [
  "0, a red circle moving left",
  "1, blue stripes scrolling up",
  "2, a red circle over blue stripes",
  "a green square bouncing on the floor",
  "the ocean at night with waves",
  "a dog running in a park",
]
PROMPTS = [
  "0, a red circle moving left",
  "",
  "a cat  with   odd spaces",
  "2, a dog running in a park over blue stripes scrolling up at night",
  "Zebra! ünïcode",
]


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _perturb_norms(module, scale: float = 0.2):
  """Random affine parameters in every norm (PyTorch initialises them to 1 / 0, which would hide a bad import)."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "norm" in name:
        p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """A tiny CogVideoX-layout directory: ``text_encoder/`` (T5), ``tokenizer/spiece.model``, ``vae/``."""
  root = tmp_path_factory.mktemp("cogvideox_tiny")
  (root / "tokenizer").mkdir()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS * 10),
    model_prefix=str(root / "tokenizer" / "spiece"),
    vocab_size=60,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    character_coverage=1.0,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  torch.manual_seed(0)
  text = T5EncoderModel(
    HFT5Config(
      vocab_size=200,
      d_model=32,
      d_kv=8,
      d_ff=48,
      num_layers=2,
      num_heads=4,
      feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8,
      relative_attention_max_distance=20,
      dropout_rate=0.0,
    )
  ).eval()
  _perturb_norms(text)
  text.save_pretrained(root / "text_encoder")
  video = AutoencoderKLCogVideoX(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    down_block_types=("CogVideoXDownBlock3D",) * 3,
    up_block_types=("CogVideoXUpBlock3D",) * 3,
    sample_height=32,
    sample_width=32,
    scaling_factor=0.7,
  ).eval()
  _perturb_norms(video)
  video.save_pretrained(root / "vae")
  return root


@pytest.fixture(scope="module")
def torch_t5(pipeline_dir):
  return T5EncoderModel.from_pretrained(pipeline_dir / "text_encoder").eval()


@pytest.fixture(scope="module")
def torch_vae(pipeline_dir):
  return AutoencoderKLCogVideoX.from_pretrained(pipeline_dir / "vae").eval()


def _config(pipeline_dir, *extra):
  return load_config(
    f"configs/default.py:encoders=cogvideox,pretrained={pipeline_dir}",
    [
      f"text_encoder.max_length={TEXT_LEN}",
      "text_encoder.dim=32",
      "text_encoder.dtype='float32'",
      "autoencoder.dtype='float32'",
      *extra,
    ],
  )


# ----------------------------------------------------------------------------- T5


def test_relative_position_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention

  rel = np.arange(-400, 400)
  for bidirectional, buckets, distance in ((True, 32, 128), (True, 8, 20), (False, 32, 128)):
    theirs = T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional, buckets, distance
    ).numpy()
    ours = t5.relative_position_bucket(
      rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    )
    np.testing.assert_array_equal(ours, theirs)


def test_tokenizer_matches_transformers_and_pickles(pipeline_dir):
  enc = text_lib.make_text_encoder(_config(pipeline_dir).text_encoder)
  ours = enc.tokenize(PROMPTS)
  hf = T5Tokenizer.from_pretrained(pipeline_dir / "tokenizer")
  theirs = hf(
    PROMPTS,
    padding="max_length",
    max_length=TEXT_LEN,
    truncation=True,
    add_special_tokens=True,
    return_tensors="np",
  ).input_ids
  np.testing.assert_array_equal(ours, theirs)
  assert ours[3, -1] == 1  # truncated: eos last
  assert ours[1, 0] == 1 and (ours[1, 1:] == 0).all()  # empty: eos, then padding
  clone = pickle.loads(pickle.dumps(enc))  # Grain worker processes receive the tokenizer by pickle
  np.testing.assert_array_equal(clone.tokenize(PROMPTS), ours)
  with pytest.raises(TypeError, match="sequence of prompts"):
    enc.tokenize("one string")


def test_t5_hidden_states_match_transformers(pipeline_dir, torch_t5):
  cfg = _config(pipeline_dir)
  enc = text_lib.make_text_encoder(cfg.text_encoder)
  assert isinstance(enc, text_lib.TextEncoder) and enc.dim == 32 and enc.max_length == TEXT_LEN
  ids = enc.tokenize(PROMPTS)
  with torch.no_grad():
    theirs = torch_t5(torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
    theirs_masked = torch_t5(
      torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(ids != 0, dtype=torch.long)
    ).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(enc.encode)(ids[None]))[0]  # [1, P, L] → [1, P, L, D], as Experiment encodes
    cfg.text_encoder.attention_mask = True
    masked = np.asarray(text_lib.make_text_encoder(cfg.text_encoder).encode(ids))
  err, err_masked = rel_err(ours, theirs), rel_err(masked, theirs_masked)
  print(f"T5 hidden states: max rel err {err:.2e} (no mask, as CogVideoX), {err_masked:.2e} (attention mask)")
  assert err <= REL_TOL and err_masked <= REL_TOL
  assert rel_err(masked, theirs) > 1e-2  # the mask really changes the result (padding is attended without it)


def test_t5_import_reports_mismatches(pipeline_dir, torch_t5):
  sd = dict(torch_t5.state_dict())
  sd.pop("encoder.final_layer_norm.weight")
  sd["encoder.block.0.layer.9.extra.weight"] = torch.zeros(3)
  cfg = t5.T5Config.from_dict(torch_t5.config.to_dict())
  with pytest.raises(
    ValueError, match=r"missing \(1\).*final_layer_norm.scale.*unexpected \(1\).*layer.9.extra"
  ):
    t5.from_state_dict(cfg, sd)
  with pytest.raises(ValueError, match="shape mismatch"):
    t5.from_state_dict(dataclasses_replace(cfg, d_ff=40), torch_t5.state_dict())
  cfg_bad = _config(pipeline_dir, "text_encoder.dim=64")
  with pytest.raises(ValueError, match="text_encoder.dim 64 does not match the T5 checkpoint's d_model 32"):
    text_lib.make_text_encoder(cfg_bad.text_encoder)
  cfg_bad = _config(pipeline_dir, "text_encoder.path=''")
  with pytest.raises(ValueError, match="text_encoder.path: required"):
    text_lib.make_text_encoder(cfg_bad.text_encoder)


def dataclasses_replace(obj, **kw):
  import dataclasses

  return dataclasses.replace(obj, **kw)


# ----------------------------------------------------------------------------- VAE


def _vae_parity(torch_vae, ours: vae.AutoencoderKLCogVideoX, x: np.ndarray, tiling: vae.Tiling | None):
  """(latent err, moments err, pixel err, latent shape): ours vs diffusers on x [B, T, H, W, 3]."""
  xt = torch.tensor(x.transpose(0, 4, 1, 2, 3))
  with torch.no_grad():
    dist = torch_vae.encode(xt).latent_dist
    z = dist.mode()
    params = dist.parameters
    pix = torch_vae.decode(z).sample
  with jax.default_matmul_precision("highest"):
    moments = np.asarray(jax.jit(lambda v: ours.moments(v, tiling))(jnp.asarray(x)))
    dec = np.asarray(
      jax.jit(lambda v: ours.decode(v, tiling))(jnp.asarray(z.numpy().transpose(0, 2, 3, 4, 1)))
    )
  c = ours.cfg.latent_channels
  to_ours = lambda t: t.numpy().transpose(0, 2, 3, 4, 1)
  return (
    rel_err(moments[..., :c], to_ours(z)),
    rel_err(moments, to_ours(params)),
    rel_err(dec, to_ours(pix)),
    moments[..., :c].shape,
  )


def test_vae_latents_and_pixels_match_diffusers(pipeline_dir, torch_vae):
  """17 frames = diffusers' frame batches 9 + 8 (an odd first batch, then the scanned conv-cache path);
  5 latents decode as 3 + 2. Batch 2: GroupNorm statistics must stay per sample."""
  ours = vae.load_pretrained(str(pipeline_dir / "vae"))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 17, 16, 24, 3)).astype(np.float32)
  err_z, err_moments, err_x, shape = _vae_parity(torch_vae, ours, x, None)
  print(f"VAE 17×16×24: latents {err_z:.2e}, posterior moments {err_moments:.2e}, decoded pixels {err_x:.2e}")
  assert shape == (2, 5, 4, 6, 4)
  assert err_z <= REL_TOL and err_moments <= REL_TOL and err_x <= REL_TOL


@pytest.mark.slow
def test_vae_even_frames_match_diffusers(pipeline_dir, torch_vae):
  """16 frames (LayerFlow's sub-clip length) = batches 8 + 8 → 4 latents → decoded as 2 + 2 → 16 frames."""
  ours = vae.load_pretrained(str(pipeline_dir / "vae"))
  x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 16, 3)).astype(np.float32)
  err_z, err_moments, err_x, shape = _vae_parity(torch_vae, ours, x, None)
  print(f"VAE 16×16×16: latents {err_z:.2e}, posterior moments {err_moments:.2e}, decoded pixels {err_x:.2e}")
  assert shape == (1, 4, 4, 4, 4)
  assert err_z <= REL_TOL and err_moments <= REL_TOL and err_x <= REL_TOL


@pytest.mark.slow
def test_vae_tiled_matches_diffusers(pipeline_dir):
  """Spatial tiling: 16×16 tiles, overlap ¼, over a 32×40 clip — tiles of four shapes, blended in diffusers'
  order."""
  theirs = AutoencoderKLCogVideoX.from_pretrained(pipeline_dir / "vae").eval()
  theirs.enable_tiling(
    tile_sample_min_height=16,
    tile_sample_min_width=16,
    tile_overlap_factor_height=0.25,
    tile_overlap_factor_width=0.25,
  )
  ours = vae.load_pretrained(str(pipeline_dir / "vae"))
  x = np.random.default_rng(2).uniform(-1, 1, (1, 9, 32, 40, 3)).astype(np.float32)
  err_z, err_moments, err_x, shape = _vae_parity(theirs, ours, x, vae.Tiling(16, 16, 0.25, 0.25))
  print(f"VAE tiled 9×32×40: latents {err_z:.2e}, posterior moments {err_moments:.2e}, pixels {err_x:.2e}")
  assert shape == (1, 3, 8, 10, 4)
  assert err_z <= REL_TOL and err_moments <= REL_TOL and err_x <= REL_TOL


def test_frame_rule_and_shapes(pipeline_dir):
  cog = vae.VAEConfig()  # CogVideoX-2B
  assert [vae.latent_frames(cog, f) for f in (1, 8, 9, 16, 17, 49, 64)] == [1, 2, 3, 4, 5, 13, 16]
  for f in (49, 16):
    assert vae.decoded_frames(cog, vae.latent_frames(cog, f)) == f
  with pytest.raises(
    ValueError,
    match=r"clip frames 13: .*1 \+ 4k.*1 \+ 8k \(e.g. 49\) or 8k.*13 → 4 latents → "
    r"16 frames. Nearest valid: 9 or 16",
  ):
    vae.latent_frames(cog, 13)
  with pytest.raises(ValueError, match="clip frames 12"):
    vae.latent_frames(cog, 12)
  codec = codec_lib.make_codec(_config(pipeline_dir).autoencoder)
  assert isinstance(codec, codec_lib.Autoencoder)
  assert (codec.spatial_factor, codec.temporal_factor, codec.latent_channels) == (4, 4, 4)
  assert codec.scaling_factor == pytest.approx(0.7)  # from the checkpoint's config.json
  assert codec.latent_shape(17, 16, 24) == (5, 4, 6, 4)
  with pytest.raises(
    ValueError, match="clip height 18 is not divisible by the VAE's spatial compression factor"
  ):
    codec.latent_shape(17, 18, 24)
  with pytest.raises(ValueError, match="clip frames 5"):
    codec.latent_shape(5, 16, 16)
  with pytest.raises(ValueError, match="autoencoder.path: required"):
    codec_lib.make_codec(_config(pipeline_dir, "autoencoder.path=''").autoencoder)
  # the config check leaves VAE clip shapes to the codec (the pixel codec's spatial/temporal keys do not apply)
  from layerflow_jax import validate

  validate.validate(_config(pipeline_dir, "data.frames=9", "data.height=16", "data.width=24"))
  # the built-in kinds are unchanged
  base = load_config("configs/default.py", [])
  assert isinstance(codec_lib.make_codec(base.autoencoder), codec_lib.PixelCodec)
  assert isinstance(text_lib.make_text_encoder(base.text_encoder), text_lib.ByteTextEncoder)


def test_codec_scales_latents_per_clip(pipeline_dir, torch_vae):
  """The configured codec: latents = mode × scaling_factor, one sub-clip at a time (encode_clips), and decode
  divides the scaling back out."""
  cfg = _config(pipeline_dir)
  codec = codec_lib.make_codec(cfg.autoencoder)
  x = np.random.default_rng(3).uniform(-1, 1, (1, 2 * 8, 16, 16, 3)).astype(np.float32)  # 2 clips of 8 frames
  with jax.default_matmul_precision("highest"):
    z = np.asarray(jax.jit(lambda v: codec_lib.encode_clips(codec, v, 2))(x))
  with torch.no_grad():
    clips = torch.tensor(x.reshape(2, 8, 16, 16, 3).transpose(0, 4, 1, 2, 3))
    theirs = (torch_vae.encode(clips).latent_dist.mode() * 0.7).numpy().transpose(0, 2, 3, 4, 1)
  err = rel_err(z, theirs.reshape(1, 4, 4, 4, 4))
  print(f"codec (2 clips × 8 frames, scaled): max rel err {err:.2e}")
  assert err <= REL_TOL


@pytest.mark.slow
def test_train_and_sample_with_t5_and_vae(pipeline_dir, tmp_path):
  """Config selects both encoders end to end: data → 2 train steps → sampling decoded by the VAE."""
  from layerflow_jax import cli

  flags = [
    f"--config.{o}"
    for o in (
      f"data.data_dir={tmp_path / 'tfds'}",
      "data.frames=8",
      "data.height=16",
      "data.width=16",
      "data.num_train=8",
      "data.num_validation=8",
      "data.batch_size=8",
      "eval.num_batches=1",
      "train.steps=2",
      "train.log_every=1",
      "train.warmup_steps=1",
      "train.checkpoint_every=2",
      "sampling.num_steps=2",
      f"text_encoder.max_length={TEXT_LEN}",
      "text_encoder.dim=32",
      "text_encoder.dtype=float32",
      "autoencoder.dtype=float32",
    )
  ]
  spec = f"configs/default.py:size=tiny,encoders=cogvideox,pretrained={pipeline_dir}"
  assert cli.main(["data", "build", "layerflow_synthetic", "--config", spec] + flags) == 0
  work = tmp_path / "run"
  assert cli.main(["train", "--config", spec, "--workdir", str(work), "--no-progress"] + flags) == 0
  dest = tmp_path / "sample"
  assert (
    cli.main(
      [
        "sample",
        "--checkpoint",
        str(work),
        "--task",
        "generate",
        "--fg-prompt",
        "a red circle",
        "--bg-prompt",
        "blue stripes",
        "--blend-prompt",
        "a red circle over blue stripes",
        "--out",
        str(dest),
        "--steps",
        "2",
      ]
    )
    == 0
  )
  assert (dest / "preview.png").exists() and (dest / "fg_rgba" / "0007.png").exists()
