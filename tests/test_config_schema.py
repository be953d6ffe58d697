"""One schema (configs/default.py SCHEMA): the base config, validation, checkpoint configs, variant arguments."""

from __future__ import annotations

import json

import ml_collections as mlc
import pytest

from configs import common, default, stages
from layerflow_jax import validate
from layerflow_jax.config import SCHEMA, ConfigError, load_config, set_key
from layerflow_jax.train import checkpoint as ckpt_lib
from layerflow_jax.train import trainer

GPU_LEVERS = ("model.dtype", "model.attention", "model.remat", "model.fused_qkv", "model.pad_tokens_to")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _diff(a: mlc.ConfigDict, b: mlc.ConfigDict) -> dict:
  fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
  return {k: fa.get(k) for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}


def test_base_config_is_the_schema():
  flat = _flat(default.get_config().to_dict())
  # free-form groups flatten to their default entries (task weights) or stay empty
  free = [k for k, s in SCHEMA.items() if s.free_form]
  declared = {k for k in flat if k in SCHEMA or any(k.startswith(f + ".") for f in free)}
  assert declared == set(flat)
  assert all(s.doc.strip() for s in SCHEMA.values())
  assert {k for k in SCHEMA if not SCHEMA[k].free_form} <= set(flat)


def test_ranges_come_from_the_schema():
  c = default.get_config()
  c.train.sample_every = -1  # declared "[0, inf)"
  with pytest.raises(ConfigError, match=r"train.sample_every=-1: is too small; expected an integer >= 0"):
    validate.check_values(c)
  c = default.get_config()
  c.data.read_threads = -2  # newly declared, "[0, inf)"
  with pytest.raises(ConfigError, match=r"data.read_threads=-2: is too small"):
    validate.check_values(c)


@pytest.mark.parametrize(
  "edit,message",
  [
    (
      lambda c: c.train.update({"sampel_every": 5}),
      r"train.sampel_every=5: is not a declared setting; expected 'train.sample_every' or a key declared",
    ),
    (lambda c: c.update({"extra": mlc.ConfigDict({"x": 1})}), r"extra=.*is not a declared setting"),
    (lambda c: c.model.__delitem__("pad_tokens_to"), r"model.pad_tokens_to: missing from the config"),
  ],
)
def test_unknown_or_missing_key_is_refused_naming_it(edit, message):
  c = default.get_config()
  edit(c)
  with pytest.raises(ConfigError, match=message):
    validate.validate(c)


@pytest.mark.parametrize(
  "key,value",
  [
    ("model.layer_embed", 3),
    ("model.scan_layers", 1),
    ("data.name", 5),
    ("text_encoder.path", None),
    ("sampling.remove_adapters", "motion"),
    ("model.adapters", 4),
  ],
)
def test_wrongly_typed_key_is_refused_naming_it(key, value):
  c = default.get_config()
  *groups, leaf = key.split(".")
  node = c
  for g in groups:
    node = node[g]
  with c.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError, match=rf"^{key}={value!r}: is a {type(value).__name__}; expected a "):
    validate.validate(c)


def test_override_of_a_newly_declared_data_key_reaches_the_config():
  c = default.get_config()
  set_key(c, "data.read_threads", 8)
  set_key(c, "data.prefetch_batches", 1)
  assert (c.data.read_threads, c.data.prefetch_batches) == (8, 1)


def test_checkpoint_config_without_newer_keys_takes_their_defaults():
  c = default.get_config()
  old = c.to_dict()
  del old["data"]["read_threads"], old["model"]["pad_tokens_to"], old["stage"]
  restored = ckpt_lib.config_from_meta(json.dumps(old))
  assert (restored.data.read_threads, restored.model.pad_tokens_to, restored.stage) == (2, 0, "")
  validate.check_keys(restored)
  # a resume of that checkpoint with today's (same) config is not a config change
  assert trainer.config_changes(json.dumps(old), c) == []
  c.model.pad_tokens_to = 64
  assert trainer.config_changes(json.dumps(old), c) == ["model.pad_tokens_to: 0 -> 64"]


def test_pack_arg_round_trips_through_parse_arg():
  a = common.parse_arg("size=2b,gpu=1,image_weight=0.25", **stages.ARGS)
  again = common.parse_arg(common.pack_arg(a, stages.ARGS), **stages.ARGS)
  assert again == a and again.gpu is True and again.tpu is False and again.image_weight == 0.25


@pytest.mark.parametrize("stage", stages.STAGES)
def test_stage_takes_every_base_argument(stage):
  """``configs/stages.py:size=2b,gpu=1`` = the base's 2b+gpu settings plus the stage's own."""
  staged = load_config(f"configs/stages.py:stage={stage},size=2b,gpu=1")
  base = load_config("configs/default.py:size=2b,gpu=1")
  gpu_levers = _diff(base, load_config("configs/default.py:size=2b"))
  assert set(gpu_levers) == set(GPU_LEVERS)
  own = _diff(
    load_config(f"configs/stages.py:stage={stage},size=2b"), load_config("configs/default.py:size=2b")
  )
  assert own and not set(own) & set(gpu_levers)  # the stage changes other keys than the levers
  assert _diff(staged, base) == own  # the stage's own settings, and nothing of the base lost
  validate.validate(staged, num_devices=8, check_chain=False)


def test_ablation_and_learn_gpu_forward_the_whole_argument_set():
  abl = load_config("configs/ablations.py:sweep=mixture,size=2b,gpu=1,image_weight=0.25")
  st = load_config("configs/stages.py:stage=stage3_content_lora,size=2b,gpu=1,image_weight=0.25")
  assert _diff(abl, st) == {}
  learn = load_config("configs/learn_gpu.py:gpu=1")
  assert set(_diff(learn, load_config("configs/learn_gpu.py"))) == set(GPU_LEVERS)
  with pytest.raises(ConfigError, match="config argument 'gpus' unknown"):
    load_config("configs/ablations.py:sweep=mixture,gpus=1")
