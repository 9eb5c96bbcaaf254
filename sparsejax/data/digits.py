"""Real images that ship inside a wheel: scikit-learn's handwritten digits.

1797 grayscale 8x8 digits (values 0..16, 10 classes), `sklearn.datasets.
load_digits()`, read from the installed package: nothing is downloaded.
Split: stratified by label with a fixed seed (test_fraction of each class),
then every test image that also occurs, pixel for pixel, in the train split
is dropped, so no test image is seen in training. (The set carries no writer
ids, so writer-level separation is not possible.) Images are stored as
uint8 [S, S, 1] (0..255), optionally upsampled by an integer factor.
"""

import numpy as np
import tensorflow_datasets as tfds

from sparsejax.data import builder_base


def digits_split(seed: int = 0, test_fraction: float = 0.2):
  """(train_images, train_labels, test_images, test_labels), uint8 8x8."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
  labels = data.target.astype(np.int64)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.nonzero(labels == c)[0])
    test[idx[:int(round(test_fraction * len(idx)))]] = True
  train_keys = {im.tobytes() for im in images[~test]}
  keep = np.array([not (t and im.tobytes() in train_keys)
                   for im, t in zip(images, test)])
  train = ~test
  test &= keep
  return images[train], labels[train], images[test], labels[test]


class SjDigits(builder_base.SyntheticBuilder):
  """TFDS builder over sklearn's digits (params: upsample, test_fraction)."""

  name = "sj_digits"
  DEFAULTS = dict(upsample=1, test_fraction=0.2, num_train=0, num_eval=0,
                  seed=0)

  def features(self):
    s = 8 * self.builder_config.params["upsample"]
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=10)})

  def _split_generators(self, dl_manager):
    del dl_manager
    p = self.builder_config.params
    tr_x, tr_y, te_x, te_y = digits_split(p["seed"], p["test_fraction"])
    return {"train": self._examples(tr_x, tr_y, p["upsample"]),
            "test": self._examples(te_x, te_y, p["upsample"])}

  @staticmethod
  def _examples(images, labels, upsample):
    for i, (im, y) in enumerate(zip(images, labels)):
      im = np.kron(im, np.ones((upsample, upsample), np.uint8))
      yield i, {"image": im[..., None], "label": int(y)}
