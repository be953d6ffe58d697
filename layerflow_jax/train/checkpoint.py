"""Orbax checkpoints of the train state, the data-iterator state and the config, with auto-resume.

Layout: ``WORKDIR/checkpoints/<step>/{state, data, meta}``. Orbax writes each step to a temporary directory and
renames it when complete, so a partial save is never read. ``restore_latest`` walks the steps newest first and
falls back to the previous one, with a warning, when the newest cannot be read.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import grain
import jax
import ml_collections as mlc
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, async_save: bool = False):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, *, iterator=None, meta: dict | None = None, force: bool = True) -> None:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(iterator)
    self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state, shardings, *, iterator=None) -> tuple[Any, dict]:
    args = {"state": ocp.args.StandardRestore(_abstract_with_shardings(abstract_state, shardings)),
            "meta": ocp.args.JsonRestore()}
    if iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]

  def restore_latest(self, abstract_state, shardings, *, iterator=None):
    """(state, meta, step) of the newest readable checkpoint, or (None, None, None) when there is none."""
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, abstract_state, shardings, iterator=iterator)
        return state, meta, step
      except Exception as e:  # a damaged checkpoint: fall back to the previous one
        log.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one",
                    self.directory, step, type(e).__name__, str(e).splitlines()[0][:200])
    return None, None, None

  def read_meta(self, step: int | None = None) -> dict:
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    step = steps[-1] if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def config_to_meta(config: mlc.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True)


def config_from_meta(text: str) -> mlc.ConfigDict:
  return mlc.ConfigDict(json.loads(text))


def find_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """Accepts a workdir (with ``checkpoints/``) or the ``checkpoints`` directory itself."""
  p = pathlib.Path(path)
  if (p / "checkpoints").is_dir():
    return p
  if p.name == "checkpoints" and p.is_dir():
    return p.parent
  raise FileNotFoundError(f"{path}: no checkpoints found (expected a work dir containing checkpoints/)")
