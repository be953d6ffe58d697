"""The one data path across topologies: the stage-3 mixture gives the same global batch at every step on 1, 2 and
4 JAX processes, and on one process the demo's stages and the default config read exactly the batches they read
before the data path was unified (tests/golden/demo_batch_hashes.json, made on main at aad23ae).

Regenerate the golden hashes only for an intended change of data order (it changes the demo's results):
``python tests/test_data_topology.py DATA_DIR tests/golden/demo_batch_hashes.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from data_pipelines import pipeline, registry
from layerflow_jax.config import load_config

GOLDEN = pathlib.Path(__file__).parent / "golden" / "demo_batch_hashes.json"
DEMO_SPECS = (
  "configs/stages.py:demo,stage=stage1_base",
  "configs/stages.py:demo,stage=stage2_motion_lora",
  "configs/stages.py:demo,stage=stage3_content_lora",
  "configs/default.py",
)
NUM_BATCHES = 30
STAGE3 = "configs/stages.py:stage=stage3_content_lora"
# 20 records (not a multiple of the global batch of 8, so batches straddle epochs), every random step on.
STAGE3_DATA = [
  "data.num_train=20",
  "data.num_validation=4",
  "data.batch_size=8",
  "data.random_crop=0.5",
  "data.prompt_dropout=0.2",
  "data.max_frame_stride=2",
]
STEPS = 8


def digest(batch: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(batch):
    a = np.ascontiguousarray(batch[k])
    h.update(f"{k}{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def build(config) -> None:
  for name in dict.fromkeys(
    [config.data.name] + [e.get("name", config.data.name) for e in config.data.mixture]
  ):
    registry.build(pipeline.source_config(config, name).data)


def demo_hashes(data_dir: str) -> dict[str, list[str]]:
  """Hashes of the first train batches and of every validation batch of each demo stage and the default
  config, on one process."""
  out = {}
  for spec in DEMO_SPECS:
    c = load_config(spec, [f"data.data_dir={data_dir!r}"])
    build(c)
    it = pipeline.make_iterator(c, "train")
    out[spec] = [digest(next(it)) for _ in range(NUM_BATCHES)]
    val = pipeline.make_dataset(c, "validation")
    out[spec + " validation"] = [digest(val[i]) for i in range(len(val))]
  return out


def test_one_process_reads_the_demo_batches_of_before(tmp_path):
  """Byte-identical batches (contents and order) for the demo's three stages and configs/default.py."""
  want = json.loads(GOLDEN.read_text())["batches"]
  got = demo_hashes(str(tmp_path / "tfds"))
  assert set(got) == set(want)
  for key in want:
    assert got[key] == want[key], key


_WORKER = r"""
import json, sys, types
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
n, rank, port, spec, data_dir, overrides, steps, out = sys.argv[1:9]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(n), process_id=int(rank))
from jax.experimental import multihost_utils
from data_pipelines import pipeline, spec as spec_lib
from layerflow_jax import sharding as shd
from layerflow_jax.config import load_config
from layerflow_jax.train import trainer
from tests.test_data_topology import digest

config = load_config(spec, [f"data.data_dir={data_dir!r}"] + json.loads(overrides))
mesh = shd.make_mesh(config.mesh)
exp = types.SimpleNamespace(batch_spec=spec_lib.batch_spec(config, mesh))  # all global_batch reads
it = pipeline.make_iterator(config, shard_index=jax.process_index(), shard_count=jax.process_count())
hashes, rows = [], []
for _ in range(int(steps)):
  local = next(it)
  rows.append(len(local["motion_scale"]))
  batch = trainer.global_batch(exp, local)
  hashes.append(digest({k: multihost_utils.process_allgather(v, tiled=True) for k, v in batch.items()}))
if jax.process_index() == 0:
  json.dump({"hashes": hashes, "rows": rows, "devices": jax.device_count()}, open(out, "w"))
jax.distributed.shutdown()
"""


def _run_job(n: int, tmp_path: pathlib.Path, data_dir: str, repo_root: pathlib.Path) -> dict:
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / f"job{n}.json"
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "PYTHONPATH": str(repo_root),
  }
  argv = [str(n), "RANK", str(port), STAGE3, data_dir, json.dumps(STAGE3_DATA), str(STEPS), str(out)]
  procs = [
    subprocess.Popen(
      [sys.executable, str(script)] + [str(r) if a == "RANK" else a for a in argv],
      env=env,
      cwd=repo_root,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for r in range(n)
  ]
  logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return json.loads(out.read_text())


def test_stage3_mixture_global_batches_are_the_same_on_1_2_and_4_processes(tmp_path, repo_root):
  """The content-LoRA stage's mixture (static layered clips, motion scale 1, mixed with copy-paste videos, motion
  scale 0), with random crops, strides and prompt dropout: step by step the same global batch for any number of
  processes, each process holding its block of 8 / n rows."""
  data_dir = str(tmp_path / "tfds")
  config = load_config(STAGE3, [f"data.data_dir={data_dir!r}"] + STAGE3_DATA)
  assert [e["transform"] for e in config.data.mixture] == ["static", "video"] and config.data.mixture[1][
    "background"
  ]
  build(config)
  one = pipeline.make_dataset(config)
  want = [digest(one[i]) for i in range(STEPS)]
  scales = np.concatenate([one[i]["motion_scale"] for i in range(STEPS)])
  assert set(scales.tolist()) == {0.0, 1.0}  # both entries, switched per sample
  assert len(set(want)) == STEPS
  for n in (2, 4):
    job = _run_job(n, tmp_path, data_dir, repo_root)
    assert job["devices"] == 2 * n and job["rows"] == [8 // n] * STEPS
    assert job["hashes"] == want, f"{n} processes"


if __name__ == "__main__":  # regenerate the golden hashes: DATA_DIR OUT
  GOLDEN_OUT = pathlib.Path(sys.argv[2])
  GOLDEN_OUT.write_text(json.dumps({"made_at": "regenerated", "batches": demo_hashes(sys.argv[1])}, indent=1))
