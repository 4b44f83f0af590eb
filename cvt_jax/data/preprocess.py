"""Host-side image preprocessing: decode, crop, resize, flip -> uint8, pixel for pixel the official pipeline.

The reference is microsoft/CvT's torchvision transforms on PIL images (torchvision's `pil_loader`:
`Image.open(f).convert('RGB')`). Evaluation: `Resize(int(size / 0.875), BICUBIC)` + `CenterCrop(size)`, or a
squash `Resize((size, size), BICUBIC)` at 384 and above. Training: `RandomResizedCrop(size, scale, ratio,
interpolation)` + `RandomHorizontalFlip()`. Everything after that (RandAugment, erasing, normalisation,
mixup/cutmix) runs on the device (`cvt_jax.data.augment`).

The folder path makes exactly torchvision's PIL calls. The TFDS path does the same as tf.data ops on the
encoded bytes: JPEGs decoded with libjpeg's accurate integer IDCT (PIL's), 4-channel (CMYK/YCCK) JPEGs
decoded by PIL, and PIL's fixed-point separable resample re-implemented in TF (`_tf_resize`).
`train_image(..., draft=True)` trades that exactness for speed on large JPEGs.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import PIL
from PIL import Image

Box = tuple[int, int, int, int]  # (left, upper, right, lower) in pixels, PIL's convention

TRAIN_SCALE = (0.08, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_PCT = 0.875
_CROP_TRIES = 10
_JPEG_CROP_MARGIN = 2  # 1 suffices in measurements (4:2:0, 4:2:2, 4:1:1)
_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point resampling coefficients
_PIL_MAY_RESAMPLE_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


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


def _fallback_crop_size(width, height, ratio: tuple[float, float], minimum=min):
  """torchvision's fallback: the whole image cut to the nearest aspect ratio in `ratio`, unrounded.

  torchvision's three cases (too wide, too tall, within `ratio`) as two minima, so that the same lines take
  Python numbers (minimum=min) and float64 tf tensors (minimum=tf.minimum).
  """
  return minimum(width, height * max(ratio)), minimum(height, width / min(ratio))


def eval_geometry(height, width, size: int):
  """The official eval transform's geometry: ((resized height, width), (crop top, left)).

  Below 384 px: the shorter side resized to int(size / 0.875) (256 for 224), the longer one to
  int(256 * long / short) as torchvision computes it, then a centre crop of `size` (torchvision rounds the
  offsets half to even). At 384 and above: a squash to size x size (the official 384 models were
  evaluated so). Takes Python ints or scalar integer tf tensors, hence only +, -, *, //, % and abs below.
  """
  if size >= 384:
    return (size, size), (0, 0)
  short = int(size / EVAL_CROP_PCT)
  shorter = (height + width - abs(height - width)) // 2
  new_h, new_w = short * height // shorter, short * width // shorter
  return (new_h, new_w), (_half_to_even(new_h - size), _half_to_even(new_w - size))


def _half_to_even(d):
  """Python's round(d / 2) (ties to even) for an integer d >= 0."""
  return d // 2 + (d // 2 % 2) * (d % 2)


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
  resample = _filter(interpolation).pil
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


# The same transforms as tf.data ops for the TFDS path (TensorFlow is imported only when they are traced).


