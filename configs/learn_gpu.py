"""The `small` model on the synthetic dataset, sized for one GPU in ≤ 15 minutes (the "prove it learns" run).

  layerflow train --config configs/learn_gpu.py --workdir runs/learn_gpu
  layerflow evaluate --checkpoint runs/learn_gpu --out runs/learn_gpu/eval

Defaults: decomposition alone for the first 3,000 steps, then all four tasks with decompose weighted 2 (others 1),
10,000 steps. What they reach, run to run, is in docs/gallery/metrics.md and benchmarks/results.jsonl (kind
``learning``; ``benchmarks/learning.py`` reruns them).

Argument variants: ``decompose_weight=W`` (task weight of decompose after the curriculum; others 1), ``steps=N``,
``given_embed=0|1``, ``curriculum=N`` (the first N steps train decomposition alone: what lets small models learn to
read the blend; 0 = off), and every argument of ``configs/default.py`` (``gpu=1``, ``layout=rgb`` …).
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common, default

# Every argument of configs/default.py (forwarded to it; size small here) and this run's own.
ARGS = dict(default.ARGS, size="small", decompose_weight=2.0, steps=10000, given_embed=True, curriculum=3000)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = common.parse_arg(arg, **ARGS)
  c = default.get_config(common.pack_arg(a, default.ARGS))
  c.model.given_embed = bool(a.given_embed)
  c.diffusion.task_weights.decompose = float(a.decompose_weight)
  c.diffusion.curriculum_steps = int(a.curriculum)
  c.diffusion.curriculum_weights = mlc.ConfigDict(dict(generate=0.0, decompose=1.0, fg2bg=0.0, bg2fg=0.0))
  c.data.num_train, c.data.num_validation = 2048, 32
  c.train.steps = int(a.steps)
  c.train.lr = 5e-4
  c.train.warmup_steps = 100
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.eval.num_batches = 4
  return c
