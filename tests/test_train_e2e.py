"""End-to-end: a 2-layer model, few steps, through the CLI (train → resume → sample) and the stage chain."""

import json
import re

import numpy as np
import pytest

from layerflow_jax import cli
from layerflow_jax.config import ConfigError, load_config
from layerflow_jax.train import checkpoint as ckpt_lib
from layerflow_jax.train import logging as log_lib
from layerflow_jax.train import trainer

TINY = [
  "data.frames=4",
  "data.height=16",
  "data.width=16",
  "data.num_train=16",
  "data.num_validation=8",
  "data.batch_size=8",
  "train.log_every=1",
  "train.warmup_steps=1",
  "sampling.num_steps=3",
  "eval.num_batches=1",
]


def _flags(data_dir, extra=()):
  return [f"--config.data.data_dir={data_dir}"] + [f"--config.{o}" for o in TINY + list(extra)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  assert cli.main(["data", "build", "layerflow_synthetic", "--config", "configs/default.py"] + _flags(d)) == 0
  return d


def test_train_resume_sample_through_cli(data_dir, tmp_path, capsys):
  work = tmp_path / "run"
  base = ["train", "--config", "configs/default.py:size=tiny", "--workdir", str(work), "--no-progress"]
  flags = _flags(data_dir, ["train.steps=3", "train.checkpoint_every=2"])
  assert cli.main(base + ["--stop-after", "2"] + flags) == 0
  assert ckpt_lib.Checkpointer(work).steps() == [2]
  assert cli.main(base + flags) == 0  # resumes at 2, ends at 3
  rows = [r for r in log_lib.read_metrics(work) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in rows)
  out = capsys.readouterr().out
  assert '"start_step": 2' in out
  assert not (work / "samples").exists()  # train.sample_every=0: no previews

  # the resumed trajectory equals an uninterrupted run
  straight = tmp_path / "straight"
  assert (
    cli.main(
      ["train", "--config", "configs/default.py:size=tiny", "--workdir", str(straight), "--no-progress"]
      + flags
    )
    == 0
  )
  straight_rows = [r for r in log_lib.read_metrics(straight) if "loss" in r]
  assert [r["loss"] for r in straight_rows] == [r["loss"] for r in rows]

  for task in ("generate", "decompose", "fg2bg", "bg2fg"):
    dest = tmp_path / f"sample_{task}"
    assert (
      cli.main(
        [
          "sample",
          "--checkpoint",
          str(work),
          "--task",
          task,
          "--from-validation",
          "0",
          "--out",
          str(dest),
          "--steps",
          "2",
        ]
      )
      == 0
    )
    assert (dest / "preview.png").exists() and (dest / "fg_rgba" / "0000.png").exists()

  gen = tmp_path / "prompted"
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
        str(gen),
        "--steps",
        "2",
      ]
    )
    == 0
  )
  assert (gen / "preview.png").exists()

  # layer metrics of every task on the validation split: JSON, Markdown and a contact sheet
  ev = tmp_path / "eval"
  assert (
    cli.main(["evaluate", "--checkpoint", str(work), "--out", str(ev), "--steps", "2", "--num-batches", "1"])
    == 0
  )
  result = json.loads((ev / "metrics.json").read_text())
  assert result["num_clips"] == 8
  assert 0.0 <= result["decompose/alpha_iou"] <= 1.0 and 0.0 <= result["decompose/alpha_mae"] <= 1.0
  # Bounds the metrics must respect. The ground-truth layers of the same clips recomposite into their blend
  # (error ~0); a 3-step model's sampled layers do not, so an error at the truth's level would mean the metric
  # read the truth, not the samples. PSNR of clips clipped to [-1, 1] is >= 0 dB; a generated clip copied from the
  # ground truth would score the 100 dB cap (8-bit rounding alone ~50 dB), a 3-step model's far below 40 dB.
  from layerflow_jax import evaluate, layers, metrics

  layout = layers.get_layout("rgba")
  clips = layers.unpack(
    evaluate.eval_batches(
      load_config("configs/default.py:size=tiny", [f"data.data_dir='{data_dir}'"] + TINY), num_batches=1
    )[0]["video"],
    layout.num_clips,
  )
  truth = [layers.clips_to_layers(c, layout) for c in clips]
  truth_error = float(
    np.mean([metrics.composite_error(t["fg"], t["alpha"], t["bg"], t["blend"]) for t in truth])
  )
  assert truth_error < 0.02, truth_error
  for task in ("generate", "decompose", "fg2bg", "bg2fg"):
    assert result[f"{task}/composite_error"] > 5 * truth_error + 0.05, (task, result, truth_error)
    assert result[f"{task}/temporal_ratio"] > 0.0
  for key in (
    "fg2bg/blend_psnr",
    "bg2fg/fg_psnr",
    "bg2fg/blend_psnr",
    "decompose/fg_psnr",
    "decompose/bg_psnr",
  ):
    assert 0.0 <= result[key] < 40.0, (key, result[key])
  # the ground-truth ceiling of the attribute check is computed on the same clips
  assert 0.0 <= result["generate/color_accuracy"] <= 1.0 and result["generate/color_accuracy_gt"] == 1.0
  assert "decompose: alpha IoU" in (ev / "metrics.md").read_text()
  assert (ev / "contact_sheet.png").stat().st_size > 0

  def refused(argv, pattern):  # bad input: one line naming it, exit 2
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(pattern, err), err

  refused(
    ["evaluate", "--checkpoint", str(work), "--out", str(ev), "--tasks", "segment"], "unknown task 'segment'"
  )

  # bad input: clear errors
  refused(
    ["sample", "--checkpoint", str(work), "--task", "segment", "--out", str(tmp_path / "x")],
    "unknown task 'segment'",
  )
  refused(
    [
      "sample",
      "--checkpoint",
      str(work),
      "--task",
      "generate",
      "--fg-prompt",
      "a",
      "--blend-prompt",
      "b",
      "--out",
      str(tmp_path / "x"),
    ],
    "prompts missing.*--bg-prompt",
  )
  import imageio.v3 as iio

  wrong = tmp_path / "wrong_frames"
  wrong.mkdir()
  for i in range(4):
    iio.imwrite(wrong / f"{i:04d}.png", np.full((24, 20, 3), 10 * i, np.uint8))
  refused(
    [
      "sample",
      "--checkpoint",
      str(work),
      "--task",
      "decompose",
      "--video",
      str(wrong),
      "--fg-prompt",
      "a",
      "--bg-prompt",
      "b",
      "--blend-prompt",
      "c",
      "--out",
      str(tmp_path / "x"),
    ],
    "20x24.*16x16",
  )


