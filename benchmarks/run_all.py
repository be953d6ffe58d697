"""Issue 6 in one command: the JAX train step, LoRA step and sampler against the diffusers peer, one table.

Every part runs in a subprocess (JAX and PyTorch never share a process, and GPU memory is freed between them);
consecutive parts of the same side share one process (two processes for everything). Parts run in this order,
within a wall-clock budget:

  peer_train → peer_sample → jax_train → jax_sample → jax_lora

(the two train steps of the ratio first; the peer's compiled first step alone takes minutes, and the JAX process
then pays its start-up once for all three parts). A process whose first part no longer fits the estimate is skipped
(and says so); a process still running at the budget is stopped, keeping the parts it finished (each script
rewrites its results after every part). Each run appends JSON lines to ``benchmarks/results.jsonl`` (kinds
``train_step`` — the stage-3 LoRA step, then the full step — and ``sampling``); with ``$OUT`` set (the device
machine) the new lines and the logs are also written there.

  python benchmarks/run_all.py                                   # everything, 2B shape, ~10 min on one H100/H200
  python benchmarks/run_all.py --parts jax_train,peer_train      # only the train-step comparison
  python benchmarks/run_all.py --jax-args "--remat full --xla-preset none"   # a lever setting
  python benchmarks/run_all.py --precisions bf16,fp8_gemm --parts jax_train,jax_lora   # model.precision side by side

``--precisions`` runs the JAX parts once per ``model.precision`` (``--precision`` of train_step.py; the peer once,
with the first), one table and one set of JSON lines each; a part a precision cannot run (FP8 attention trains
nowhere here) is refused by ``validate`` in seconds and noted.
  python benchmarks/run_all.py --tiny --budget-s 0               # CPU check of every part (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common as bc  # noqa: E402

PARTS = ("peer_train", "peer_sample", "jax_train", "jax_sample", "jax_lora")
MODE = {
  "jax_train": "train",
  "jax_lora": "lora",
  "jax_sample": "sample",
  "peer_train": "train",
  "peer_sample": "sample",
}
# Seconds a part takes — for the budget only. 2B on one H100/H200 (guesses until measured): JAX compile ~60 s +
# steps; the peer's compiled first step ~220 s (less with a warm inductor cache); 50 CFG sampling steps ~40-60 s.
ESTIMATE_S = {
  "2b": {"peer_train": 250, "peer_sample": 60, "jax_train": 100, "jax_sample": 75, "jax_lora": 90},
  "tiny": {"jax_train": 60, "peer_train": 200, "peer_sample": 10, "jax_sample": 30, "jax_lora": 40},
}
PROCESS_START_S = 15
TARGETS = {"step_ms": 1300.0, "vs_peer": 0.74, "tflops": 400.0, "first_step_s": 60.0, "sampling_speedup": 1.3}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
  p.add_argument("--shape", default="2b", choices=sorted(bc.SHAPES))
  p.add_argument("--tiny", action="store_true", help="same as --shape tiny")
  p.add_argument(
    "--budget-s",
    type=float,
    default=None,
    help="wall-clock budget in seconds (default 580 for 2b, unlimited for tiny; 0 = unlimited)",
  )
  p.add_argument("--steps", type=int, default=5, help="timed train steps per side (median)")
  p.add_argument("--sample-steps", type=int, default=50)
  p.add_argument("--jax-args", default="", help="extra train_step.py flags (levers), e.g. '--remat full'")
  p.add_argument(
    "--precisions",
    default="bf16",
    help="comma-separated model.precision values; the JAX parts run once for each (train_step.py "
    "--precision)",
  )
  p.add_argument("--peer-args", default="", help="extra torch_peer.py flags, e.g. '--compile none'")
  p.add_argument("--results", default=str(bc.RESULTS_FILE), help="JSON-lines file to append to ('' = none)")
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
  p.add_argument(
    "--check",
    action="store_true",
    help="only import each side's script (missing packages show here, in seconds) and exit",
  )
  args = p.parse_args(argv)
  if args.tiny:
    args.shape = "tiny"
  args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
  args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()] or ["bf16"]
  bad = [x for x in args.parts if x not in PARTS]
  if bad or not args.parts:
    p.error(f"--parts: {bad or args.parts} not in {PARTS}")
  if args.budget_s is None:
    args.budget_s = 580.0 if args.shape == "2b" else 0.0
  return args


def groups(parts: list[str]) -> list[tuple[str, list[str]]]:
  """Parts in priority order, consecutive parts of one side merged into one process: [(side, parts)]."""
  ordered = [x for x in PARTS if x in parts]
  out: list[tuple[str, list[str]]] = []
  for part in ordered:
    side = part.split("_")[0]
    if out and out[-1][0] == side:
      out[-1][1].append(part)
    else:
      out.append((side, [part]))
  return out


def command(
  args, side: str, parts: list[str], out_json: str, matmul: float | None, precision: str = "bf16"
) -> list[str]:
  modes = ",".join(MODE[x] for x in parts)
  common = [
    "--shape",
    args.shape,
    "--modes",
    modes,
    "--steps",
    str(args.steps),
    "--sample-steps",
    str(args.sample_steps),
    "--out-json",
    out_json,
  ]
  if side == "jax":
    return [
      args.python,
      str(bc.ROOT / "benchmarks" / "train_step.py"),
      *common,
      "--precision",
      precision,
      *shlex.split(args.jax_args),
    ]
  extra = ["--matmul-tflops", str(matmul)] if matmul else []
  return [
    args.python,
    str(bc.ROOT / "benchmarks" / "torch_peer.py"),
    *common,
    *extra,
    *shlex.split(args.peer_args),
  ]


def run_process(cmd: list[str], log: pathlib.Path, timeout: float | None) -> tuple[int | None, float]:
  """Runs ``cmd`` in its own session with output to ``log``; stops it (the whole group) at ``timeout``."""
  t0 = time.perf_counter()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  with open(log, "w") as f:
    proc = subprocess.Popen(
      cmd, stdout=f, stderr=subprocess.STDOUT, cwd=bc.ROOT, env=env, start_new_session=True
    )
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      rc = None
  return rc, time.perf_counter() - t0


def tail(path: pathlib.Path, n: int = 25) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
  except OSError:
    return ""


# ----------------------------------------------------------------------------- table and records


def _fmt(v: Any, spec: str = "") -> str:
  if v is None:
    return "-"
  if isinstance(v, float) and spec:
    return format(v, spec)
  return str(v)


def _pct(v: float | None) -> str:
  return "-" if v is None else f"{100 * v:.1f}%"


def table(res: dict[str, dict], matmul: float | None) -> str:
  jt, pt, lo = res.get("jax_train", {}), res.get("peer_train", {}), res.get("jax_lora", {})
  js, ps = res.get("jax_sample", {}), res.get("peer_sample", {})
  dev = next((r.get("device") for r in res.values() if r.get("device")), "?")
  peak = bc.spec_peak(dev)
  rows = [("", "JAX", "peer", "peer / JAX")]

  def ratio(a, b):
    return f"{b / a:.2f}x" if a and b else "-"

  def mfu(r, ref):
    return _pct(r["model_tflops"] / ref) if r.get("model_tflops") and ref else "-"

  rows += [
    (
      "train step (ms, median)",
      _fmt(jt.get("step_ms"), ".1f"),
      _fmt(pt.get("step_ms"), ".1f"),
      ratio(jt.get("step_ms"), pt.get("step_ms")),
    ),
    ("first step (s)", _fmt(jt.get("first_step_s"), ".1f"), _fmt(pt.get("first_step_s"), ".1f"), ""),
    ("  of which compile (s)", _fmt(jt.get("compile_s"), ".1f"), "-", ""),
    ("warm-up steps after it (s)", _fmt(jt.get("warmup_s"), ".1f"), _fmt(pt.get("warmup_s"), ".1f"), ""),
    ("tokens/s", _fmt(jt.get("tokens_per_s"), ".0f"), _fmt(pt.get("tokens_per_s"), ".0f"), ""),
    ("model TFLOP/s", _fmt(jt.get("model_tflops")), _fmt(pt.get("model_tflops")), ""),
    (f"MFU vs bf16 matmul ({_fmt(matmul)} TFLOP/s)", mfu(jt, matmul), mfu(pt, matmul), ""),
    (
      f"MFU vs datasheet ({_fmt(peak and peak / 1e12)} TFLOP/s)",
      mfu(jt, peak and peak / 1e12),
      mfu(pt, peak and peak / 1e12),
      "",
    ),
    ("peak memory (GiB)", _fmt(jt.get("peak_mem_gib")), _fmt(pt.get("peak_mem_gib")), ""),
    (
      "LoRA step (ms) [stage 3]",
      _fmt(lo.get("step_ms"), ".1f"),
      "-",
      f"{lo['step_ms'] / jt['step_ms']:.2f}x of full" if lo.get("step_ms") and jt.get("step_ms") else "",
    ),
    (
      f"sampling {js.get('num_steps') or ps.get('num_steps') or ''} steps CFG (s)",
      _fmt(js.get("sample_s"), ".2f"),
      _fmt(ps.get("sample_s"), ".2f"),
      ratio(js.get("sample_s"), ps.get("sample_s")),
    ),
    ("  per step (ms)", _fmt(js.get("step_ms"), ".1f"), _fmt(ps.get("step_ms"), ".1f"), ""),
    (
      "  sampling compile / warm-up (s)",
      _fmt(js.get("compile_s"), ".1f"),
      _fmt(ps.get("warmup_s"), ".1f"),
      "",
    ),
  ]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = [
    "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
  ]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def target_lines(res: dict[str, dict]) -> list[str]:
  """The issue's 'done when' checks (meaningful on the 2B shape)."""
  jt, pt, lo = res.get("jax_train", {}), res.get("peer_train", {}), res.get("jax_lora", {})
  js, ps = res.get("jax_sample", {}), res.get("peer_sample", {})
  out = []

  def check(name, ok):
    out.append(f"  [{'-' if ok is None else ('PASS' if ok else 'MISS')}] {name}")

  s = jt.get("step_ms")
  check(f"JAX full step <= {TARGETS['step_ms']:.0f} ms", None if s is None else s <= TARGETS["step_ms"])
  check(
    f"JAX step <= {TARGETS['vs_peer']} x peer",
    None if not (s and pt.get("step_ms")) else s <= TARGETS["vs_peer"] * pt["step_ms"],
  )
  t = jt.get("model_tflops")
  check(f">= {TARGETS['tflops']:.0f} model TFLOP/s", None if t is None else t >= TARGETS["tflops"])
  f = jt.get("first_step_s")
  check(f"first step <= {TARGETS['first_step_s']:.0f} s", None if f is None else f <= TARGETS["first_step_s"])
  check("LoRA step faster than the full step", None if not (lo.get("step_ms") and s) else lo["step_ms"] < s)
  check(
    f"sampling >= {TARGETS['sampling_speedup']}x the peer",
    None
    if not (js.get("sample_s") and ps.get("sample_s"))
    else ps["sample_s"] / js["sample_s"] >= TARGETS["sampling_speedup"],
  )
  return out


