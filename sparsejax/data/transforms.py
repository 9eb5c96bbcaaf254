"""Per-record grain transforms: decoded TFDS dicts -> model-ready numpy."""

import grain
import numpy as np


def _fit(x: np.ndarray, length: int) -> np.ndarray:
  """Truncates or right-pads with 0 to `length`."""
  out = np.zeros(length, x.dtype)
  out[:min(length, len(x))] = x[:length]
  return out


class LmFields(grain.transforms.Map):
  """Keeps inputs/targets/loss_mask, fitted to seq_len."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def map(self, element):
    return {"inputs": _fit(np.asarray(element["inputs"], np.int32),
                           self.seq_len),
            "targets": _fit(np.asarray(element["targets"], np.int32),
                            self.seq_len),
            "loss_mask": _fit(np.asarray(element["loss_mask"], np.float32),
                              self.seq_len)}


class TextToBytes(grain.transforms.Map):
  """Byte-tokenises element["text"]; pads with 0 and masks the padding."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def map(self, element):
    text = element["text"]
    if isinstance(text, str):
      text = text.encode("utf-8")
    tokens = np.frombuffer(bytes(text), np.uint8)[:self.seq_len + 1]
    tokens = _fit(tokens.astype(np.int32), self.seq_len + 1)
    mask = np.arange(self.seq_len) < len(text) - 1
    return {"inputs": tokens[:-1], "targets": tokens[1:],
            "loss_mask": mask.astype(np.float32)}


class SeqClsFields(grain.transforms.Map):
  """Keeps inputs (fitted to seq_len) and an int32 label."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def map(self, element):
    return {"inputs": _fit(np.asarray(element["inputs"], np.int32),
                           self.seq_len),
            "label": np.int32(element["label"])}


class ImageFields(grain.transforms.Map):
  """uint8 image -> float32 [0, 1] (resized if `size` is set), int32 label."""

  def __init__(self, size: int | None = None):
    self.size = size

  def map(self, element):
    image = np.asarray(element["image"])
    if self.size is not None and image.shape[:2] != (self.size, self.size):
      image = _center_crop_resize(image, self.size)
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image.astype(np.float32) / 255.0,
            "label": np.int32(element["label"])}


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Square center crop then bilinear resize (for variable-size datasets)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  crop = image[top:top + s, left:left + s]
  squeeze = crop.ndim == 3 and crop.shape[-1] == 1
  pil = Image.fromarray(crop[..., 0] if squeeze else crop)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out[..., None] if squeeze else out
