"""Input-pipeline throughput: clips per second per process for each stage's mixture, next to what a step consumes.

Writes data in the official layouts (layered videos, layered images, plain mp4 backgrounds), imports them with the
TFDS builders, then runs each stage's Grain pipeline (``data_pipelines.pipeline``) in-process and with Grain worker
processes, at the tiny size (8 frames of 16×16) and at 480×720 × 16 frames per clip. A *clip* is one training
example: the layered sample (fg, alpha, bg, blend sub-clips) the model sees as one video.

  python benchmarks/data_throughput.py                       # both sizes, workers 0 and 2, appends results.jsonl
  python benchmarks/data_throughput.py --sizes tiny --seconds 5 --no-record

"One train step consumes" is the per-process batch; the step time next to it is a tiny train step measured here
(CPU) and, for 480×720, the newest ``kind: train_step`` line of ``benchmarks/results.jsonl`` (if there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import common  # noqa: E402

SIZES = {
  # name: (frames per clip, height, width, per-process batch, dataset sizes (layered videos, images, backgrounds))
  "tiny": (8, 16, 16, 8, (24, 24, 12)),
  "480x720x16": (16, 480, 720, 1, (6, 6, 4)),
}
STAGES = {
  "stage1_base": [dict(name="layerflow_folder", weight=1.0, transform="video", motion_scale=0.0)],
  "stage2_motion_lora": [
    dict(
      name="layerflow_folder", weight=1.0, transform="static", background="layerflow_videos", motion_scale=1.0
    )
  ],
  "stage3_content_lora": [
    dict(name="layerflow_images", weight=0.5, transform="static", motion_scale=1.0),
    dict(
      name="layerflow_folder", weight=0.5, transform="video", background="layerflow_videos", motion_scale=0.0
    ),
  ],
}


def device_name() -> str:
  cpu = platform.processor() or "cpu"
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu} ({os.cpu_count()} cores)"


def write_data(root: pathlib.Path, frames: int, height: int, width: int, counts) -> dict[str, pathlib.Path]:
  from data_pipelines import layout_writer, synthetic

  n_videos, n_images, n_backgrounds = counts
  roots = {
    "layerflow_folder": root / "layered",
    "layerflow_images": root / "images",
    "layerflow_videos": root / "videos",
  }
  entries = {}
  for i in range(n_videos):  # fg on half of them, bg on two thirds: the derived and missing paths both run
    s = synthetic.make_scene(i, frames + 4, height, width)
    entries[f"v{i:03d}"] = layout_writer.write_layered_video(
      roots["layerflow_folder"], f"v{i:03d}", s, fg=i % 2 == 0, bg=i % 3 != 0
    )
  layout_writer.write_meta(roots["layerflow_folder"] / "train.json", entries)
  layout_writer.write_layered_images(
    roots["layerflow_images"], [synthetic.make_scene(100 + i, 1, height, width) for i in range(n_images)]
  )
  bgs = [synthetic.make_scene(200 + i, 2 * frames, height, width) for i in range(n_backgrounds)]
  layout_writer.write_plain_videos(
    roots["layerflow_videos"], [s["bg"] for s in bgs], [s["bg_prompt"] for s in bgs]
  )
  return roots


def make_config(root: pathlib.Path, roots: dict, frames: int, height: int, width: int, batch: int):
  from configs import default

  c = default.get_config()
  c.data.data_dir = str(root / "tfds")
  c.data.frames, c.data.height, c.data.width, c.data.batch_size = frames, height, width, batch
  c.data.num_validation = 0
  c.data.background_frames = 2 * frames
  c.data.max_frame_stride = 2
  c.data.random_crop = 0.8  # the augmentations a real run would use
  c.data.prompt_dropout = 0.1
  for name, path in roots.items():
    c.data.manual_dirs[name] = str(path)
  return c


def measure(config, seconds: float, min_batches: int = 3) -> tuple[float, int]:
  """Clips per second of the stage iterator (after its first batch, i.e. after workers are up)."""
  from data_pipelines import pipeline

  it = pipeline.make_iterator(config)
  try:
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < min_batches:
      batch = next(it)
      n += 1
    elapsed = time.perf_counter() - t0
  finally:
    if hasattr(it, "close"):
      it.close()
  clips = n * len(batch["motion_scale"])
  return clips / elapsed, clips


def tiny_step_ms(config) -> float:
  """Median time of the tiny model's train step on this machine (stage 1, after compilation)."""
  import jax
  import numpy as np

  from data_pipelines import pipeline
  from layerflow_jax.train import step as step_lib
  from layerflow_jax.train import trainer
  from layerflow_jax.train.experiment import Experiment

  config.train.steps = 100
  exp = Experiment(config)
  abstract = exp.abstract_state()
  shardings = exp.state_shardings(abstract)
  state = exp.init_state()
  fn = step_lib.compile_train_step(exp, shardings, None)
  it = pipeline.make_iterator(config)
  batches = [trainer.global_batch(exp, next(it)) for _ in range(7)]
  times = []
  for b in batches:
    t0 = time.perf_counter()
    state, metrics = fn(state, b)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  return 1000.0 * float(np.median(times[2:]))


