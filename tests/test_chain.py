"""The one "finished" rule and the one stage-chain resolver (layerflow_jax/chain.py), on work dirs laid out by hand
(and one written by Orbax), and through ``train-stages``, which must skip and chain by them."""

import pathlib

import jax.numpy as jnp
import pytest

from layerflow_jax import chain, stages
from layerflow_jax.config import ConfigError, load_config
from layerflow_jax.train import checkpoint as ckpt_lib

SPEC = "configs/stages.py:size=tiny"


def _workdir(root: pathlib.Path, *names: str) -> pathlib.Path:
  """A work dir whose checkpoints/ holds the given entries (folders; ``file:NAME`` for a plain file)."""
  d = root / "checkpoints"
  d.mkdir(parents=True)
  for n in names:
    if n.startswith("file:"):
      (d / n[5:]).write_text("")
    else:
      (d / n).mkdir()
  return root


def test_complete_steps_are_the_renamed_step_folders_in_numeric_order(tmp_path):
  w = _workdir(tmp_path / "w", "9", "10", "2", "12.orbax-checkpoint-tmp-1733", "11.damaged", "file:13", "x")
  assert chain.complete_steps(w) == [2, 9, 10]  # 10 is newer than 9: numbers, not names
  assert chain.complete_steps(tmp_path / "none") == []
  assert not (tmp_path / "none").exists()  # asking creates nothing
  assert ckpt_lib.has_checkpoints(w) and not ckpt_lib.has_checkpoints(
    _workdir(tmp_path / "tmp_only", "3.orbax-tmp")
  )


@pytest.mark.parametrize(
  "entries,steps,trained",
  [
    ((), 4, False),
    (("2",), 4, False),  # stopped midway
    (("2", "4"), 4, True),
    (("4", "6"), 4, True),  # trained past train.steps (lowered since): finished, not to be trained again
    (("2", "4.orbax-checkpoint-tmp-99"), 4, False),  # the final save was killed mid-write
    (("2", "4.damaged"), 4, False),  # the final step was moved aside as unreadable
    (("0",), 0, True),  # train.steps=0: the init_from parameters saved as step 0
    (("9", "10"), 10, True),
  ],
)
def test_is_trained_asks_the_newest_complete_checkpoint(tmp_path, entries, steps, trained):
  assert chain.is_trained(_workdir(tmp_path / "w", *entries), steps) is trained


def test_is_trained_without_checkpoints_dir(tmp_path):
  assert not chain.is_trained(tmp_path / "missing", 0)
  assert not chain.is_trained(tmp_path, 0)


def test_a_step_orbax_wrote_is_complete(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, writer=True)
  assert ck.save(3, {"w": jnp.arange(4.0)})
  ck.close()
  assert chain.complete_steps(tmp_path) == ck.steps() == [3]
  assert chain.is_trained(tmp_path, 3) and not chain.is_trained(tmp_path, 4)


def test_source_stage_is_init_from_naming_a_stage():
  assert chain.source_stage(load_config(stages.stage_spec(SPEC, "stage1_base"))) is None
  assert chain.source_stage(load_config(stages.stage_spec(SPEC, "stage2_motion_lora"))) == "stage1_base"
  assert (
    chain.source_stage(load_config(stages.stage_spec(SPEC, "stage3_content_lora"))) == "stage2_motion_lora"
  )
  as_path = load_config(stages.stage_spec(SPEC, "stage2_motion_lora"), ["train.init_from='runs/s1'"])
  assert chain.source_stage(as_path) is None  # a path is used as it is


def test_start_from_refuses_an_unfinished_source(tmp_path):
  config = load_config(stages.stage_spec(SPEC, "stage2_motion_lora"))
  src = tmp_path / "stage1_base"
  with pytest.raises(ConfigError, match=r"stage stage2_motion_lora: .*stage1_base has no checkpoint"):
    chain.start_from(config, src, 4)
  _workdir(src, "2")
  with pytest.raises(ConfigError, match=r"stage1_base stopped at step 2 of 4; expected that stage trained"):
    chain.start_from(config, src, 4)
  assert config.train.init_from == "stage1_base"  # unchanged when refused
  (src / "checkpoints" / "4").mkdir()
  chain.start_from(config, src, 4)
  assert config.train.init_from == str(src)


def test_train_stages_skips_a_finished_stage_and_refuses_an_unfinished_source(tmp_path):
  overrides = ["train.steps=4"]
  _workdir(tmp_path / "stage1_base", "2", "4")
  assert stages.train_stages(SPEC, tmp_path, overrides, progress=False, only="stage1_base") == {
    "stage1_base": {"skipped": "already finished"}
  }
  (tmp_path / "stage1_base" / "checkpoints" / "4").rename(
    tmp_path / "stage1_base" / "checkpoints" / "4.damaged"
  )
  with pytest.raises(ConfigError, match=r"stage stage2_motion_lora: .*stopped at step 2 of 4"):
    stages.train_stages(SPEC, tmp_path, overrides, progress=False, only="stage2_motion_lora")
  assert not (tmp_path / "stage2_motion_lora").exists()
