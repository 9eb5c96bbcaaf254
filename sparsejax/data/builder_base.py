"""Shared TFDS plumbing: the data dir, building on first use, synthetic builders.

Everything is stored as array_record and read back through `tfds.data_source`
machinery (grain-compatible random access), so no TensorFlow is needed. Only
features that encode with numpy are used (Tensor, Scalar, Text, ClassLabel);
`tfds.features.Image` would need TensorFlow to PNG-encode.
"""

import dataclasses
import inspect
import os
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
_SPLIT_IDS = {"train": 0, "test": 1}


def default_data_dir(data_dir: str | None = None) -> str:
  """`data_dir`, else $SPARSEJAX_DATA_DIR, else ~/.cache/sparsejax/tfds."""
  if data_dir:
    return os.path.expanduser(str(data_dir))
  env = os.environ.get("SPARSEJAX_DATA_DIR")
  return os.path.expanduser(env or "~/.cache/sparsejax/tfds")


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds `builder` once (no downloads); later calls reuse the files."""
  if not builder.is_prepared():
    print(f"sparsejax.data: building {builder.info.full_name} in "
          f"{builder.data_dir} (first use only)...", flush=True)
    builder.download_and_prepare(file_format=ARRAY_RECORD)
  return builder


def lm_features() -> tfds.features.FeaturesDict:
  """Features of the LM-style tasks: inputs/targets (int32), loss_mask."""
  seq = lambda dt: tfds.features.Tensor(shape=(None,), dtype=dt)
  return tfds.features.FeaturesDict({
      "inputs": seq(np.int32), "targets": seq(np.int32),
      "loss_mask": seq(np.float32)})


def config_name(params: dict[str, Any]) -> str:
  """A readable, deterministic BuilderConfig name for a parameter dict."""
  return "_".join(f"{k}{v}" for k, v in sorted(params.items()))


@dataclasses.dataclass(eq=False)
class ParamsConfig(tfds.core.BuilderConfig):
  """BuilderConfig carrying the generation parameters as a dict."""
  params: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_config(params: dict[str, Any]) -> ParamsConfig:
  return ParamsConfig(name=config_name(params), params=dict(params))


class SyntheticBuilder(tfds.core.GeneratorBasedBuilder,
                       skip_registration=True):
  """Writes `num_train`/`num_eval` examples of a seeded numpy generator.

  Subclasses set `name`, `DEFAULTS` (generation params incl. num_train,
  num_eval, seed), and implement `features()` and `make_example(rng, **p)`.
  Example `i` of a split uses its own rng seeded by (seed, split, i), so the
  data are a pure function of the config, independent of write order.
  """

  VERSION = tfds.core.Version("1.0.0")
  DEFAULTS: dict[str, Any] = {}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup breaks while `sparsejax` is a namespace package.
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def with_params(cls, data_dir: str | None = None, **params):
    """Returns a builder for DEFAULTS updated by `params`."""
    full = {**cls.DEFAULTS, **params}
    return cls(config=make_config(full), data_dir=default_data_dir(data_dir),
               file_format=ARRAY_RECORD)

  def features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  @staticmethod
  def make_example(rng: np.random.Generator, **params) -> dict[str, Any]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # Keep write order = index order (no hash shuffle): deterministic files.
    return tfds.core.DatasetInfo(builder=self, features=self.features(),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    p = self.builder_config.params
    return {"train": self._generate_examples("train", p["num_train"]),
            "test": self._generate_examples("test", p["num_eval"])}

  def _generate_examples(self, split: str, num: int):
    p = dict(self.builder_config.params)
    seed = p.pop("seed")
    del p["num_train"], p["num_eval"]
    for i in range(num):
      rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
      yield i, self.make_example(rng, **p)