def reference_step_ms() -> tuple[float | None, str]:
  """The newest 2B train-step time in results.jsonl (a GPU run of benchmarks/train_step.py), if any."""
  best = None
  if common.RESULTS_FILE.exists():
    for line in common.RESULTS_FILE.read_text().splitlines():
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if r.get("kind") == "train_step" and r.get("jax_step_ms") and "2b" in str(r.get("config", "")):
        best = r
  if best is None:
    return None, "no 2b train_step line in results.jsonl"
  return float(best["jax_step_ms"]), f"{best.get('device', '?')}, {best.get('date', '?')}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default=",".join(SIZES))
  p.add_argument("--stages", default=",".join(STAGES))
  p.add_argument("--workers", default="0,2", help="Grain worker processes to try (comma-separated)")
  p.add_argument("--seconds", type=float, default=8.0, help="measuring time per row")
  p.add_argument("--workdir", default=None, help="where to write the data (default: a temporary folder)")
  p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
  args = p.parse_args(argv)

  from data_pipelines import layerflow_folder, layerflow_images, layerflow_videos, pipeline

  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="data_throughput_"))
  rows, setup = [], {}
  try:
    for size in args.sizes.split(","):
      frames, height, width, batch, counts = SIZES[size]
      root = workdir / size
      t0 = time.perf_counter()
      roots = write_data(root, frames, height, width, counts)
      t_write = time.perf_counter() - t0
      config = make_config(root, roots, frames, height, width, batch)
      t0 = time.perf_counter()
      for name, module in (
        ("layerflow_folder", layerflow_folder),
        ("layerflow_images", layerflow_images),
        ("layerflow_videos", layerflow_videos),
      ):
        module.build(pipeline.source_config(config, name).data)
      t_import = time.perf_counter() - t0
      setup[size] = {
        "write_s": round(t_write, 1),
        "import_s": round(t_import, 1),
        "records": list(counts),
        "import_records_per_s": round(sum(counts) / t_import, 2),
      }
      if size == "tiny":
        c = make_config(root, roots, frames, height, width, batch)
        c.data.mixture = STAGES["stage1_base"]
        step_ms, step_src = tiny_step_ms(c), "tiny model train step, this CPU"
      else:
        step_ms, step_src = reference_step_ms()
      for stage in args.stages.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
          config.data.mixture = STAGES[stage]
          config.data.worker_count = workers
          rate, clips = measure(config, args.seconds)
          need = None if step_ms is None else batch / (step_ms / 1000.0)
          rows.append(
            {
              "size": size,
              "stage": stage,
              "workers": workers,
              "clips_per_s": round(rate, 2),
              "clips_measured": clips,
              "clips_per_step": batch,
              "pipeline_ms_per_step": round(1000.0 * batch / rate, 1),
              "step_ms": None if step_ms is None else round(step_ms, 1),
              "step_source": step_src,
              "needed_clips_per_s": None if need is None else round(need, 2),
            }
          )
          print(json.dumps(rows[-1]), flush=True)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)

  head = (
    "size",
    "stage",
    "workers",
    "clips/s/process",
    "clips/step",
    "pipeline ms/step",
    "train step ms",
    "keeps up",
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in rows:
    ok = "—" if r["step_ms"] is None else ("yes" if r["pipeline_ms_per_step"] <= r["step_ms"] else "no")
    lines.append(
      "| "
      + " | ".join(
        str(x)
        for x in (
          r["size"],
          r["stage"],
          r["workers"],
          r["clips_per_s"],
          r["clips_per_step"],
          r["pipeline_ms_per_step"],
          "—" if r["step_ms"] is None else r["step_ms"],
          ok,
        )
      )
      + " |"
    )
  print()
  print("\n".join(lines))
  print()
  for size, s in setup.items():
    print(
      f"{size}: wrote {s['records']} (videos, images, backgrounds) in {s['write_s']} s, imported in "
      f"{s['import_s']} s ({s['import_records_per_s']} records/s)"
    )
  steps = {r["size"]: r["step_source"] for r in rows}
  for size, src in steps.items():
    print(f"{size}: train step time from: {src}")
  if not args.no_record:
    common.append_jsonl(
      common.RESULTS_FILE,
      {
        "date": common.utc_now(),
        "device": device_name(),
        "kind": "data",
        "benchmark": "data_throughput",
        "seconds_per_row": args.seconds,
        "setup": setup,
        "rows": rows,
      },
    )
    print(f"appended to {common.RESULTS_FILE}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
