"""Top classes of image files through the official evaluation transform (`cvt-jax predict` is its command).

  checkpoint = weights.load("cvt13_224.npz")
  predictor = Predictor(checkpoint, image_size=224)
  predictions, failed = predict(predictor, ["cat.jpg", "dog.png"], class_names(checkpoint))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from cvt_jax import model as model_lib
from cvt_jax import weights
from cvt_jax.data import decode
from cvt_jax.data import labels
from cvt_jax.data import preprocess

if TYPE_CHECKING:  # cvt_jax.export imports this module
  from cvt_jax import export


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The `top_k` classes of one image, most probable first."""

  path: str
  labels: tuple[int, ...]
  names: tuple[str, ...]
  probabilities: tuple[float, ...]


def known_class_names(checkpoint: weights.Checkpoint | export.ExportedModel) -> tuple[str, ...] | None:
  """The names stored with the checkpoint, else the ImageNet names for a 1000-class head, else None."""
  if checkpoint.class_names:
    return checkpoint.class_names
  if checkpoint.num_classes == 1000:
    return tuple(name for _, name in labels.imagenet_classes())
  return None


def class_names(checkpoint: weights.Checkpoint | export.ExportedModel,
                labels_file: str | None = None) -> tuple[str, ...]:
  """Display names for the head's labels: from `labels_file`, else `known_class_names`, else 'class <index>'."""
  if labels_file:
    names = labels.read_labels(labels_file)
  else:
    names = known_class_names(checkpoint) or tuple(f"class {i}" for i in range(checkpoint.num_classes))
  if len(names) != checkpoint.num_classes:
    raise ValueError(f"{labels_file or checkpoint.source}: {len(names)} class names for a "
                     f"{checkpoint.num_classes}-class head")
  return names


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given; folders replaced by their image files (by extension, recursively, sorted)."""
  files = []
  for path in paths:
    if not os.path.isdir(path):
      files.append(path)
      continue
    for folder, subdirs, names in os.walk(path):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
      files.extend(os.path.join(folder, n) for n in sorted(names)
                   if n.lower().endswith(decode.IMAGE_EXTENSIONS) and not n.startswith("."))
  return files


class Predictor:
  """A checkpoint's model, jitted for fixed-size batches of uint8 images."""

  def __init__(self, checkpoint: weights.Checkpoint, image_size: int, batch_size: int = 16,
               dtype: str = "float32"):
    if checkpoint.num_classes == 0:
      raise ValueError(f"{checkpoint.source} has no classification head; use cvt_jax.features instead")
    self.image_size, self.batch_size = image_size, batch_size
    model = checkpoint.model(dtype=model_lib.compute_dtype(dtype))
    self._variables = jax.device_put(checkpoint.variables)
    self._probabilities = jax.jit(
        lambda variables, images: jax.nn.softmax(model.apply(variables, model_lib.normalize(images))))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> class probabilities (N, classes), in padded batches of `batch_size`."""
    return in_batches(functools.partial(self._probabilities, self._variables), images, self.batch_size)


def in_batches(fn: Callable[[np.ndarray], jax.Array], images: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn` over `images` in zero-padded batches of `batch_size` (one compiled shape), concatenated."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.zeros((batch_size,) + chunk.shape[1:], np.uint8)
    padded[:len(chunk)] = chunk
    out.append(np.asarray(fn(padded))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predict(predictor: Predictor | export.ExportedModel, paths: Sequence[str], names: Sequence[str], top_k: int = 5
            ) -> tuple[list[Prediction], list[tuple[str, str]]]:
  """Classifies `paths`; returns (predictions, [(path, error message)] for unreadable files)."""
  images, good, failed = [], [], []
  for path in paths:
    try:
      images.append(preprocess.eval_image(decode.image_file(path), predictor.image_size))
      good.append(path)
    except FileNotFoundError:
      failed.append((path, "no such file"))
    except decode.DECODE_ERRORS as e:
      failed.append((path, f"not a readable image ({type(e).__name__}: {e})"))
  if not images:
    return [], failed
  probs = predictor.probabilities(np.stack(images))
  k = min(top_k, probs.shape[-1])
  predictions = []
  for path, p in zip(good, probs):
    top = np.argsort(-p, kind="stable")[:k]
    predictions.append(Prediction(path, tuple(int(i) for i in top), tuple(names[i] for i in top),
                                  tuple(float(p[i]) for i in top)))
  return predictions, failed