def test_three_stages_chain_and_freeze(data_dir, tmp_path):
  work = tmp_path / "stages"
  # adaLN-zero: the first update moves only the output projection, the next ones open the gates; a stage 1 of
  # at least 3 steps is needed before any gradient reaches a LoRA in the blocks.
  steps = ["train.steps=4", "train.checkpoint_every=4"]
  assert (
    cli.main(
      [
        "train-stages",
        "--config",
        "configs/stages.py:size=tiny,motion_rank=2,content_rank=4",
        "--workdir",
        str(work),
        "--no-progress",
      ]
      + _flags(data_dir, steps)
    )
    == 0
  )
  p1, _ = trainer.load_params(work / "stage1_base")
  p2, c2 = trainer.load_params(work / "stage2_motion_lora")
  p3, _ = trainer.load_params(work / "stage3_content_lora")
  base_keys = [k for k in p1]
  for k in base_keys:  # the base model is frozen in stages 2 and 3
    np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p2[k]), err_msg=k)
    np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p3[k]), err_msg=k)
  motion = [k for k in p2 if k.startswith("adapters.motion.")]
  assert motion and all(k in p3 for k in motion)
  for k in motion:  # the motion adapter trained in stage 2 (B moved off zero), frozen in stage 3
    np.testing.assert_array_equal(np.asarray(p2[k]), np.asarray(p3[k]), err_msg=k)
  assert any(np.any(np.asarray(p2[k]) != 0) for k in motion if k.endswith("_b"))
  assert any(
    np.any(np.asarray(p3[k]) != 0) for k in p3 if k.startswith("adapters.content.") and k.endswith("_b")
  )
  # optimizer state covers exactly the trainable values (Adam: two moments each)
  for stage in ("stage2_motion_lora", "stage3_content_lora"):
    s = json.loads((work / stage / "summary.json").read_text())
    assert s["optimizer_state_values"] == 2 * s["trainable_params"], s
    print(
      stage,
      "trainable",
      s["trainable_params"],
      "of",
      s["total_params"],
      "optimizer values",
      s["optimizer_state_values"],
    )
  # a second call skips finished stages: nothing trains, logs or writes a summary again
  stage_names = ("stage1_base", "stage2_motion_lora", "stage3_content_lora")
  before = {s: [(work / s / f).read_bytes() for f in ("summary.json", "metrics.jsonl")] for s in stage_names}
  assert (
    cli.main(
      [
        "train-stages",
        "--config",
        "configs/stages.py:size=tiny,motion_rank=2,content_rank=4",
        "--workdir",
        str(work),
        "--no-progress",
      ]
      + _flags(data_dir, steps)
    )
    == 0
  )
  assert {
    s: [(work / s / f).read_bytes() for f in ("summary.json", "metrics.jsonl")] for s in stage_names
  } == before