def records(res: dict[str, dict], matmul: float | None, args) -> list[dict[str, Any]]:
  """The JSON lines of this run (fields named by the issue first, then context). The LoRA line comes before the
  full step's, so the newest ``train_step`` line of a run is the full step (``data_throughput.py`` reads it)."""
  jt, pt, lo = res.get("jax_train", {}), res.get("peer_train", {}), res.get("jax_lora", {})
  js, ps = res.get("jax_sample", {}), res.get("peer_sample", {})
  date = bc.utc_now()
  device = next((r.get("device") for r in (jt, lo, js, pt, ps) if r.get("device")), None)
  jax_version = next((r.get("jax_version") for r in (jt, lo, js) if r.get("jax_version")), None)
  torch_version = next((r.get("torch_version") for r in (pt, ps) if r.get("torch_version")), None)
  common = {"shape": args.shape, "jax_args": args.jax_args, "peer_args": args.peer_args}
  out = []
  if lo:
    out.append(
      {
        "date": date,
        "device": device,
        "kind": "train_step",
        "step": "lora_stage3",
        "config": lo.get("config"),
        "jax_version": jax_version,
        "torch_version": torch_version,
        "jax_step_ms": lo.get("step_ms"),
        "peer_step_ms": None,
        "model_tflops": lo.get("model_tflops"),
        "matmul_tflops": matmul,
        "mfu": lo.get("mfu"),
        "compile_s": lo.get("compile_s"),
        "peak_mem_gib": lo.get("peak_mem_gib"),
        "first_step_s": lo.get("first_step_s"),
        "flops_formula": lo.get("flops_formula"),
        "full_step_ms": jt.get("step_ms"),
        "lora_vs_full": round(lo["step_ms"] / jt["step_ms"], 3)
        if lo.get("step_ms") and jt.get("step_ms")
        else None,
        "adapters": lo.get("adapters"),
        "trained_adapters": lo.get("trained_adapters"),
        "exe_mem_gib": lo.get("exe_mem_gib"),
        "levers": lo.get("levers"),
        "error": lo.get("error"),
        **common,
      }
    )
  if jt or pt:
    out.append(
      {
        "date": date,
        "device": device,
        "kind": "train_step",
        "step": "full",
        "config": jt.get("config"),
        "jax_version": jax_version,
        "torch_version": torch_version,
        "jax_step_ms": jt.get("step_ms"),
        "peer_step_ms": pt.get("step_ms"),
        "model_tflops": jt.get("model_tflops"),
        "matmul_tflops": matmul,
        "mfu": jt.get("mfu"),
        "compile_s": jt.get("compile_s"),
        "peak_mem_gib": jt.get("peak_mem_gib"),
        "first_step_s": jt.get("first_step_s"),
        "tokens_per_s": jt.get("tokens_per_s"),
        "speedup": round(pt["step_ms"] / jt["step_ms"], 3)
        if jt.get("step_ms") and pt.get("step_ms")
        else None,
        "mfu_spec": jt.get("mfu_spec"),
        "exe_mem_gib": jt.get("exe_mem_gib"),
        "attention_kernels": jt.get("attention_kernels"),
        "levers": jt.get("levers"),
        "jax_step_ms_all": jt.get("step_ms_all"),
        "peer_step_ms_all": pt.get("step_ms_all"),
        "peer_first_step_s": pt.get("first_step_s"),
        "peer_model_tflops": pt.get("model_tflops"),
        "peer_mfu": bc.sig(pt["model_tflops"] / matmul, 3) if pt.get("model_tflops") and matmul else None,
        "peer_peak_mem_gib": pt.get("peak_mem_gib"),
        "peer_setup": pt.get("setup"),
        "diffusers_version": pt.get("diffusers_version"),
        "errors": {k: r["error"] for k, r in (("jax", jt), ("peer", pt)) if r.get("error")} or None,
        **common,
      }
    )
  if js or ps:
    out.append(
      {
        "date": date,
        "device": device,
        "kind": "sampling",
        "config": js.get("config"),
        "jax_version": jax_version,
        "torch_version": torch_version,
        "sampler": "ddim (trailing), CFG on the doubled batch",
        "num_steps": js.get("num_steps") or ps.get("num_steps"),
        "guidance_scale": js.get("guidance_scale") or ps.get("guidance_scale"),
        "jax_sample_s": js.get("sample_s"),
        "peer_sample_s": ps.get("sample_s"),
        "speedup": round(ps["sample_s"] / js["sample_s"], 3)
        if js.get("sample_s") and ps.get("sample_s")
        else None,
        "jax_step_ms": js.get("step_ms"),
        "peer_step_ms": ps.get("step_ms"),
        "model_tflops": js.get("model_tflops"),
        "peer_model_tflops": ps.get("model_tflops"),
        "matmul_tflops": matmul,
        "mfu": js.get("mfu"),
        "compile_s": js.get("compile_s"),
        "peak_mem_gib": js.get("peak_mem_gib"),
        "exe_mem_gib": js.get("exe_mem_gib"),
        "peer_peak_mem_gib": ps.get("peak_mem_gib"),
        "peer_setup": ps.get("setup"),
        "levers": js.get("levers"),
        "errors": {k: r["error"] for k, r in (("jax", js), ("peer", ps)) if r.get("error")} or None,
        **common,
      }
    )
  return out


