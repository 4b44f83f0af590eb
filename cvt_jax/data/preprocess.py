"""Host-side image preprocessing: decode, crop, resize, flip -> uint8, pixel for pixel the official pipeline.

The reference is microsoft/CvT's torchvision transforms on PIL images (torchvision's `pil_loader`:
`Image.open(f).convert('RGB')`). Evaluation: `Resize(int(size / 0.875), BICUBIC)` + `CenterCrop(size)`, or a
squash `Resize((size, size), BICUBIC)` at 384 and above. Training: `RandomResizedCrop(size, scale, ratio,
interpolation)` + `RandomHorizontalFlip()`. Everything after that (RandAugment, erasing, normalisation,
mixup/cutmix) runs on the device (`cvt_jax.data.augment`).

Every source (a folder tree's files, the encoded images of ArrayRecord shards and TFDS datasets) goes
through exactly torchvision's PIL calls here. `train_image(..., draft=True)` trades that exactness for
speed on large JPEGs.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (left, upper, right, lower) in pixels, PIL's convention

TRAIN_SCALE = (0.08, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_PCT = 0.875
_CROP_TRIES = 10


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = TRAIN_SCALE,
                            ratio: tuple[float, float] = TRAIN_RATIO) -> Box:
  """torchvision's `RandomResizedCrop.get_params`: 10 tries of area x log-uniform ratio, then centre."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_TRIES):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return (left, top, left + w, top + h)
  w, h = (round(v) for v in _fallback_crop_size(width, height, ratio))
  top, left = (height - h) // 2, (width - w) // 2
  return (left, top, left + w, top + h)


def _fallback_crop_size(width: int, height: int, ratio: tuple[float, float]) -> tuple[float, float]:
  """torchvision's fallback: the whole image cut to the nearest aspect ratio in `ratio`, unrounded
  (torchvision's three cases, too wide, too tall and within `ratio`, as two minima)."""
  return min(width, height * max(ratio)), min(height, width / min(ratio))


def eval_geometry(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The official eval transform's geometry: ((resized height, width), (crop top, left)).

  Below 384 px: the shorter side resized to int(size / 0.875) (256 for 224), the longer one to
  int(256 * long / short) as torchvision computes it, then a centre crop of `size` (torchvision rounds the
  offsets half to even, as Python's round does). At 384 and above: a squash to size x size (the official
  384 models were evaluated so).
  """
  if size >= 384:
    return (size, size), (0, 0)
  short = int(size / EVAL_CROP_PCT)
  shorter = min(height, width)
  new_h, new_w = short * height // shorter, short * width // shorter
  return (new_h, new_w), (round((new_h - size) / 2), round((new_w - size) / 2))


def train_image(path: str | os.PathLike, size: int, rng: np.random.Generator, *,
                scale: tuple[float, float] = TRAIN_SCALE, ratio: tuple[float, float] = TRAIN_RATIO,
                interpolation: str = "bicubic", draft: bool = False) -> np.ndarray:
  """Random-resized crop + horizontal flip (p=0.5) -> uint8 (size, size, 3).

  Args:
    path: the image file.
    size: output side.
    rng: draws the crop box, then the flip.
    scale: range of the crop's area fraction.
    ratio: range of the crop's aspect ratio (width / height).
    interpolation: 'bicubic' or 'bilinear' (PIL's filters, as torchvision uses them).
    draft: decode JPEGs at libjpeg's reduced DCT scale (1/2, 1/4, 1/8) while the crop keeps at least
      `size` pixels per side: faster on large photos (bench/README.md), but the pixels then differ from
      torchvision's.
  """
  resample = _filter(interpolation)
  with Image.open(path) as img:
    box = random_resized_crop_box(rng, *img.size, scale=scale, ratio=ratio)
    flip = rng.random() < 0.5
    if draft and img.format == "JPEG":
      out = _draft_resized_crop(img, box, size, resample)
    else:
      # Cropping before the conversion gives the same pixels (conversions to RGB are per pixel), faster.
      out = img.crop(box).convert("RGB").resize((size, size), resample)
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, dtype=np.uint8)


def _draft_resized_crop(img: Image.Image, box: Box, size: int, resample: Image.Resampling) -> Image.Image:
  """`box` of a JPEG resized to size x size, decoded at the smallest DCT scale that keeps it >= size."""
  w, h = img.size
  img.draft("RGB", (math.ceil(w * size / (box[2] - box[0])), math.ceil(h * size / (box[3] - box[1]))))
  sx, sy = img.size[0] / w, img.size[1] / h
  scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  return img.convert("RGB").resize((size, size), resample, box=scaled)


def eval_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """The official eval transform (see `eval_geometry`) -> uint8 (size, size, 3)."""
  with Image.open(path) as img:
    img = img.convert("RGB")
  (new_h, new_w), (top, left) = eval_geometry(img.height, img.width, size)
  out = img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
  return np.asarray(out, dtype=np.uint8)


_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _filter(interpolation: str) -> Image.Resampling:
  if interpolation not in _FILTERS:
    raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, got {interpolation!r}")
  return _FILTERS[interpolation]
