"""Where a step's device time goes: a per-category table of GPU kernel time from a ``jax.profiler`` trace.

``train_step.py --profile DIR`` traces two more steps per mode with ``create_perfetto_trace=True``; this reads the
``perfetto_trace.json.gz`` under a directory (Chrome trace-event JSON), keeps the kernels of the device processes
(``/device:GPU:N`` … ``Stream`` threads), sorts each kernel into a category by its name and prints, per step:
the kernel time per category, the busy time (union of kernel intervals), the idle gap to the traced span, and the
top kernels.

  python benchmarks/profile_summary.py /tmp/prof/train --steps 2
  python benchmarks/profile_summary.py TRACE_DIR --json out.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
from typing import Any

# First match wins; names are lower-cased kernel names (cuDNN, cuBLAS, XLA fusions, Triton).
CATEGORIES: tuple[tuple[str, str], ...] = (
  (
    "attention bwd",
    r"(fmha|flash|sdpa|attention).*(bprop|bwd|backward|dgrad|dq|dkv)|(bprop|bwd).*(fmha|flash|sdpa)",
  ),
  ("attention fwd", r"fmha|flash|sdpa|attention"),
  ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_|ampere_|hopper_|dot"),
  ("memcpy/memset", r"memcpy|memset|copy_kernel"),
  ("transpose/copy fusions", r"transpose|^copy|_copy"),
  ("reductions", r"reduce|reduction|norm"),
  ("elementwise fusions", r"fusion|loop_|kernel|triton"),
)


def find_trace(path: pathlib.Path) -> pathlib.Path:
  if path.is_file():
    return path
  found = sorted(path.rglob("perfetto_trace.json.gz")) or sorted(path.rglob("*.trace.json.gz"))
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz (or *.trace.json.gz) under {path}")
  return found[-1]


def load_events(path: pathlib.Path) -> list[dict]:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def categorize(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b <= end:
      continue
    total += b - max(a, end)
    end = b
  return total


def summarize(events: list[dict], steps: int = 1) -> dict[str, Any]:
  """Kernel time (ms per step) by category over the device processes' stream threads."""
  pnames = {
    e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  tnames = {
    (e["pid"], e.get("tid")): e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  device_pids = {p for p, n in pnames.items() if "/device:" in n and "cpu" not in n.lower()}
  kernels = [
    e
    for e in events
    if e.get("ph") == "X"
    and e.get("pid") in device_pids
    and "stream" in tnames.get((e["pid"], e.get("tid")), "").lower()
    and e.get("dur") is not None
  ]
  if not kernels:
    raise ValueError(f"no device kernels in the trace (processes: {sorted(set(pnames.values()))})")
  by_cat: dict[str, float] = collections.defaultdict(float)
  by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in kernels:
    by_cat[categorize(e["name"])] += e["dur"]
    by_name[e["name"]][0] += e["dur"]
    by_name[e["name"]][1] += 1
  span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
  busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
  per = 1e-3 / steps  # µs → ms per step
  top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:20]
  return {
    "steps": steps,
    "kernels": len(kernels),
    "span_ms": span * per,
    "busy_ms": busy * per,
    "idle_ms": (span - busy) * per,
    "kernel_sum_ms": sum(by_cat.values()) * per,
    "by_category_ms": {k: v * per for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
    "top_kernels": [
      {"name": n[:120], "ms": t * per, "calls": c / steps, "category": categorize(n)} for n, (t, c) in top
    ],
  }


def format_table(s: dict[str, Any]) -> str:
  lines = [
    f"per step (of {s['steps']} traced): span {s['span_ms']:.1f} ms, kernels busy {s['busy_ms']:.1f} ms, "
    f"idle {s['idle_ms']:.1f} ms; {s['kernels'] / s['steps']:.0f} kernels",
    f"{'category':<26}{'ms/step':>10}{'share':>8}",
  ]
  total = s["kernel_sum_ms"] or 1.0
  for k, v in s["by_category_ms"].items():
    lines.append(f"{k:<26}{v:>10.1f}{100 * v / total:>7.1f}%")
  lines.append(f"{'top kernels':<90}{'ms/step':>9}{'calls':>7}")
  for t in s["top_kernels"]:
    lines.append(f"{t['name'][:88]:<90}{t['ms']:>9.1f}{t['calls']:>7.0f}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("trace", help="a perfetto_trace.json.gz or a directory holding one")
  p.add_argument("--steps", type=int, default=2, help="steps in the trace (the table is per step)")
  p.add_argument("--json", default="", help="also write the summary here")
  args = p.parse_args(argv)
  s = summarize(load_events(find_trace(pathlib.Path(args.trace))), args.steps)
  print(format_table(s))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(s, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