# ----------------------------------------------------------------------------- main


def check_imports(args) -> int:
  """Imports both scripts (jax side, torch side) in fresh interpreters: the cheap first call on a new machine."""
  bad = 0
  for module in ("benchmarks.train_step", "benchmarks.torch_peer"):
    code = f"import sys; sys.argv = ['x']; import {module}; print('{module}: ok')"
    proc = subprocess.run([args.python, "-c", code], cwd=bc.ROOT, capture_output=True, text=True)
    print(proc.stdout.strip() or f"{module}: FAILED\n{proc.stderr.strip()[-2000:]}")
    bad += proc.returncode != 0
  return 1 if bad else 0


def runs(args) -> list[tuple[str, list[str], str | None]]:
  """The processes in order: [(side, parts, precision)] — the peer's once (precision None), the JAX side's once per
  ``--precisions`` entry."""
  out: list[tuple[str, list[str], str | None]] = []
  for side, parts in groups(args.parts):
    if side == "jax":
      out += [(side, parts, p) for p in args.precisions]
    else:
      out.append((side, parts, None))
  return out


def main(args: argparse.Namespace) -> int:
  if args.check:
    return check_imports(args)
  t_start = time.perf_counter()
  est = ESTIMATE_S[args.shape]
  out_dir = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None
  log_dir = (out_dir / "logs") if out_dir else pathlib.Path(tempfile.mkdtemp(prefix="layerflow_bench_"))
  log_dir.mkdir(parents=True, exist_ok=True)
  peer: dict[str, dict] = {}
  jax_res: dict[str, dict[str, dict]] = {p: {} for p in args.precisions}  # precision → part → record
  notes: list[str] = []
  matmul: float | None = None
  plan = runs(args)
  print(f"shape: {bc.SHAPES[args.shape].describe()}", flush=True)
  print(
    f"plan: {' | '.join(side + '[' + ','.join(p) + ']' + (f' {pr}' if pr else '') for side, p, pr in plan)}; "
    f"budget {args.budget_s or 'unlimited'} s; logs in {log_dir}",
    flush=True,
  )

  for side, parts, precision in plan:
    elapsed = time.perf_counter() - t_start
    remaining = args.budget_s - elapsed if args.budget_s else None
    tag = f" [{precision}]" if precision else ""
    if remaining is not None and PROCESS_START_S + est[parts[0]] > remaining:
      notes += [
        f"{part}{tag}: skipped (estimated {est[part]} s; {remaining:.0f} s of the budget left)"
        for part in parts
      ]
      continue
    name = f"{side}_{'_'.join(MODE[x] for x in parts)}" + (f"_{precision}" if precision else "")
    out_json = str(log_dir / f"{name}.json")
    cmd = command(args, side, parts, out_json, matmul, precision or "bf16")
    log = log_dir / f"{name}.log"
    print(f"\n[{elapsed:6.0f} s] {side}: {','.join(parts)}{tag}\n  $ {shlex.join(cmd)}", flush=True)
    if args.dry_run:
      continue
    rc, wall = run_process(cmd, log, remaining)
    got = json.loads(pathlib.Path(out_json).read_text()) if pathlib.Path(out_json).exists() else []
    by_mode = {r["mode"]: r for r in got}
    res = jax_res[precision] if side == "jax" else peer
    for part in parts:
      r = by_mode.get(MODE[part])
      if r is None:
        why = "stopped at the budget" if rc is None else f"exited with {rc} before finishing"
        notes.append(f"{part}{tag}: no result ({why}; log {log})")
        continue
      res[part] = r
      if r.get("error"):
        notes.append(f"{part}{tag}: ERROR {r['error'][:300]}")
      if side == "jax" and matmul is None and r.get("matmul_tflops"):
        matmul = r["matmul_tflops"]
    status = "timed out (budget)" if rc is None else f"rc={rc}"
    print(f"  done in {wall:.0f} s ({status}); log {log}", flush=True)
    if rc not in (0,):
      print("  --- last lines of the log ---\n" + tail(log), flush=True)

  if args.dry_run:
    return 0
  recs: list[dict[str, Any]] = []
  for precision in args.precisions:
    res = {**peer, **jax_res[precision]}
    print(f"\n== issue 6 benchmark: {bc.SHAPES[args.shape].describe()}; model.precision={precision}")
    print(
      f"device: {next((r.get('device') for r in res.values() if r.get('device')), '?')}; "
      f"jax levers: {res.get('jax_train', res.get('jax_sample', {})).get('levers')}"
    )
    print(table(res, matmul))
    if args.shape == "2b":
      print("targets (issue 6):")
      print("\n".join(target_lines(res)))
    recs += [dict(r, precision=precision) for r in records(res, matmul, args)]
  for n in notes:
    print("note: " + n)
  lines = "".join(json.dumps(r, default=str) + "\n" for r in recs)
  if args.results and recs:
    with open(args.results, "a") as f:
      f.write(lines)
    print(f"appended {len(recs)} line(s) to {args.results}")
  if out_dir and recs:
    (out_dir / "results_new.jsonl").write_text(lines)
    print(f"and wrote them to {out_dir / 'results_new.jsonl'}")
  print(f"total wall time {time.perf_counter() - t_start:.0f} s")
  got = [r for res in [peer, *jax_res.values()] for r in res.values()]
  return 0 if got and not any(r.get("error") for r in got) else 1


if __name__ == "__main__":
  sys.exit(main(parse_args()))
