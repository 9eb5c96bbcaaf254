"""Opening any prepared TFDS dataset by name ("tfds:<name>") for grain.

Nothing is downloaded here: the dataset must already be prepared as
array_record under the data dir, else `DatasetNotPreparedError` says how.
The element layout is inferred from the features: "image" + "label" is image
classification, "text" is byte-level LM, "inputs" + "targets" is LM as-is,
"inputs" + "label" is sequence classification.
"""

import tensorflow_datasets as tfds

from sparsejax.data import builder_base


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is missing or not prepared as array_record."""


def _prepare_hint(name: str, data_dir: str) -> str:
  return (
      f"Prepare it once on a machine with network access, e.g.\n"
      f"  tfds build {name} --data_dir={data_dir} "
      f"--file_format=array_record\n"
      f"(most public builders need TensorFlow to *build*; reading here never "
      f"does; manual-download datasets such as imagenet2012 need their "
      f"archives in {data_dir}/downloads/manual). Data already prepared as "
      f"tfrecord can be converted with `tfds convert_format "
      f"--dataset_dir=<dir> --out_file_format=array_record`.")


def builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder for `name` (may carry /config:version), without preparing."""
  data_dir = builder_base.default_data_dir(data_dir)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} is neither a known builder nor prepared in "
        f"{data_dir} ({type(e).__name__}: {str(e).splitlines()[0]}).\n"
        + _prepare_hint(name, data_dir)) from e


def prepared_builder(name: str,
                     data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Like `builder` but raises `DatasetNotPreparedError` unless readable."""
  b = builder(name, data_dir)
  data_dir = builder_base.default_data_dir(data_dir)
  if not b.is_prepared():
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} is not prepared in {data_dir}.\n"
        + _prepare_hint(name, data_dir))
  if b.info.file_format != builder_base.ARRAY_RECORD:
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} in {data_dir} is stored as "
        f"{b.info.file_format}, grain needs array_record.\n"
        + _prepare_hint(name, data_dir))
  return b


def eval_split(b: tfds.core.DatasetBuilder) -> str:
  """The held-out split: "validation" if present, else "test"."""
  for split in ("validation", "test"):
    if split in b.info.splits:
      return split
  raise ValueError(f"{b.name} has no validation/test split: "
                   f"{list(b.info.splits)}")


def kind(b: tfds.core.DatasetBuilder) -> str:
  """"image_cls", "lm_text", "lm" or "seq_cls", from the feature keys."""
  keys = set(b.info.features.keys())
  if {"image", "label"} <= keys:
    return "image_cls"
  if "text" in keys:
    return "lm_text"
  if {"inputs", "targets"} <= keys:
    return "lm"
  if {"inputs", "label"} <= keys:
    return "seq_cls"
  raise ValueError(f"Don't know how to feed {b.name} with features "
                   f"{sorted(keys)}")
