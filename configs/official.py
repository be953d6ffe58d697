"""Fine-tune an imported official LayerFlow checkpoint: its own config (model, layout, task, sampling), with the
parameters taken from it (``train.init_from``). Everything else is overridable as usual::

  layerflow import-official ckpts_2b_lora/seg_rgba --out runs/official_seg_rgba --pipeline path/to/CogVideoX-2b
  layerflow train --config configs/official.py:checkpoint=runs/official_seg_rgba --workdir runs/ft \\
      --config.train.steps=1000 --config.data.name=…
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  from layerflow_jax.train import checkpoint as ckpt_lib

  args = common.parse_arg(arg, checkpoint="")
  if not args.checkpoint:
    raise ValueError("configs/official.py needs checkpoint=<a work dir written by layerflow import-official>")
  workdir = ckpt_lib.find_checkpoint_dir(args.checkpoint)
  ck = ckpt_lib.Checkpointer(workdir)
  try:
    config = ckpt_lib.config_from_meta(ck.read_meta()["config"])
  finally:
    ck.close()
  config.train.init_from = str(workdir)
  return config
