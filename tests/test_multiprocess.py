"""Multi-process jobs on CPU (gloo) through ``launch/local.py``.

Default suite: a lost peer, a missing peer and an unreachable coordinator each end the remaining process within
the configured timeout, with a message naming the cause (tests/mp_worker.py is the job member: it only all-gathers).
Slow: two processes train the same trajectory as one process with the same global batch, and the two-process
checkpoint restores in one process on another mesh.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from layerflow_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = ["python", "tests/mp_worker.py"]
HEARTBEAT_S = 5
INIT_S = 4


def _clean_env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "LAYERFLOW_"))}
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  )
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  return env


def _launcher(args, command) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "launch/local.py", *args, "--", *command],
    cwd=REPO,
    env=_clean_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _read_until(proc, pattern: str, lines: list, deadline: float) -> re.Match:
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    m = re.search(pattern, line)
    if m:
      return m
  raise AssertionError(f"{pattern!r} not seen; output:\n{''.join(lines)}")


@pytest.mark.parametrize("victim", [1, 0])
def test_peer_killed_other_exits_within_timeout(victim):
  """kill -9 one of two processes while they run collectives: the other ends by itself within the heartbeat
  timeout, exit status 75, with one line naming the cause (the coordinator itself may be the one killed)."""
  proc = _launcher(["-n", "2", "--init-timeout", "60", "--heartbeat-timeout", str(HEARTBEAT_S)], WORKER)
  lines: list[str] = []
  try:
    deadline = time.time() + 120
    pids = {}
    for i in range(2):
      m = _read_until(proc, rf"\[launch\] process {i} of 2: pid (\d+)", lines, deadline)
      pids[i] = int(m.group(1))
    _read_until(proc, rf"\[{1 - victim}\] step 2 of process", lines, deadline)
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.time()
    out, _ = proc.communicate(timeout=HEARTBEAT_S + 30)
    took = time.time() - killed
  finally:
    if proc.poll() is None:
      proc.kill()
  out = "".join(lines) + out
  survivor = 1 - victim
  assert took < HEARTBEAT_S + 10, f"survivor took {took:.1f} s\n{out}"
  ours = (
    f"[launch] process {survivor} exited with {distributed.EXIT_PEER_LOST}" in out
    and f"[{survivor}] layerflow: process {survivor} of 2: another process of the job stopped" in out
  )
  # When the coordinator dies while the survivor is between collectives, jax's error poller may end it first
  # (SIGABRT) with its own message; that too names the cause and is in time.
  jax_own = (
    f"[launch] process {survivor} exited with -{int(signal.SIGABRT)}" in out
    and "Terminating process because the JAX distributed service detected fatal errors. This most likely "
    "indicates that another task died"
    in out
  )
  assert ours or (victim == 0 and jax_own), out
  print(f"victim {victim}: survivor exited {took:.2f} s after the kill")


def test_hung_peer_other_exits_within_heartbeat_timeout():
  """SIGSTOP process 1 (alive but silent, sockets open: no error reaches process 0's collective): jax's heartbeat
  check ends process 0 within the heartbeat timeout, naming the unhealthy task."""
  proc = _launcher(["-n", "2", "--init-timeout", "60", "--heartbeat-timeout", str(HEARTBEAT_S)], WORKER)
  lines: list[str] = []
  pids = {}
  try:
    deadline = time.time() + 120
    for i in range(2):
      pids[i] = int(_read_until(proc, rf"\[launch\] process {i} of 2: pid (\d+)", lines, deadline).group(1))
    _read_until(proc, r"\[0\] step 2 of process", lines, deadline)
    os.kill(pids[1], signal.SIGSTOP)
    hung = time.time()
    while time.time() - hung < HEARTBEAT_S + 30:
      try:
        os.kill(pids[0], 0)  # the launcher reaps process 0 as soon as it exits
      except ProcessLookupError:
        break
      time.sleep(0.1)
    took = time.time() - hung
  finally:
    for pid in pids.values():
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  out = "".join(lines) + proc.communicate(timeout=60)[0]
  assert took < HEARTBEAT_S + 10, f"process 0 still running {took:.1f} s after its peer hung\n{out}"
  assert "[launch] process 0 exited with 0" not in out, out
  assert "another task died" in out and "stopped sending heartbeats" in out, out
  print(f"hung peer: process 0 exited {took:.2f} s after the hang (heartbeat timeout {HEARTBEAT_S} s)")


@pytest.mark.parametrize("case", ["coordinator_unreachable", "peer_never_starts"])
def test_job_that_cannot_assemble_exits_within_init_timeout(case, tmp_path):
  """Process 1 of 2 with nobody at the coordinator address, or process 0 of 2 alone: exit within the init
  timeout (+ start-up), status 75, a message naming the process, the address and the setting."""
  port = 9 if case == "coordinator_unreachable" else _free_port()
  rank = 1 if case == "coordinator_unreachable" else 0
  env = _clean_env(
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES="2",
    JAX_PROCESS_ID=str(rank),
    LAYERFLOW_INIT_TIMEOUT_S=str(INIT_S),
  )
  start = time.time()
  r = subprocess.run(
    [sys.executable, "tests/mp_worker.py"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=INIT_S + 60,
  )
  took = time.time() - start
  assert r.returncode == distributed.EXIT_PEER_LOST, r.stderr
  msg = (
    f"layerflow: process {rank} of 2 could not join the job within {INIT_S} s (LAYERFLOW_INIT_TIMEOUT_S): "
    f"the coordinator 127.0.0.1:{port} is unreachable or a peer process never started"
  )
  assert msg in r.stderr, r.stderr
  assert took < INIT_S + 20, took


def _free_port() -> int:
  sys.path.insert(0, str(REPO / "launch"))
  try:
    import local
  finally:
    sys.path.pop(0)
  return local.free_port()


def test_hybrid_mesh_puts_dcn_axis_across_processes():
  """2 processes × 2 CPU devices, ``mesh.dcn.data=2``: the data axis crosses processes, fsdp stays inside one."""
  r = subprocess.run(
    [
      sys.executable,
      "launch/local.py",
      "-n",
      "2",
      "--devices-per-process",
      "2",
      "--init-timeout",
      "60",
      "--",
      *WORKER,
      "hybrid-mesh",
    ],
    cwd=REPO,
    env=_clean_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 0, r.stdout
  for i in range(2):
    assert (
      f"[{i}] mesh {{'data': 2, 'fsdp': 2, 'tensor': 1, 'sequence': 1}} owners [[0, 0], [1, 1]]" in r.stdout
    ), r.stdout


def test_detect_launch_environment():
  d = distributed.detect
  assert d({}).method == "single"
  e = d(
    {
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3",
      "JAX_LOCAL_DEVICE_IDS": "0,1",
    }
  )
  assert (e.method, e.coordinator, e.num_processes, e.process_id, e.local_device_ids) == (
    "explicit",
    "10.0.0.1:1234",
    4,
    3,
    (0, 1),
  )
  assert (
    d({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}).method == "single"
  )
  s = d({"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5", "SLURM_JOB_ID": "1"})
  assert (s.method, s.num_processes, s.process_id) == ("slurm", 16, 5)
  assert d({"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}).method == "single"  # batch shell
  assert d({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}).method == "single"
  t = d({"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "2"})
  assert (t.method, t.num_processes, t.process_id) == ("tpu", 4, 2)
  assert (
    d({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "1", "LAYERFLOW_DISTRIBUTED": "0"}).method == "single"
  )
  with pytest.raises(ValueError, match="JAX_PROCESS_ID unset"):
    d({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="expected host:port"):
    d({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID=2 with JAX_NUM_PROCESSES=2"):
    d({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    d({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})


# ----------------------------------------------------------------------------- training across processes

TINY = [
  "data.frames=4",
  "data.height=16",
  "data.width=16",
  "data.num_train=16",
  "data.num_validation=8",
  "data.batch_size=8",
  "train.log_every=1",
  "train.warmup_steps=1",
  "eval.num_batches=1",
  "train.steps=4",
  "train.checkpoint_every=2",
]


def _flags(data_dir) -> list[str]:
  return [f"--config.data.data_dir={data_dir}"] + [f"--config.{o}" for o in TINY]


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoint_restores_in_one(tmp_path):
  """2 processes × 4 CPU devices (gloo) vs 1 process × 8 devices, same global batch: the same loss trajectory
  (1e-5); the 2-process checkpoint then restores in this single process on a 1-device mesh, equal to the
  1-process run's parameters."""
  from layerflow_jax import cli
  from layerflow_jax import sharding as shd
  from layerflow_jax.train import logging as log_lib
  from layerflow_jax.train import trainer

  data = tmp_path / "tfds"
  assert (
    cli.main(["data", "build", "layerflow_synthetic", "--config", "configs/default.py"] + _flags(data)) == 0
  )
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  train = ["layerflow", "train", "--config", "configs/default.py:size=tiny", "--no-progress"]
  start = time.time()
  r = subprocess.run(
    [
      sys.executable,
      "launch/local.py",
      "-n",
      "2",
      "--devices-per-process",
      "4",
      "--init-timeout",
      "120",
      "--heartbeat-timeout",
      "60",
      "--",
      *train,
      "--workdir",
      str(multi),
      *_flags(data),
    ],
    cwd=REPO,
    env=_clean_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  print(f"2-process run: {time.time() - start:.1f} s")
  assert r.returncode == 0, r.stdout[-4000:]
  assert "[launch] process 1 exited with 0" in r.stdout
  assert cli.main(train[1:] + ["--workdir", str(single)] + _flags(data)) == 0  # this process: 1 × 8 devices

  rows = lambda w: [(m["step"], m["loss"]) for m in log_lib.read_metrics(w) if "loss" in m]
  got, want = rows(multi), rows(single)
  assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
  assert len({round(l, 6) for _, l in want}) == 4  # a real trajectory, not a constant

  one_device = shd.make_mesh({"data": 1}, jax.devices()[:1])
  restored, _ = trainer.load_params(multi, one_device)
  reference, _ = trainer.load_params(single)
  assert set(restored) == set(reference)
  for k, v in restored.items():
    assert v.sharding.mesh.devices.size == 1
    np.testing.assert_allclose(np.asarray(v), np.asarray(reference[k]), rtol=1e-5, atol=1e-7, err_msg=k)
  ck = trainer.ckpt_lib.Checkpointer(multi)
  assert ck.steps() == [2, 4] and ck.read_meta()["step"] == 4
  ck.close()


def test_gpu_process_environment_pins_one_gpu_and_keeps_nvls_off():
  """With --gpus each process sees its own GPU, NVLink multicast is off unless the caller set it, and the fake
  CPU device count of the caller is dropped."""
  sys.path.insert(0, str(REPO / "launch"))
  try:
    import local
  finally:
    sys.path.pop(0)

  base = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"}
  kw = dict(count=4, port=1234, gpus=True, devices_per_process=1, init_timeout=60, heartbeat_timeout=30)
  env = local.process_env(base, index=2, **kw)
  assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["NCCL_NVLS_ENABLE"] == "0" and "JAX_PLATFORMS" not in env
  assert (
    env["XLA_FLAGS"] == "--xla_foo=1" and env["JAX_PROCESS_ID"] == "2" and env["JAX_NUM_PROCESSES"] == "4"
  )
  assert local.process_env({**base, "NCCL_NVLS_ENABLE": "1"}, index=0, **kw)["NCCL_NVLS_ENABLE"] == "1"
  cpu = local.process_env(base, index=0, **{**kw, "gpus": False, "devices_per_process": 2})
  assert "NCCL_NVLS_ENABLE" not in cpu and cpu["XLA_FLAGS"].endswith(
    "--xla_force_host_platform_device_count=2"
  )
