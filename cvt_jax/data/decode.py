"""One example to the uint8 pixels the model trains or evaluates on, with the official pipeline's PIL calls.

These run in grain's worker processes: numpy, PIL and `cvt_jax.data.preprocess` only, no JAX. Every image
is a pure function of its example and its seed, whatever the number of workers or their timing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from cvt_jax.data import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What PIL raises for a file that is no readable image (truncated, corrupt, of an unknown format).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_file(path: str) -> str | io.BytesIO:
  """What `PIL.Image.open` takes for `path`: a local path, or an object-store file (`gs://...`) read
  through etils.epath."""
  if "://" not in path:
    return path
  from etils import epath  # pylint: disable=g-import-not-at-top  # workers import it only when needed
  return io.BytesIO(epath.Path(path).read_bytes())


def opened(example: Any) -> str | io.BytesIO:
  """A `sources.Example`'s image as `PIL.Image.open` takes it."""
  return image_file(example.key) if example.data is None else io.BytesIO(example.data)


def why_undecodable(error: Exception) -> str:
  """'UnidentifiedImageError: cannot identify image file': PIL's message without the in-memory stream it
  names (`<_io.BytesIO object at 0x...>`), which says nothing to a user; the caller names the file."""
  return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(error).__name__}: {error}")


def first_decodable(examples: Sequence[Any], transform: Callable[[Any], np.ndarray]
                    ) -> tuple[np.ndarray | None, int, list[str]]:
  """(`transform` of the first example that decodes or None, its index or -1, the keys that did not)."""
  failed = []
  for used, example in enumerate(examples):
    try:
      return transform(example), used, failed
    except DECODE_ERRORS as e:
      failed.append(f"{example.key} ({why_undecodable(e)})")
  return None, -1, failed


def train_pixels(example: Any, size: int, seed: Sequence[int], crop: dict[str, Any]) -> np.ndarray:
  """The random-resized crop and flip of `preprocess.train_image`, drawn from `seed`."""
  return preprocess.train_image(opened(example), size, np.random.default_rng(seed), **crop)


def eval_pixels(example: Any, size: int) -> np.ndarray:
  """The official eval transform (`preprocess.eval_image`)."""
  return preprocess.eval_image(opened(example), size)
