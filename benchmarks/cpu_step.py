"""Where a tiny CPU train step spends its time: the demo's step, and its attention alone, per implementation.

The demo (``configs/stages.py:demo``) trains on the CPU, so its wall time is this step times its step count. The
table gives, for each batch size: the whole jitted train step with the blocks scanned and unrolled, and the
forward and forward+backward of one attention call of the step's shape, for ``jax.nn.dot_product_attention``
(token-major einsums) and the project's ``attention.xla_attention`` (heads-major). Run it as a user's machine might be, e.g. an AVX2-only 2-core one::

  python benchmarks/cpu_step.py
  XLA_FLAGS=--xla_cpu_max_isa=AVX2 taskset -c 0,1 python benchmarks/cpu_step.py

Appends one ``kind: "cpu_step"`` line to ``benchmarks/results.jsonl`` (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import common  # noqa: E402


def _ms(fn, *args, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * common.median(times)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/stages.py:demo")
  p.add_argument("--batch-sizes", default="4,8")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--results", default=str(pathlib.Path(__file__).with_name("results.jsonl")))
  p.add_argument("--no-record", action="store_true")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from layerflow_jax import distributed
  from layerflow_jax import sharding as shd
  from layerflow_jax.config import load_config
  from layerflow_jax.model import attention
  from layerflow_jax.train import step as step_lib
  from layerflow_jax.train.experiment import Experiment

  rows = []
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    attention_ms: dict = {}  # one attention timing per batch size (it does not depend on scanning)
    for scan in (True, False):
      config = load_config(args.config, [f"data.batch_size={b}", f"model.scan_layers={scan}"])
      exp = Experiment(config)
      d = config.data
      frames = exp.layout.num_clips * d.frames
      batch = {
        "video": jnp.zeros((b, frames, d.height, d.width, 3)),
        "tokens": jnp.ones((b, 3, config.text_encoder.max_length), jnp.int32),
        "clip_valid": jnp.ones((b, exp.layout.num_clips), bool),
        "motion_scale": jnp.zeros((b,)),
      }
      state = exp.init_state()
      train = step_lib.compile_train_step(exp, exp.state_shardings(exp.abstract_state()), None)
      with shd.use_mesh(exp.mesh):
        state, _ = train(state, batch)
        # the step donates its state: time it on a fresh copy each call
        step_ms = _ms(
          lambda train=train, state=state, batch=batch: train(jax.tree.map(jnp.copy, state), batch)[1][
            "loss"
          ],
          repeats=args.repeats,
        )
      if not attention_ms:
        m = exp.model_cfg
        tokens = (
          exp.latent_frames
          * exp.layout.num_clips
          * (exp.latent_shape[1] // m.patch_size)
          * (exp.latent_shape[2] // m.patch_size)
          + 3 * config.text_encoder.max_length
        )
        q = jax.random.normal(jax.random.key(0), (b, tokens, m.num_heads, m.head_dim))
        attention_ms["tokens"] = tokens
        for name, fn in (
          ("jax_nn", lambda x: jax.nn.dot_product_attention(x, x, x)),
          ("xla_attention", lambda x: attention.xla_attention(x, x, x)),
        ):
          bwd = jax.grad(lambda x, f=fn: (f(x) ** 2).sum())
          attention_ms[f"{name}_fwd_ms"] = common.sig(_ms(jax.jit(fn), q, repeats=args.repeats))
          attention_ms[f"{name}_fwd_bwd_ms"] = common.sig(_ms(jax.jit(bwd), q, repeats=args.repeats))
      rows.append(
        {
          "batch": b,
          "tokens": attention_ms["tokens"],
          "scan_layers": scan,
          "train_step_ms": common.sig(step_ms),
          **{k: v for k, v in attention_ms.items() if k != "tokens"},
        }
      )

  keys = list(rows[0])
  print(f"host: {distributed.host_description()}; jax {jax.__version__}")
  print("| " + " | ".join(keys) + " |")
  print("|" + "---:|" * len(keys))
  for r in rows:
    print("| " + " | ".join(str(r[k]) for k in keys) + " |")
  if not args.no_record:
    common.append_jsonl(
      args.results,
      {
        "kind": "cpu_step",
        "time": common.utc_now(),
        "config": args.config,
        "host": distributed.host_description(),
        "jax": jax.__version__,
        "rows": rows,
      },
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
