"""The report of a sweep work dir: a table of every run (report.md, report.csv) and its loss curves (a PNG)."""

from __future__ import annotations

import csv
import io
import pathlib
from typing import Any, Mapping, Sequence

from layerflow_jax.config import ConfigError
from layerflow_jax.sweep.plan import (
  ATTEMPTS_FILE,
  RESULT_FILE,
  RUN_FILE,
  SHARED_DIR,
  SWEEP_FILE,
  is_finished,
  read_json,
  read_run_metrics,
)


def _runs_in(root: pathlib.Path) -> list[dict]:
  """run.json of every run dir, in sweep.json order first (shared stages excluded)."""
  order = []
  if (root / SWEEP_FILE).exists():
    order = [r["name"] for r in read_json(root / SWEEP_FILE).get("runs", [])]
  found = {p.parent.name: p for p in root.glob(f"*/{RUN_FILE}") if p.parent.name != SHARED_DIR}
  names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
  return [read_json(found[n]) for n in names]


def _status(run_dir: pathlib.Path) -> str:
  if is_finished(run_dir):
    return "done"
  if (run_dir / "error.txt").exists():
    return "failed"
  return "unfinished" if (run_dir / ATTEMPTS_FILE).exists() else "not started"


def collect(root: str | pathlib.Path) -> tuple[list[str], list[dict]]:
  """(columns, rows): swept keys, then status and metrics, one row per run."""
  root = pathlib.Path(root)
  runs = _runs_in(root)
  if not runs:
    raise ConfigError(f"{root}: no sweep runs found (expected */{RUN_FILE}; run `layerflow sweep` first)")
  swept: list[str] = []
  for r in runs:
    swept += [k for k in r.get("swept", {}) if k not in swept]
  rows, metric_keys = [], []
  for r in runs:
    d = root / r["name"]
    row = {"run": r["name"], **{k: r.get("swept", {}).get(k, "") for k in swept}, "status": _status(d)}
    if is_finished(d):
      m = read_json(d / RESULT_FILE)["metrics"]
      row.update({k: v for k, v in m.items() if k not in ("status", "finished_at")})
      metric_keys += [k for k in m if k not in metric_keys and k not in ("status", "finished_at")]
    else:
      train, _ = read_run_metrics(d)
      row["steps"] = train[-1]["step"] if train else 0
    rows.append(row)
  first = ["steps", "train_loss", "val_loss"]
  val = sorted(k for k in metric_keys if k.startswith("val_loss_"))
  layer = sorted(k for k in metric_keys if k.startswith("layer/"))
  last = ["steps_per_s", "examples_per_s", "train_seconds", "layer_metrics_seconds", "trainable_params"]
  rest = [k for k in metric_keys if k not in first + val + layer + last]
  columns = (
    ["run"]
    + swept
    + ["status"]
    + [k for k in first + val + layer + rest + last if k in metric_keys or k == "steps"]
  )
  return columns, rows


def _cell(v: Any) -> str:
  if v is None or v == "":
    return "" if v == "" else "–"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping]) -> str:
  head = [c.replace("|", "\\|") for c in columns]
  numeric = [
    any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows) for c in columns
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |")
  return "\n".join(lines)


def headline_columns(columns: Sequence[str]) -> list[str]:
  """The Markdown table's columns: swept keys, losses, the layer metrics of the demo table, throughput
  (report.csv keeps every column)."""
  from layerflow_jax.evaluate import TABLE_METRICS  # imports jax: here, not at CLI start-up

  layer = {f"layer/{key}" for key, _, _ in TABLE_METRICS}
  drop = {"train_seconds", "trainable_params", "layer_metrics_seconds"}
  return [c for c in columns if c in layer or (not c.startswith(("val_loss_", "layer/")) and c not in drop)]


def plot_losses(root: pathlib.Path, runs: Sequence[dict], out: pathlib.Path) -> pathlib.Path:
  """Training loss (raw, faint, and smoothed) and validation loss against step, one colour per run."""
  import matplotlib  # here, not at CLI start-up (only the report draws)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, r in enumerate(runs):
    train, evals = read_run_metrics(root / r["name"])
    c = colors[i % len(colors)]
    if train:
      steps = [x["step"] for x in train]
      loss = [x["loss"] for x in train]
      ax_t.plot(steps, loss, color=c, alpha=0.25, linewidth=0.8)
      smooth, s = [], None
      k = 2.0 / (1.0 + max(1.0, len(loss) / 20))  # EMA over about a twentieth of the curve
      for v in loss:
        s = v if s is None else (1 - k) * s + k * v
        smooth.append(s)
      ax_t.plot(steps, smooth, color=c, linewidth=1.6, label=r["name"])
    if evals:
      ax_v.plot([x["step"] for x in evals], [x["val_loss"] for x in evals], "o-", color=c, label=r["name"])
  for ax, title in ((ax_t, "training loss (faint: logged, solid: smoothed)"), (ax_v, "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=7)
  fig.suptitle(f"sweep {root.name}")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def write_report(root: str | pathlib.Path, out: str | pathlib.Path | None = None) -> dict[str, pathlib.Path]:
  """report.md, report.csv and loss_curves.png of a sweep work dir."""
  root = pathlib.Path(root)
  out = pathlib.Path(out) if out else root
  out.mkdir(parents=True, exist_ok=True)
  columns, rows = collect(root)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({c: ("" if r.get(c) is None else r.get(c, "")) for c in columns})
  (out / "report.csv").write_text(buf.getvalue())
  spec = read_json(root / SWEEP_FILE).get("spec", "") if (root / SWEEP_FILE).exists() else ""
  md = [
    f"# Sweep {root.name}",
    "",
    f"config: `{spec}`",
    "",
    markdown_table(headline_columns(columns), rows),
    "",
    "train_loss: mean of the last tenth of logged training losses; val_loss: fixed-noise validation loss at the "
    "end (per task in val_loss_*); layer/*: layer metrics of samples on validation clips; steps_per_s: steady "
    "rate between log rows (compilation excluded). Every column: report.csv.",
    "",
  ]
  (out / "report.md").write_text("\n".join(md))
  png = plot_losses(root, _runs_in(root), out / "loss_curves.png")
  return {"markdown": out / "report.md", "csv": out / "report.csv", "png": png}