def tf_train_image(encoded, seed, *, size: int, scale: tuple[float, float] = TRAIN_SCALE,
                   ratio: tuple[float, float] = TRAIN_RATIO, interpolation: str = "bicubic"):
  """`train_image` on an encoded image; JPEGs decode only the crop window.

  Args:
    encoded: scalar tf.string, the encoded image.
    seed: int (2,) tensor, the stateless seed of this example.
    size: output side.
    scale, ratio, interpolation: as in `train_image`.

  Returns:
    tf.uint8 (size, size, 3).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = _tf_decode(encoded, lambda h, w: tf_random_resized_crop_window(h, w, crop_seed, scale, ratio))
  image = _tf_resize(image, (size, size), interpolation)
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def tf_random_resized_crop_window(height, width, seed, scale: tuple[float, float] = TRAIN_SCALE,
                                  ratio: tuple[float, float] = TRAIN_RATIO):
  """`random_resized_crop_box` as stateless TF ops -> int32 (top, left, height, width).

  The 10 tries are drawn at once; the first valid one wins, else the centre-crop fallback.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  h_img, w_img = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  target_area = h_img * w_img * tf.random.stateless_uniform(
      [_CROP_TRIES], area_seed, scale[0], scale[1], tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform(
      [_CROP_TRIES], ratio_seed, math.log(ratio[0]), math.log(ratio[1]), tf.float64))
  fallback_w, fallback_h = _fallback_crop_size(w_img, h_img, ratio, tf.minimum)
  # Candidates: the tries, then the fallback, which is always valid.
  ws = tf.cast(tf.round(tf.concat([tf.sqrt(target_area * aspect), [fallback_w]], 0)), tf.int32)
  hs = tf.cast(tf.round(tf.concat([tf.sqrt(target_area / aspect), [fallback_h]], 0)), tf.int32)
  valid = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.reduce_min(tf.where(valid, tf.range(_CROP_TRIES + 1), _CROP_TRIES))
  h, w = hs[first], ws[first]
  random_top = tf.random.stateless_uniform([], top_seed, 0, height - h + 1, tf.int32)
  random_left = tf.random.stateless_uniform([], left_seed, 0, width - w + 1, tf.int32)
  fell_back = first == _CROP_TRIES
  top = tf.where(fell_back, (height - h) // 2, random_top)
  left = tf.where(fell_back, (width - w) // 2, random_left)
  return tf.stack([top, left, h, w])


def tf_eval_image(encoded, *, size: int):
  """`eval_image` on an encoded image -> tf.uint8 (size, size, 3)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = _tf_decode(encoded)
  shape = tf.shape(image)
  (new_h, new_w), (top, left) = eval_geometry(shape[0], shape[1], size)
  image = _tf_resize(image, (new_h, new_w), "bicubic", window=(top, left, size, size))
  return tf.ensure_shape(image, (size, size, 3))


def _tf_decode(encoded, window_of=None):
  """PIL's `Image.open(f).convert('RGB')` -> tf.uint8 (h, w, 3), optionally cropped.

  Args:
    encoded: scalar tf.string.
    window_of: maps (height, width) to an int32 (top, left, height, width) crop window; JPEGs then decode
      only about that window.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def window(shape):
    if window_of is None:
      return 0, 0, shape[0], shape[1]
    return tf.unstack(window_of(shape[0], shape[1]))

  def crop(image, top, left, h, w):
    return image[top:top + h, left:left + w]

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    top, left, h, w = window(shape)
    # A cropped decode upsamples the chroma as if the window's left and right edges were the image's
    # (1 level off there): decode a few more columns, then cut them.
    x0 = tf.maximum(left - _JPEG_CROP_MARGIN, 0)
    x1 = tf.minimum(left + w + _JPEG_CROP_MARGIN, shape[1])
    ycc = lambda: crop(tf.io.decode_and_crop_jpeg(  # noqa: E731
        encoded, tf.stack([top, x0, h, x1 - x0]), channels=3, dct_method="INTEGER_ACCURATE"),
        0, left - x0, h, w)
    # 4-channel (CMYK, YCCK) JPEGs go to PIL: TF's CMYK -> RGB truncates where PIL rounds (1 level off
    # on about half the pixels).
    pil = lambda: crop(tf.ensure_shape(  # noqa: E731
        tf.numpy_function(_pil_rgb, [encoded], tf.uint8, stateful=False), (None, None, 3)), top, left, h, w)
    return tf.cond(shape[2] == 4, pil, ycc)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return crop(image, *window(tf.shape(image)))

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _pil_rgb(encoded: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(encoded)) as img:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _bicubic(x):
  """PIL's bicubic filter (a = -0.5) of a float64 tf tensor."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.abs(x)
  a = -0.5
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _triangle(x):
  """PIL's bilinear filter of a float64 tf tensor."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.abs(x)
  return tf.where(x < 1.0, 1.0 - x, tf.zeros_like(x))


class _Filter(NamedTuple):
  pil: Image.Resampling
  tf_fn: Callable  # of float64 tf tensors, as PIL's Resample.c defines it
  support: float


_FILTERS = {"bicubic": _Filter(Image.Resampling.BICUBIC, _bicubic, 2.0),
            "bilinear": _Filter(Image.Resampling.BILINEAR, _triangle, 1.0)}


def _filter(interpolation: str) -> _Filter:
  if interpolation not in _FILTERS:
    raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, got {interpolation!r}")
  return _FILTERS[interpolation]


def _tf_resize(image, out_hw, interpolation: str, window=None):
  """PIL's `Image.resize(out_hw[::-1], filter)` of a uint8 (h, w, 3) tensor, bit for bit.

  PIL resamples in two passes and rounds to uint8 in between, so their order matters: Pillow < 13 always
  runs the horizontal pass first; Pillow >= 13 runs the vertical one first when the height loses more
  than twice as many pixels as the width. The installed Pillow's order is used, as the folder path gets it.

  Args:
    image: uint8 (h, w, 3).
    out_hw: the resized (height, width).
    interpolation: 'bicubic' or 'bilinear'.
    window: (top, left, height, width) of the resized image to return; only those pixels are computed.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  filt = _filter(interpolation)
  top, left, h, w = window or (0, 0, out_hw[0], out_hw[1])
  vertical = lambda im: _tf_resample_rows(im, out_hw[0], filt, top, h)  # noqa: E731
  horizontal = lambda im: tf.transpose(  # noqa: E731
      _tf_resample_rows(tf.transpose(im, (1, 0, 2)), out_hw[1], filt, left, w), (1, 0, 2))
  if not _PIL_MAY_RESAMPLE_VERTICAL_FIRST:
    return vertical(horizontal(image))
  shrink_h = tf.shape(image)[0] - out_hw[0]
  shrink_w = tf.shape(image)[1] - out_hw[1]
  return tf.cond((shrink_h > 0) & (shrink_h > 2 * shrink_w), lambda: horizontal(vertical(image)),
                 lambda: vertical(horizontal(image)))


def _tf_resample_rows(image, out_size, filt: _Filter, first, count):
  """PIL's `precompute_coeffs` + `ImagingResampleVertical_8bpc`: resamples axis 0 of a uint8 (h, w, c) image.

  Returns rows [first, first + count) of the `out_size` rows. Output row i has taps [xmin_i, xmin_i + n_i)
  with float64 weights filter((x - centre_i + 0.5) / s), s = max(in / out, 1), normalised to sum 1 and
  turned into 22-bit fixed point; the integer sum is rounded and clipped to uint8.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  f64 = tf.float64
  in_size = tf.shape(image)[0]
  scale = tf.cast(in_size, f64) / tf.cast(out_size, f64)
  filterscale = tf.maximum(scale, 1.0)
  support = filt.support * filterscale
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.cast(tf.range(first, first + count), f64) + 0.5) * scale
  # C's (int) casts truncate toward zero, as tf.cast does.
  xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
  xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - xmin
  taps = tf.range(ksize)
  x = xmin[:, None] + taps[None, :]  # (out, ksize)
  # PIL multiplies by 1 / filterscale rather than dividing: the same float64 results need the same ops.
  w = filt.tf_fn((tf.cast(x, f64) - center[:, None] + 0.5) * (1.0 / filterscale))
  w = tf.where(taps[None, :] < xmax[:, None], w, 0.0)
  # PIL sums the weights left to right, as a scan does; reduce_sum may add in another order.
  w = w / tf.math.cumsum(w, axis=1)[:, -1:]
  one = float(1 << _PRECISION_BITS)
  kk = tf.cast(tf.where(w < 0, w * one - 0.5, w * one + 0.5), tf.int32)
  shape = tf.shape(image)
  taps_rows = tf.gather(tf.reshape(image, (in_size, -1)), tf.minimum(x, in_size - 1))  # weight 0 past xmax
  acc = tf.einsum("okr,ok->or", tf.cast(taps_rows, tf.int32), kk) + (1 << (_PRECISION_BITS - 1))
  out = tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255)
  return tf.reshape(tf.cast(out, tf.uint8), tf.concat([[count], shape[1:]], 0))
