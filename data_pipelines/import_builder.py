"""The base of the TFDS builders that import a manual dir (``layerflow_folder``, ``_images``, ``_videos``)."""

from __future__ import annotations

import abc
import pathlib
from typing import Any, Iterator

import tensorflow_datasets as tfds

from data_pipelines import importing


def manual_dir(data_cfg, name: str) -> str:
  """The source folder of dataset ``name``: ``data.manual_dirs.<name>`` (the CLI's ``--manual_dir`` sets it)."""
  dirs = data_cfg.get("manual_dirs", {}) or {}
  path = dirs.get(name, "") if hasattr(dirs, "get") else ""
  if not path:
    raise importing.LayoutError(
      f"{name}: no source folder given (set --manual_dir or data.manual_dirs.{name})"
    )
  return str(path)


class ManualImportBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads the manual dir's layout into splits of items, loads the items on a thread pool, and skips, counts and
  logs bad records (:class:`importing.SkipLog`); the skipped ids land in the dataset metadata under ``skipped``.

  Subclasses set ``NAME`` and define :meth:`read_layout` (split → items; each item a tuple whose second element
  is the record id) and :meth:`load_item` (the record, or :class:`importing.BadRecord`). Their builder config
  carries ``max_bad_fraction`` and ``threads``.
  """

  NAME = ""
  code_path = tfds.core.utils.classproperty(classmethod(importing.local_code_path))

  @abc.abstractmethod
  def read_layout(self, root: pathlib.Path) -> dict[str, list]:
    """split → items, with :class:`importing.LayoutError` for a malformed layout."""

  @abc.abstractmethod
  def load_item(self, root: pathlib.Path, item) -> dict[str, Any]:
    """One record of the dataset's features."""

  def prepare(self, data_cfg) -> "ManualImportBuilder":
    """Imports ``data.manual_dirs.<NAME>`` into the builder's data dir (a no-op when already built); layout errors
    are raised before TFDS starts."""
    if not self.is_prepared():
      root = manual_dir(data_cfg, self.NAME)
      self.read_layout(pathlib.Path(root))
      self.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=root)
      )
    return self

  def source(self, split: str):
    """The random-access source of ``split``, with clear errors for an unbuilt dataset or an unknown split."""
    return importing.prepared_source(
      self, self.NAME, split, f"run `layerflow data import {self.NAME} --manual_dir ROOT` first"
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = self.read_layout(root)
    self.info.metadata["skipped"] = {}
    return {split: self._generate_examples(root, split, items) for split, items in splits.items()}

  def _generate_examples(self, root, split, items) -> Iterator[tuple[str, dict[str, Any]]]:
    c = self.builder_config
    skips = importing.SkipLog(f"{self.NAME} split {split!r}", len(items), c.max_bad_fraction)

    def load(item):
      try:
        return item[1], self.load_item(root, item), None
      except importing.BadRecord as e:
        return item[1], None, str(e)

    for key, record, error in importing.imap_ordered(load, items, c.threads):
      if error is not None:
        skips.bad(key, error)
        continue
      skips.ok()
      yield key, record
    self.info.metadata["skipped"][split] = skips.finish()
