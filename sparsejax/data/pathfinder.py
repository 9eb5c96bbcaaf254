"""Synthetic Pathfinder (LRA; Linsley et al. 2018), drawn with numpy.

Each grayscale image holds two dashed, smoothly curving paths plus shorter
distractor dashes, and two endpoint discs. Label 1: both discs sit on the two
ends of the same path; label 0: one disc on each path. Both classes draw the
same strokes, so only tracing the path along its length tells them apart.
"""

import numpy as np
import tensorflow_datasets as tfds

from sparsejax.data import builder_base


def _walk(rng, size, length, turn=0.08):
  """Points of a smooth random walk of `length` unit steps inside the image."""
  pos = rng.uniform(2, size - 2, size=2)
  angle = rng.uniform(0, 2 * np.pi)
  curvature = 0.0
  points = []
  for _ in range(length):
    curvature = 0.8 * curvature + rng.normal(0, turn)
    angle += curvature
    step = np.array([np.cos(angle), np.sin(angle)])
    nxt = pos + step
    for d in range(2):  # reflect off the border
      if not 1 <= nxt[d] <= size - 2:
        step[d] = -step[d]
        angle = np.arctan2(step[1], step[0])
    pos = np.clip(pos + step, 1, size - 2)
    points.append(pos.copy())
  return np.array(points)


def _draw_dashed(img, points, dash, gap):
  for i, (y, x) in enumerate(points):
    if i % (dash + gap) < dash:
      img[int(round(y)), int(round(x))] = 1.0


def _draw_disc(img, center, radius=1):
  cy, cx = (int(round(c)) for c in center)
  yy, xx = np.ogrid[:img.shape[0], :img.shape[1]]
  img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 1.0


def make_pathfinder_example(rng: np.random.Generator, image_size: int = 32,
                            *, path_len: int | None = None,
                            num_distractors: int = 2,
                            label: int | None = None) -> dict:
  """One example: image uint8[S, S, 1] (0 or 255) and label int32 (0 or 1)."""
  size = image_size
  path_len = path_len or int(1.2 * size)
  if label is None:
    label = int(rng.integers(2))
  dash, gap = max(2, size // 16), max(1, size // 32)
  img = np.zeros((size, size), np.float32)
  paths = [_walk(rng, size, path_len) for _ in range(2)]
  for p in paths:
    _draw_dashed(img, p, dash, gap)
  for _ in range(num_distractors):
    _draw_dashed(img, _walk(rng, size, path_len // 3), dash, gap)
  ends = ([paths[0][0], paths[0][-1]] if label else
          [paths[0][int(rng.integers(2)) * -1], paths[1][0]])
  for e in ends:
    _draw_disc(img, e)
  image = (img[..., None] * 255).astype(np.uint8)
  return {"image": image, "label": np.int32(label)}


class SjPathfinder(builder_base.SyntheticBuilder):
  """TFDS builder for synthetic Pathfinder (params: image_size, ...)."""

  name = "sj_pathfinder"
  DEFAULTS = dict(image_size=32, num_distractors=2, num_train=10000,
                  num_eval=1000, seed=0)

  def features(self):
    s = self.builder_config.params["image_size"]
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=2)})

  @staticmethod
  def make_example(rng, **params):
    return make_pathfinder_example(rng, **params)
