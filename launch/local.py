#!/usr/bin/env python3
"""N processes of one command on this machine, as one JAX job (CPU with gloo, or one GPU per process).

  python launch/local.py --num-processes 2 -- layerflow train --config configs/default.py:size=tiny --workdir runs/mp
  python launch/local.py --num-processes 4 --gpus -- layerflow train …          # process i sees GPU i only

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (read by
:func:`layerflow_jax.distributed.initialize`) and the timeouts ``LAYERFLOW_INIT_TIMEOUT_S`` /
``LAYERFLOW_HEARTBEAT_TIMEOUT_S``. On CPU each process fakes ``--devices-per-process`` host devices. A leading
``layerflow`` in the command runs this interpreter's ``layerflow_jax.cli`` (no installed script needed).

Output lines are prefixed ``[i]``. The launcher waits for every process and does not kill the others when one
fails: a lost peer must end the rest by itself, within the timeouts. SIGINT/SIGTERM are forwarded to all (the
trainer then saves and exits). The exit status is the first non-zero one, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Sequence


def free_port() -> int:
  """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  base: dict,
  *,
  index: int,
  count: int,
  port: int,
  gpus: bool,
  devices_per_process: int,
  init_timeout: int,
  heartbeat_timeout: int,
) -> dict:
  """The environment of process ``index`` of ``count``."""
  env = dict(base)
  env.update(
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES=str(count),
    JAX_PROCESS_ID=str(index),
    LAYERFLOW_INIT_TIMEOUT_S=str(init_timeout),
    LAYERFLOW_HEARTBEAT_TIMEOUT_S=str(heartbeat_timeout),
    PYTHONUNBUFFERED="1",
  )
  flags = [
    f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  if gpus:
    env["CUDA_VISIBLE_DEVICES"] = str(index)  # one GPU each; NCCL carries the collectives
    # NVLink multicast (NVLS) off unless the caller says otherwise: the lent multi-GPU hosts need it off, and
    # NCCL falls back to its ring/tree algorithms at a small cost in all-reduce bandwidth.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.pop("JAX_PLATFORMS", None)
  else:
    env["JAX_PLATFORMS"] = "cpu"
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def command_line(command: Sequence[str]) -> list[str]:
  command = list(command)
  if command and command[0] == "layerflow":
    return [sys.executable, "-m", "layerflow_jax.cli"] + command[1:]
  if command and command[0] == "python":
    return [sys.executable] + command[1:]
  return command


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode(errors="replace"))
    out.flush()


def launch(
  command: Sequence[str],
  *,
  num_processes: int,
  gpus: bool = False,
  devices_per_process: int = 1,
  port: int | None = None,
  init_timeout: int = 300,
  heartbeat_timeout: int = 100,
  cwd: str | None = None,
) -> int:
  """Runs ``command`` as ``num_processes`` processes of one job; returns the job's exit status."""
  if num_processes < 1:
    raise SystemExit(f"error: --num-processes {num_processes}: expected at least 1")
  if devices_per_process < 1:
    raise SystemExit(f"error: --devices-per-process {devices_per_process}: expected at least 1")
  if not command:
    raise SystemExit("error: no command given (put it after --, e.g. -- layerflow train --config …)")
  port = port or free_port()
  argv = command_line(command)
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(
      os.environ,
      index=i,
      count=num_processes,
      port=port,
      gpus=gpus,
      devices_per_process=devices_per_process,
      init_timeout=init_timeout,
      heartbeat_timeout=heartbeat_timeout,
    )
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(f"[launch] process {i} of {num_processes}: pid {p.pid} (coordinator 127.0.0.1:{port})", flush=True)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout), daemon=True)
    t.start()
    pumps.append(t)

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    codes = [p.wait() for p in procs]
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  for t in pumps:
    t.join(timeout=5)
  for i, c in enumerate(codes):
    print(f"[launch] process {i} exited with {c}", flush=True)
  return next((c if c > 0 else 128 - c for c in codes if c != 0), 0)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    cut = argv.index("--")
    argv, command = argv[:cut], argv[cut + 1 :]
  else:
    command = []
  p = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.splitlines()[0])
  p.add_argument("--num-processes", "-n", type=int, default=2)
  p.add_argument(
    "--gpus", action="store_true", help="one GPU per process (CUDA_VISIBLE_DEVICES=i) instead of CPU"
  )
  p.add_argument("--devices-per-process", type=int, default=1, help="CPU only: fake host devices per process")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  p.add_argument("--init-timeout", type=int, default=300, help="seconds for all processes to join")
  p.add_argument(
    "--heartbeat-timeout", type=int, default=100, help="seconds before a silent peer ends the job"
  )
  args = p.parse_args(argv)
  return launch(
    command,
    num_processes=args.num_processes,
    gpus=args.gpus,
    devices_per_process=args.devices_per_process,
    port=args.port,
    init_timeout=args.init_timeout,
    heartbeat_timeout=args.heartbeat_timeout,
  )


if __name__ == "__main__":
  sys.exit(main())
