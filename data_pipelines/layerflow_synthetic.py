"""TFDS builder ``layerflow_synthetic``: synthetic layered videos (see :mod:`data_pipelines.synthetic`).

One builder, several dataset names (:data:`NAMES`): each name is a kind of :data:`synthetic.KINDS`, the quality
gap of the paper's sources — ``layerflow_synthetic`` (clean), ``layerflow_synthetic_lowq`` (stage-1 layered
video with annotation artifacts), ``layerflow_synthetic_images`` (stage-3 high-quality layered images),
``layerflow_synthetic_copypaste`` (copy-paste videos). Every name has its held-out ``validation`` split.

Written as ArrayRecord so that Grain reads it by random access; neither building nor reading needs
TensorFlow. Each builder config is named from its sizes (``h32_w32_f8_n512_v32_s0``), so datasets of
different sizes live side by side in one ``data_dir``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import importing, synthetic

NAME = "layerflow_synthetic"
NAMES = {
  NAME: "clean",
  f"{NAME}_lowq": "lowq_video",
  f"{NAME}_images": "hq_image",
  f"{NAME}_copypaste": "copy_paste",
}
_SPLIT_CODES = {"train": 0, "validation": 1}  # folded into every example's seed: the splits never share one
_TEXT_KEYS = (
  "fg_prompt",
  "bg_prompt",
  "blend_prompt",
  "fg_color",
  "fg_shape",
  "motion",
  "bg_color",
  "bg_texture",
  "bg_motion",
)


@dataclasses.dataclass(eq=False)
class LayerflowSyntheticConfig(tfds.core.BuilderConfig):
  """Sizes and seed of one synthetic dataset; ``frames`` is the length of every layer clip."""

  height: int = 32
  width: int = 32
  frames: int = 8
  num_train: int = 512
  num_validation: int = 32
  seed: int = 0
  kind: str = "clean"  # one of synthetic.KINDS


def config_name(
  height: int, width: int, frames: int, num_train: int, num_validation: int, seed: int, kind: str = "clean"
) -> str:
  base = f"h{height}_w{width}_f{frames}_n{num_train}_v{num_validation}_s{seed}"
  return base if kind == "clean" else f"{base}_{kind}"


def make_config(
  height: int = 32,
  width: int = 32,
  frames: int = 8,
  num_train: int = 512,
  num_validation: int = 32,
  seed: int = 0,
  kind: str = "clean",
) -> LayerflowSyntheticConfig:
  """A builder config whose name is derived from its values."""
  if kind not in synthetic.KINDS:
    raise ValueError(f"synthetic kind {kind!r} unknown; expected one of {synthetic.KINDS}")
  values = dict(
    height=height, width=width, frames=frames, num_train=num_train, num_validation=num_validation, seed=seed
  )
  values = {k: int(v) for k, v in values.items()}
  return LayerflowSyntheticConfig(
    name=config_name(**values, kind=kind),
    description=f"synthetic layered scenes ({kind})",
    kind=kind,
    **values,
  )


class LayerflowSynthetic(tfds.core.GeneratorBasedBuilder):
  """Moving anti-aliased sprites over scrolling textures, with fg / alpha / bg / blend layers and prompts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [make_config()]

  code_path = tfds.core.utils.classproperty(classmethod(importing.local_code_path))

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    video = (c.frames, c.height, c.width)

    def frames(channels: int) -> tfds.features.Tensor:
      # Raw bytes: the default int64-list encoding of uint8 tensors is ~6x slower to write.
      return tfds.features.Tensor(
        shape=video + (channels,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
      )

    features = {
      "id": tfds.features.Text(),
      "fg": frames(3),
      "alpha": frames(1),
      "bg": frames(3),
      "blend": frames(3),
      "has_bg": tfds.features.Scalar(dtype=np.bool_),
      **{k: tfds.features.Text() for k in _TEXT_KEYS},
    }
    # Not `dataset_info_from_configs`: it looks for metadata files next to this module.
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(features),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {
      "train": self._generate_examples("train", c.num_train),
      "validation": self._generate_examples("validation", c.num_validation),
    }

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    c = self.builder_config
    for i in range(count):
      seed = np.random.SeedSequence([c.seed, _SPLIT_CODES[split], i])
      scene = synthetic.make_example(c.kind, seed, c.frames, c.height, c.width)
      key = f"{split}_{i:06d}"
      fields = {k: scene[k] for k in ("fg", "alpha", "bg", "blend", *_TEXT_KEYS)}
      yield key, {"id": key, "has_bg": True, **fields}


def make_builder(data_cfg) -> LayerflowSynthetic:
  """The builder for ``data_cfg`` (``c.data`` of the config: sizes, ``builder_seed``, ``data_dir``)."""
  name = data_cfg.get("name", NAME)
  if name not in NAMES:
    raise ValueError(f"data.name is {name!r}; this module builds {sorted(NAMES)}")
  config = make_config(
    data_cfg.height,
    data_cfg.width,
    data_cfg.frames,
    data_cfg.num_train,
    data_cfg.num_validation,
    data_cfg.get("builder_seed", 0),
    kind=NAMES[name],
  )
  return importing.make_array_record_builder(LayerflowSynthetic, config, data_cfg.data_dir)


def build(data_cfg) -> LayerflowSynthetic:
  """Generates the dataset into ``data_cfg.data_dir`` (a no-op when it is already there)."""
  builder = make_builder(data_cfg)
  builder.download_and_prepare(file_format="array_record")
  return builder


def load_source(data_cfg, split: str):
  """Random-access source of ``split`` (``len`` and ``[i]`` → dict of NumPy arrays; texts as bytes)."""
  builder = make_builder(data_cfg)
  if not builder.is_prepared():
    name = data_cfg.get("name", NAME)
    raise FileNotFoundError(
      f"dataset {NAME}/{builder.builder_config.name} is not built in {data_cfg.data_dir!s}: "
      f"run `layerflow data build {name}` (or data_pipelines.layerflow_synthetic.build) first"
    )
  return builder.as_data_source(split)
