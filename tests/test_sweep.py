"""Sweeps: get_sweep helpers, the shipped ablations, a 2×2 tiny sweep on CPU (table + PNG) and resuming one."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from layerflow_jax import cli
from layerflow_jax import sweep as hyper
from layerflow_jax.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# A constant learning rate keeps train.steps out of the compiled programs, so the four runs compile once (the runner's
# persistent compilation cache serves the others) and the test stays fast on a 2-core CPU.
TINY = [
  "data.frames=4",
  "data.height=16",
  "data.width=16",
  "data.num_train=16",
  "data.num_validation=8",
  "data.batch_size=8",
  "train.log_every=1",
  "train.warmup_steps=1",
  "train.lr_schedule='constant'",
  "train.checkpoint_every=100",
  "eval.num_batches=1",
  "sampling.num_steps=2",
]

SWEEP_2X2 = """
from configs import default
from layerflow_jax import sweep as hyper


def get_config(arg=None):
  return default.get_config("size=tiny")


def get_sweep(arg=None):
  return hyper.product(hyper.axis("data.shuffle_seed", [0, 1]), hyper.axis("train.steps", [2, 3]))
"""


def _flags(data_dir, extra=()):
  return [f"--config.data.data_dir={data_dir}"] + [f"--config.{o}" for o in TINY + list(extra)]


def _write(path: pathlib.Path, text: str) -> str:
  path.write_text(text)
  return str(path)


# ----------------------------------------------------------------------------- helpers and expansion (no training)


def test_product_and_zip():
  a = hyper.axis("model.layer_embed", ["none", "text"])
  b = hyper.axis("train.lr", [1e-3, 1e-4])
  assert hyper.product(a, b) == [
    {"model.layer_embed": "none", "train.lr": 1e-3},
    {"model.layer_embed": "none", "train.lr": 1e-4},
    {"model.layer_embed": "text", "train.lr": 1e-3},
    {"model.layer_embed": "text", "train.lr": 1e-4},
  ]
  assert hyper.zipit(a, b) == [
    {"model.layer_embed": "none", "train.lr": 1e-3},
    {"model.layer_embed": "text", "train.lr": 1e-4},
  ]
  assert len(hyper.product(hyper.zipit(a, b), hyper.axis("seed", [0, 1, 2]))) == 6
  with pytest.raises(ValueError, match="different lengths"):
    hyper.zipit(a, hyper.axis("seed", [0, 1, 2]))
  with pytest.raises(ValueError, match="set twice"):
    hyper.product(a, a)
  with pytest.raises(ValueError, match="no values"):
    hyper.axis("seed", [])


def test_names_and_specs():
  runs = hyper.product(
    hyper.axis("model.layer_embed", ["text+video"]),
    hyper.axis("arg.image_weight", [0.25]),
    hyper.axis("model.adapters.content.rank", [64]),
  )
  assert hyper.run_name(runs[0]) == "layer_embed=text+video,image_weight=0.25,rank=64"
  spec, overrides = hyper.run_spec("configs/stages.py:demo", runs[0])
  assert spec == "configs/stages.py:demo,image_weight=0.25"
  assert overrides == ["model.layer_embed='text+video'", "model.adapters.content.rank=64"]
  # keys with the same last component keep their full names
  assert hyper.run_name({"a.seed": 1, "seed": 2}) == "a.seed=1,seed=2"
  assert "/" not in hyper.run_name({"data.data_dir": "x/y"})


def test_shipped_ablations_expand_to_the_paper_runs():
  spec = "configs/ablations.py:demo,sweep="
  names = {
    s: [r["name"] for r in hyper.expand(spec + s)]
    for s in ("layer_embed", "data", "motion_lora", "content_rank", "mixture")
  }
  assert names == {
    "layer_embed": ["layer_embed=none", "layer_embed=text", "layer_embed=text+video"],
    "data": ["data=video", "data=joint"],
    "motion_lora": ["motion_lora=True", "motion_lora=False"],
    "content_rank": ["rank=64", "rank=256"],
    "mixture": ["image_weight=0.25", "image_weight=0.5", "image_weight=0.75"],
  }
  cfg = lambda s, r: load_config(r["spec"], r["overrides"])  # noqa: E731
  runs = hyper.expand(spec + "layer_embed")
  assert [cfg(None, r).model.layer_embed for r in runs] == ["none", "text", "text+video"]
  assert all(cfg(None, r).stage == "stage1_base" for r in runs)

  video, joint = [cfg(None, r) for r in hyper.expand(spec + "data")]
  assert [e["transform"] for e in video.data.mixture] == ["video"]
  assert sorted(e["transform"] for e in joint.data.mixture) == ["static", "video"]
  assert not joint.model.adapters  # joint training has no LoRA

  on, off = [cfg(None, r) for r in hyper.expand(spec + "motion_lora")]
  assert on.stage == off.stage == "stage3_content_lora"
  assert set(on.model.adapters) == {"motion", "content"} and on.train.init_from == "stage2_motion_lora"
  assert set(off.model.adapters) == {"content"} and off.train.init_from == "stage1_base"
  assert not off.train.adapter_scale_keys and not off.sampling.remove_adapters

  assert [cfg(None, r).model.adapters.content.rank for r in hyper.expand(spec + "content_rank")] == [64, 256]
  mixes = [cfg(None, r).data.mixture for r in hyper.expand(spec + "mixture")]
  assert [[(e["transform"], e["weight"], e["motion_scale"]) for e in m] for m in mixes] == [
    [("static", w, 1.0), ("video", 1.0 - w, 0.0)] for w in (0.25, 0.5, 0.75)
  ]

  with pytest.raises(ConfigError, match="sweep 'nope' unknown"):
    hyper.expand(spec + "nope")


def test_bad_sweeps_are_refused(tmp_path):
  bad_key = _write(tmp_path / "bad_key.py", SWEEP_2X2.replace("data.shuffle_seed", "data.shufle_seed"))
  with pytest.raises(ConfigError, match="'data.shufle_seed' does not exist"):
    hyper.expand(bad_key)
  no_sweep = _write(
    tmp_path / "no_sweep.py", "from configs import default\nget_config = default.get_config\n"
  )
  with pytest.raises(ConfigError, match="defines no get_sweep"):
    hyper.expand(no_sweep)
  spec = _write(tmp_path / "s.py", SWEEP_2X2)
  hyper.prepare(spec, tmp_path / "w", ["train.lr=0.001"])
  with pytest.raises(ConfigError, match="was made by .*another --workdir"):
    hyper.prepare(spec, tmp_path / "w", ["train.lr=0.01"])


def test_device_split_and_slurm_script(tmp_path):
  assert hyper.split_devices([str(i) for i in range(8)], 2) == [
    {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
    {"CUDA_VISIBLE_DEVICES": "4,5,6,7"},
  ]
  assert hyper.split_devices(["3", "5", "7"], 3) == [{"CUDA_VISIBLE_DEVICES": d} for d in ("3", "5", "7")]
  assert hyper.split_devices([], 3) == [{}, {}, {}]  # CPU: plain processes
  with pytest.raises(ValueError, match="needs at least 4 devices; found 2"):
    hyper.split_devices(["0", "1"], 4)

  spec = _write(tmp_path / "s.py", SWEEP_2X2)
  work = tmp_path / "w"
  assert (
    cli.main(["sweep", "--config", spec, "--workdir", str(work), "--slurm", "--sbatch=--gres=gpu:8"]) == 0
  )
  root, runs = hyper.prepare(spec, work)
  (work / runs[0]["name"] / hyper.RESULT_FILE).write_text("{}")  # pretend the first run finished
  script = hyper.write_slurm(root, runs).read_text()
  assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:8" not in script
  assert runs[0]["name"] not in script and all(r["name"] in script for r in runs[1:])
  assert "sweep-run" in script and "$SLURM_ARRAY_TASK_ID" in script
  subprocess.run(["bash", "-n", str(root / "slurm.sh")], check=True)  # valid bash


# ----------------------------------------------------------------------------- a real 2×2 sweep, stopped and resumed


def _state(run_dir: pathlib.Path) -> dict:
  res = run_dir / hyper.RESULT_FILE
  return {
    "result_mtime": res.stat().st_mtime_ns if res.exists() else None,
    "attempts": (run_dir / hyper.ATTEMPTS_FILE).read_text(),
    "metrics": (run_dir / "metrics.jsonl").read_text(),
  }


def _attempts(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in (run_dir / hyper.ATTEMPTS_FILE).read_text().splitlines() if l.strip()]


def test_sweep_2x2_stops_resumes_and_reports(tmp_path, capsys):
  spec = _write(tmp_path / "tiny_sweep.py", SWEEP_2X2)
  work = tmp_path / "sweep"
  base = ["sweep", "--config", spec, "--workdir", str(work), "--sample-steps", "2"]
  flags = _flags(tmp_path / "tfds")
  names = [
    "shuffle_seed=0,steps=2",
    "shuffle_seed=0,steps=3",
    "shuffle_seed=1,steps=2",
    "shuffle_seed=1,steps=3",
  ]

  # 1) every run trains at most 2 steps: the 2-step runs finish, the 3-step runs stop midway (checkpoint at 2)
  assert cli.main(base + ["--stop-after", "2", "--no-report"] + flags) == 1  # 1: not all finished
  assert sorted(p.name for p in work.iterdir() if (p / hyper.RUN_FILE).exists()) == names
  finished = [n for n in names if n.endswith("steps=2")]
  stopped = [n for n in names if n.endswith("steps=3")]
  assert all(hyper.is_finished(work / n) for n in finished)
  assert not any(hyper.is_finished(work / n) for n in stopped)
  for n in stopped:
    assert sorted(int(p.name) for p in (work / n / "checkpoints").iterdir() if p.name.isdigit()) == [2]
  before = {n: _state(work / n) for n in names}

  # 2) a second call skips the finished runs and resumes the stopped ones from step 2
  capsys.readouterr()
  assert cli.main(base + flags) == 0
  out = capsys.readouterr().out
  assert "4 runs, 2 finished before, 2 to run" in out
  for n in finished:
    assert _state(work / n) == before[n], f"{n} was run again"
  for n in stopped:
    attempts = _attempts(work / n)
    assert [a["event"] for a in attempts] == ["start", "end", "start", "end"]
    assert (attempts[1]["end_step"], attempts[3]["start_step"], attempts[3]["end_step"]) == (2, 2, 3)
    steps = [
      json.loads(l)["step"] for l in (work / n / "metrics.jsonl").read_text().splitlines() if '"loss"' in l
    ]
    assert steps == [1, 2, 3]  # one row per step: nothing trained twice

  # 3) results: machine-readable per run, a 4-row table, a PNG of the loss curves
  for n in names:
    m = json.loads((work / n / hyper.RESULT_FILE).read_text())["metrics"]
    assert m["steps"] == int(n[-1])
    for k in (
      "train_loss",
      "val_loss",
      "val_loss_decompose",
      "layer/decompose/alpha_iou",
      "steps_per_s",
      "examples_per_s",
    ):
      assert np.isfinite(m[k]) and m[k] >= 0, (n, k, m.get(k))
  assert cli.main(["sweep-report", str(work), "--out", str(tmp_path / "report")]) == 0
  rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
  assert [r["run"] for r in rows] == names
  assert [(r["data.shuffle_seed"], r["train.steps"]) for r in rows] == [
    ("0", "2"),
    ("0", "3"),
    ("1", "2"),
    ("1", "3"),
  ]
  for r in rows:
    assert r["status"] == "done"
    assert np.isfinite(float(r["val_loss"])) and np.isfinite(float(r["train_loss"]))
  md = (tmp_path / "report" / "report.md").read_text()
  table = [l for l in md.splitlines() if l.startswith("|")]
  assert len(table) == 2 + 4 and "val_loss" in table[0] and "layer/decompose/alpha_iou" in table[0]
  from PIL import Image

  with Image.open(tmp_path / "report" / "loss_curves.png") as im:
    assert im.size[0] >= 800 and im.size[1] >= 300
    assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something is drawn

  # 4) a third call has nothing to do
  capsys.readouterr()
  assert cli.main(base + ["--no-report"] + flags) == 0
  assert "4 finished before, 0 to run" in capsys.readouterr().out
  for n in names:
    assert (work / n / hyper.ATTEMPTS_FILE).read_text().count('"start"') == (2 if n in stopped else 1)


# ----------------------------------------------------------------------------- slow: subprocesses, a kill, shared stages


@pytest.mark.slow
def test_parallel_sweep_killed_midway_resumes(tmp_path):
  """`layerflow sweep --parallel 2` as a real process group, SIGKILLed once two runs finished; a rerun finishes
  the rest without touching the finished ones."""
  spec = _write(tmp_path / "tiny_sweep.py", SWEEP_2X2.replace("[2, 3]", "[2, 40]"))
  work = tmp_path / "sweep"
  cmd = [
    sys.executable,
    "-m",
    "layerflow_jax.cli",
    "sweep",
    "--config",
    spec,
    "--workdir",
    str(work),
    "--parallel",
    "2",
    "--sample-steps",
    "0",
    "--no-report",
  ] + _flags(tmp_path / "tfds", ["train.checkpoint_every=1"])
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env=env,
    start_new_session=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  short = ["shuffle_seed=0,steps=2", "shuffle_seed=1,steps=2"]
  long = ["shuffle_seed=0,steps=40", "shuffle_seed=1,steps=40"]
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if all(hyper.is_finished(work / n) for n in short) and any(
      (work / n / "checkpoints").is_dir()
      and any(p.name.isdigit() for p in (work / n / "checkpoints").iterdir())
      for n in long
    ):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read()
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  unfinished = [n for n in long if not hyper.is_finished(work / n)]
  assert unfinished
  before = {n: _state(work / n) for n in short}
  started = [n for n in unfinished if (work / n / "checkpoints").is_dir()]
  assert started
  ckpt = {
    n: max(int(p.name) for p in (work / n / "checkpoints").iterdir() if p.name.isdigit()) for n in started
  }

  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert "2 finished before, 2 to run" in rerun.stdout
  for n in short:
    assert _state(work / n) == before[n]
  for n in long:
    assert hyper.is_finished(work / n)
  for n, step in ckpt.items():
    ends = [a for a in _attempts(work / n) if a["event"] == "end"]
    assert (
      len(ends) == 1 and ends[0]["start_step"] == step > 0
    )  # resumed from its checkpoint, not from scratch


@pytest.mark.slow
def test_stage3_sweep_shares_earlier_stages(tmp_path):
  """motion LoRA on/off: stage 1 is trained once for both runs, stage 2 once (only the "on" run needs it)."""
  work = tmp_path / "sweep"
  assert (
    cli.main(
      [
        "sweep",
        "--config",
        "configs/ablations.py:sweep=motion_lora,motion_rank=2,content_rank=4",
        "--workdir",
        str(work),
        "--sample-steps",
        "2",
      ]
      + _flags(tmp_path / "tfds", ["train.steps=4", "train.checkpoint_every=4"])
    )
    == 0
  )
  shared = sorted(p.name.split("-")[0] for p in (work / hyper.SHARED_DIR).iterdir() if p.is_dir())
  assert shared == ["stage1_base", "stage2_motion_lora"]
  on = json.loads((work / "motion_lora=True" / hyper.RESULT_FILE).read_text())["metrics"]
  off = json.loads((work / "motion_lora=False" / hyper.RESULT_FILE).read_text())["metrics"]
  assert on["trainable_params"] == off["trainable_params"]  # the content LoRA only, in both
  assert np.isfinite(on["val_loss"]) and np.isfinite(off["val_loss"])
  from layerflow_jax.train import trainer

  p_on, _ = trainer.load_params(work / "motion_lora=True")
  p_off, _ = trainer.load_params(work / "motion_lora=False")
  assert any(k.startswith("adapters.motion.") for k in p_on)
  assert not any(k.startswith("adapters.motion.") for k in p_off)
  stage1 = next(p for p in (work / hyper.SHARED_DIR).glob("stage1_base-*") if p.is_dir())
  p1, _ = trainer.load_params(stage1)
  for k in p1:  # both runs start from the same stage-1 weights and keep them frozen
    np.testing.assert_array_equal(np.asarray(p_on[k]), np.asarray(p1[k]), err_msg=k)
    np.testing.assert_array_equal(np.asarray(p_off[k]), np.asarray(p1[k]), err_msg=k)