@pytest.mark.parametrize(
  "override,message",
  [
    ("train.stepz=3", "'train.stepz' does not exist"),
    ("train.steps='many'", "'train.steps': 'many' is not a number"),
    ("nope.x=1", "'nope' does not exist"),
  ],
)
def test_bad_overrides_are_refused(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config("configs/default.py", [override])


def test_batch_not_divisible_by_data_parallel(data_dir, tmp_path):
  cfg = load_config("configs/default.py", [f"data.data_dir='{data_dir}'"] + TINY + ["data.batch_size=6"])
  with pytest.raises(ValueError, match="data.batch_size 6 is not divisible by the data-parallel size 8"):
    trainer.train(cfg, tmp_path / "w", progress=False)


def test_task_curriculum_then_the_mix(data_dir, tmp_path):
  """diffusion.curriculum_steps: the first steps draw only the curriculum's tasks (decompose: the blend is given,
  so no example has it in the loss), later steps the configured mix — in one compiled step."""
  work = tmp_path / "curriculum"
  curriculum = [
    "diffusion.curriculum_steps=2",
    "diffusion.curriculum_weights.generate=0",
    "diffusion.curriculum_weights.fg2bg=0",
    "diffusion.curriculum_weights.bg2fg=0",
    "train.steps=5",
    "train.checkpoint_every=0",
  ]
  assert (
    cli.main(
      ["train", "--config", "configs/default.py:size=tiny", "--workdir", str(work), "--no-progress"]
      + _flags(data_dir, curriculum)
    )
    == 0
  )
  rows = {r["step"]: r for r in log_lib.read_metrics(work) if "loss" in r}
  assert [rows[s]["count_blend"] for s in (1, 2)] == [0, 0]
  assert all(rows[s]["count_alpha"] == 8 for s in (1, 2))  # decompose generates fg, alpha and bg
  assert sum(rows[s]["count_blend"] for s in (3, 4, 5)) > 0  # uniform tasks: the blend is generated again
  from layerflow_jax import validate

  zero = [f"diffusion.curriculum_weights.{t}=0" for t in ("generate", "decompose", "fg2bg", "bg2fg")]
  with pytest.raises(ConfigError, match="diffusion.curriculum_weights.*no task a positive weight"):
    validate.check_tasks(load_config("configs/default.py", ["diffusion.curriculum_steps=3"] + zero))
