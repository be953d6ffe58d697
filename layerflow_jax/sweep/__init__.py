"""Ablation sweeps: a config's ``get_sweep(arg)`` expanded into runs, run locally or as a SLURM array, then tabulated.

A config file may define, next to ``get_config(arg)``::

  from layerflow_jax import sweep as hyper

  def get_sweep(arg):
    return hyper.product(hyper.axis("model.layer_embed", ["none", "text", "text+video"]),
                         hyper.axis("arg.image_weight", [0.25, 0.75]))

Each run is a dict ``{key: value}``. A key is a config key (applied like ``--config.KEY=VALUE``) or ``arg.NAME``
(appended to the config argument, ``FILE.py:...,NAME=VALUE``) for knobs that ``get_config`` derives other values from
(a data mixture, a stage's adapters). A run is named by its swept values (``layer_embed=none,image_weight=0.25``).

Work dir layout (``layerflow sweep --workdir DIR``)::

  DIR/sweep.json            the expanded sweep (spec, overrides, runs in order; SLURM tasks index it)
  DIR/<run>/run.json        what the run is (spec + overrides); a second call refuses a run dir made otherwise
  DIR/<run>/checkpoints/, metrics.jsonl, tb/   the trainer's work dir (it auto-resumes from here)
  DIR/<run>/attempts.jsonl  one line per start and per end of training (pid, steps, seconds)
  DIR/<run>/result.json     final metrics; written last and atomically, once the run's training is finished
                            (``layerflow_jax.chain.is_trained``) and measured: its presence means the run is done
  DIR/_shared/<stage>-<hash>/  earlier stages a run starts from (``train.init_from`` naming a stage of
                            ``config.stages``: ``layerflow_jax.chain``), trained once per distinct config and
                            shared between runs
  DIR/report.md, report.csv, loss_curves.png   ``layerflow sweep-report DIR``

A second ``layerflow sweep`` call skips finished runs and resumes unfinished ones from their checkpoints.
"""

from layerflow_jax.sweep.commands import COMMANDS
from layerflow_jax.sweep.dsl import ARG_PREFIX, axis, expand, product, run_name, run_spec, zipit
from layerflow_jax.sweep.plan import (
  ATTEMPTS_FILE,
  RESULT_FILE,
  RUN_FILE,
  SHARED_DIR,
  SWEEP_FILE,
  is_finished,
  prepare,
)
from layerflow_jax.sweep.report import collect, headline_columns, markdown_table, plot_losses, write_report
from layerflow_jax.sweep.runners import run_local, run_one, split_devices, write_slurm

__all__ = [
  "ARG_PREFIX",
  "ATTEMPTS_FILE",
  "COMMANDS",
  "RESULT_FILE",
  "RUN_FILE",
  "SHARED_DIR",
  "SWEEP_FILE",
  "axis",
  "collect",
  "expand",
  "headline_columns",
  "is_finished",
  "markdown_table",
  "plot_losses",
  "prepare",
  "product",
  "run_local",
  "run_name",
  "run_one",
  "run_spec",
  "split_devices",
  "write_report",
  "write_slurm",
  "zipit",
]
