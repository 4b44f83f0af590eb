"""Host-side image preprocessing for the folder path: decode, crop, resize, flip -> uint8 (PIL, no TF).

The host does only what needs the encoded file: decoding, the random-resized crop (torchvision's
`RandomResizedCrop` sampling, bicubic) and the horizontal flip for training; resize + centre crop (or a
squash at 384) for evaluation. Everything else runs on the device (`cvt_jax.augment`).

JPEGs are decoded at a reduced DCT scale (`PIL.Image.draft`) whenever the crop window still holds at least
`size` pixels per side after that reduction; this keeps very large photos cheap and changes nothing for
ImageNet-sized images at 224 (their crop windows are smaller than twice the output).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]  # (left, upper, right, lower) in pixels, PIL's convention

TRAIN_SCALE = (0.08, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_PCT = 0.875


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = TRAIN_SCALE,
                            ratio: tuple[float, float] = TRAIN_RATIO) -> Box:
  """torchvision's `RandomResizedCrop.get_params`: 10 tries of area x log-uniform ratio, then centre."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return (left, top, left + w, top + h)
  # Fallback: the largest centre crop whose aspect ratio lies within `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return (left, top, left + w, top + h)


def eval_box(width: int, height: int, size: int) -> tuple[tuple[int, int], Box]:
  """(resize_to, crop box) of the official eval transform, in the resized image's pixels.

  Below 384 px: resize the shorter side to int(size / 0.875) (256 for 224), then a centre crop of `size`.
  At 384 and above: squash the whole image to size x size (the official 384 models were evaluated so).
  """
  if size >= 384:
    return (size, size), (0, 0, size, size)
  short = int(size / EVAL_CROP_PCT)
  if width <= height:
    new_w, new_h = short, int(short * height / width)
  else:
    new_w, new_h = int(short * width / height), short
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return (new_w, new_h), (left, top, left + size, top + size)


def _decode_window(img: Image.Image, box: Box, out_size: tuple[int, int]) -> tuple[Image.Image, Box]:
  """Decodes `img` (at a reduced JPEG scale when `box` stays >= out_size) to RGB; returns the scaled box."""
  if img.format == "JPEG":
    w, h = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    # Ask libjpeg for the smallest DCT scale that keeps the crop window at least out_size.
    want = (math.ceil(w * out_size[0] / bw), math.ceil(h * out_size[1] / bh))
    img.draft("RGB", want)
    sx, sy = img.size[0] / w, img.size[1] / h
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  if img.mode != "RGB":
    img = img.convert("RGB")  # greyscale, CMYK, palette, RGBA...
  return img, box


def train_image(path: str | os.PathLike, size: int, rng: np.random.Generator) -> np.ndarray:
  """Random-resized crop (bicubic) + horizontal flip (p=0.5) -> uint8 (size, size, 3)."""
  with Image.open(path) as img:
    box = random_resized_crop_box(rng, *img.size)
    flip = rng.random() < 0.5
    img, box = _decode_window(img, box, (size, size))
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, dtype=np.uint8)


def eval_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """The official eval transform (see `eval_box`) -> uint8 (size, size, 3)."""
  with Image.open(path) as img:
    w, h = img.size
    (new_w, new_h), (left, top, right, lower) = eval_box(w, h, size)
    # The crop box expressed in source pixels, so resize + crop is one PIL call.
    sx, sy = w / new_w, h / new_h
    src_box = (left * sx, top * sy, right * sx, lower * sy)
    img, src_box = _decode_window(img, src_box, (size, size))
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=src_box)
  return np.asarray(out, dtype=np.uint8)


# The same transforms as tf.data ops for the TFDS path (TensorFlow is imported only when they are traced).


def tf_train_image(encoded, seed, *, size: int, is_jpeg: bool):
  """Random-resized crop + flip of an encoded image; JPEGs decode only the crop window.

  The window comes from `stateless_sample_distorted_bounding_box` (same area/ratio ranges and 10 tries as
  `random_resized_crop_box`; when all tries fail it takes the whole image instead of a centre crop).

  Args:
    encoded: scalar tf.string, the encoded image.
    seed: int64 (2,), the stateless seed of this example.
    size: output side.
    is_jpeg: whether every image of the dataset is a JPEG (then `decode_and_crop_jpeg` is used).

  Returns:
    tf.uint8 (size, size, 3).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if is_jpeg:
    shape = tf.image.extract_jpeg_shape(encoded)
  else:
    decoded = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(decoded)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=crop_seed,
      min_object_covered=0.0, aspect_ratio_range=TRAIN_RATIO, area_range=TRAIN_SCALE, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  if is_jpeg:
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
  else:
    image = decoded[y:y + h, x:x + w]
  image = _tf_resize_uint8(image, (size, size))
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def tf_eval_image(encoded, *, size: int):
  """`eval_box`'s transform on an encoded image -> tf.uint8 (size, size, 3)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  if size >= 384:
    return _tf_resize_uint8(image, (size, size))
  hw = tf.cast(tf.shape(image)[:2], tf.float64)
  short = int(size / EVAL_CROP_PCT)
  new_hw = tf.cast(tf.floor(hw * short / tf.reduce_min(hw)), tf.int32)
  new_hw = tf.where(hw == tf.reduce_min(hw), short, new_hw)  # the shorter side is exactly `short`
  image = _tf_resize_uint8(image, new_hw)
  top, left = tf.unstack(tf.cast(tf.round(tf.cast(new_hw - size, tf.float32) / 2), tf.int32))
  return tf.ensure_shape(image[top:top + size, left:left + size], (size, size, 3))


def _tf_resize_uint8(image, size):
  """Bicubic resize with antialiasing (PIL's filter support when downscaling), rounded to uint8."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.image.resize(image, size, method="bicubic", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
