"""Device-side training augmentation on a batch, in pure JAX (jit-able, static shapes).

The recipe's chain after the host's crop + flip, in timm's order: RandAugment `rand-m9-mstd0.5-inc1` on
uint8 -> normalise -> random erasing (p 0.25, 'pixel' mode) -> mixup/cutmix with label smoothing.

RandAugment reproduces timm's `auto_augment.py` on PIL images: the same 15 "increasing" ops, each chosen
op applied with probability 0.5, magnitude ~ N(m, std) clipped to [0, 10], a random sign for the signed
ops, geometric ops sampled bicubically (PIL's a=-1 cubic, timm's interpolation under the CvT config)
with out-of-image pixels set to the mean pixel. Each op is written to match its PIL definition (ImageOps,
ImageEnhance, Image.transform) and tested against PIL. dm-pix's ops do not fit: its affine sampler stops at
bilinear and blends the fill into the border, its brightness is additive and its contrast per-channel,
while PIL's are a blend with black and with the global grey mean.

For a batch, every op falls in one of three families that share one computation: the geometric ops are one
affine resampling, the pixel-map ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd)
one lookup table per channel, the enhance ops (Color, Contrast, Brightness, Sharpness) one blend with a
degenerate image. Per image, the op's family result is selected, so a layer costs three ops, not fifteen.
"""

from __future__ import annotations

import math
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
FILL_RGB = tuple(round(255 * m) for m in MEAN_RGB)  # (124, 116, 104): timm's `img_mean` fill

RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
            "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_PIXEL_MAP = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd")
_ENHANCE = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
_FAMILIES = (_GEOMETRIC, _PIXEL_MAP, _ENHANCE)
# Per op of RAND_OPS: its family and its index within the family.
_FAMILY = np.array([next(f for f, ops in enumerate(_FAMILIES) if op in ops) for op in RAND_OPS])
_INDEX_IN_FAMILY = np.array([_FAMILIES[f].index(op) for f, op in zip(_FAMILY, RAND_OPS)])


def default_config() -> dict[str, Any]:
  """`config.augment`: the official recipe; tiny demo runs turn pieces down or off.

  A plain dict (configs wrap it in a ConfigDict) so the training step imports without ml_collections.
  """
  return {
      "randaugment": True,  # timm rand-m{magnitude}-mstd{magnitude_std}-inc1 with num_ops layers
      "randaugment_num_ops": 2,
      "randaugment_magnitude": 9.0,
      "randaugment_magnitude_std": 0.5,
      "erasing_prob": 0.25,
      "mixup_alpha": 0.8,  # 0 disables mixup
      "cutmix_alpha": 1.0,  # 0 disables cutmix
      "mixup_switch_prob": 0.5,  # chance of cutmix when both are on
      "label_smoothing": 0.1,
  }


def normalize(images: jax.Array) -> jax.Array:
  """uint8 NHWC -> float32 with the ImageNet mean/std."""
  mean = jnp.asarray(MEAN_RGB, jnp.float32) * 255
  inv_std = 1 / (jnp.asarray(STD_RGB, jnp.float32) * 255)
  return (images.astype(jnp.float32) - mean) * inv_std



# -------------------------------------------------------------------------------------- RandAugment --


def rand_augment(rng: jax.Array, images: jax.Array, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5) -> jax.Array:
  """timm's RandAugment (increasing op set) on a uint8 NHWC batch, independently per image.

  Args:
    rng: PRNG key.
    images: uint8 (B, H, W, 3).
    num_ops: ops per image, drawn with replacement from RAND_OPS.
    magnitude: mean magnitude on timm's 0..10 scale.
    magnitude_std: std of the per-op magnitude (clipped to [0, 10] after sampling).

  Returns:
    uint8 (B, H, W, 3).
  """
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"rand_augment wants uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}")
  batch = images.shape[0]
  # Few, batched random draws: each jax.random call adds to the compile time.
  k_uniform, k_normal = jax.random.split(rng)
  u_op, u_apply, u_sign = jax.random.uniform(k_uniform, (3, num_ops, batch))
  ops = jnp.minimum(jnp.floor(u_op * len(RAND_OPS)).astype(jnp.int32), len(RAND_OPS) - 1)
  apply = u_apply < 0.5
  signs = jnp.where(u_sign < 0.5, -1.0, 1.0)
  mags = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_normal, (num_ops, batch)), 0.0, 10.0)

  def layer(images, args):  # a scan, so the op graph is compiled once for all layers
    op, apply_, mag, sign = args
    out = jax.vmap(apply_op)(images, op, mag / 10, sign)
    return jnp.where(apply_[:, None, None, None], out, images), None

  return jax.lax.scan(layer, images, (ops, apply, mags, signs))[0]


def apply_op(image: jax.Array, op: jax.Array, level: jax.Array, sign: jax.Array) -> jax.Array:
  """One RandAugment op on one uint8 (H, W, 3) image.

  Args:
    image: uint8 (H, W, 3).
    op: int index into RAND_OPS.
    level: magnitude / 10, in [0, 1].
    sign: +-1, the random negation of the signed ops (rotate, shear, translate, enhance).

  Returns:
    uint8 (H, W, 3).
  """
  op = jnp.asarray(op)
  family = jnp.asarray(_FAMILY)[op]
  index = jnp.asarray(_INDEX_IN_FAMILY)[op]
  results = (_geometric(image, index, level, sign), _pixel_map(image, index, level),
             _enhance(image, index, level, sign))
  return jnp.select([family == f for f in range(len(_FAMILIES))], results)


def _geometric(image: jax.Array, index: jax.Array, level: jax.Array, sign: jax.Array) -> jax.Array:
  """Rotate / ShearX / ShearY / TranslateXRel / TranslateYRel via PIL's AFFINE output->input matrix."""
  height, width = image.shape[:2]
  angle = -jnp.deg2rad(sign * level * 30.0)  # PIL's Image.rotate, about the image centre
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2, height / 2
  rotate = jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])
  shear = sign * level * 0.3
  shift = sign * level * 0.45
  one, zero = jnp.ones_like(shear), jnp.zeros_like(shear)
  matrices = jnp.stack([
      rotate,
      jnp.stack([one, shear, zero, zero, one, zero]),
      jnp.stack([one, zero, zero, shear, one, zero]),
      jnp.stack([one, zero, shift * width, zero, one, zero]),
      jnp.stack([one, zero, zero, zero, one, shift * height]),
  ])
  return affine_transform(image, matrices[index])


def affine_transform(image: jax.Array, matrix: jax.Array, fill: tuple[int, ...] = FILL_RGB) -> jax.Array:
  """PIL's `Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill)` on uint8 (H, W, C).

  Output pixel (x, y) samples the input at (a, b, c, d, e, f) @ (x + .5, y + .5, 1) (pixel centres);
  samples outside the image take `fill`, inside ones use PIL's cubic (a = -1) with clamped taps.
  """
  height, width = image.shape[:2]
  a, b, c, d, e, f = matrix
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                        jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  x0, dx = _cubic_taps(x_in - 0.5, width)
  y0, dy = _cubic_taps(y_in - 0.5, height)
  flat = (y0[..., :, None] * width + x0[..., None, :]).reshape(-1)  # row gathers are cheaper
  patch = image.reshape(-1, image.shape[-1])[flat].reshape(height, width, 4, 4, -1).astype(jnp.float32)
  value = jnp.einsum("hwi,hwj,hwijc->hwc", _cubic_weights(dy), _cubic_weights(dx), patch)
  # PIL truncates a double; a float32 sum lands just below an exact integer (e.g. on flat regions), so
  # nudge it up by far less than the spacing of distinct results.
  value = jnp.floor(jnp.clip(value + 1e-3, 0, 255))
  return jnp.where(inside[..., None], value, jnp.asarray(fill, jnp.float32)).astype(jnp.uint8)


def _cubic_taps(coord: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The 4 clamped tap indices around `coord` (pixel-centre = integer) and the fraction."""
  base = jnp.floor(coord)
  taps = base[..., None].astype(jnp.int32) + jnp.arange(-1, 3)
  return jnp.clip(taps, 0, size - 1), coord - base


def _cubic_weights(t: jax.Array) -> jax.Array:
  """PIL Geometry.c's BICUBIC (a = -1) tap weights for fraction t: (..., 4)."""
  t2, t3 = t * t, t * t * t
  return jnp.stack([-t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, t3 - t2], axis=-1)


def _pixel_map(image: jax.Array, index: jax.Array, level: jax.Array) -> jax.Array:
  """AutoContrast / Equalize / Invert / PosterizeIncreasing / SolarizeIncreasing / SolarizeAdd."""
  pixels = image.astype(jnp.int32)
  channels = jnp.arange(3)
  hist = jnp.zeros((3, 256), jnp.int32).at[channels, pixels].add(1)  # (3, 256) per channel
  values = jnp.arange(256, dtype=jnp.int32)
  bits = 4 - jnp.floor(level * 4).astype(jnp.int32)
  mask = 255 - (jnp.left_shift(1, 8 - bits) - 1)
  threshold = 256 - jnp.floor(level * 256).astype(jnp.int32)
  add = jnp.floor(level * 110).astype(jnp.int32)
  tables = jnp.stack([
      _autocontrast_lut(hist),
      _equalize_lut(hist),
      jnp.broadcast_to(255 - values, (3, 256)),
      jnp.broadcast_to(values & mask, (3, 256)),
      jnp.broadcast_to(jnp.where(values < threshold, values, 255 - values), (3, 256)),
      jnp.broadcast_to(jnp.where(values < 128, jnp.minimum(values + add, 255), values), (3, 256)),
  ])
  return tables[index][channels, pixels].astype(jnp.uint8)


def _autocontrast_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.autocontrast (cutoff 0): stretch [min, max] of each channel to [0, 255]."""
  present = hist > 0
  values = jnp.arange(256)
  lo = jnp.min(jnp.where(present, values, 255), axis=1, keepdims=True)
  hi = jnp.max(jnp.where(present, values, 0), axis=1, keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1)
  stretched = jnp.clip((values * scale - lo * scale).astype(jnp.int32), 0, 255)
  return jnp.where(hi > lo, stretched, values)


def _equalize_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.equalize: the histogram's cumulative counts in steps of (N - count of the top value) // 255."""
  values = jnp.arange(256)
  top = jnp.max(jnp.where(hist > 0, values, -1), axis=1, keepdims=True)
  top_count = jnp.take_along_axis(hist, top, axis=1)
  step = (jnp.sum(hist, axis=1, keepdims=True) - top_count) // 255
  before = jnp.cumsum(hist, axis=1) - hist  # pixels strictly below each value
  lut = jnp.clip((step // 2 + before) // jnp.maximum(step, 1), 0, 255)
  # A single grey level, or too few pixels for one step: PIL leaves the channel unchanged.
  return jnp.where(step > 0, lut, values)


def _enhance(image: jax.Array, index: jax.Array, level: jax.Array, sign: jax.Array) -> jax.Array:
  """ColorIncreasing / ContrastIncreasing / BrightnessIncreasing / SharpnessIncreasing (ImageEnhance)."""
  pixels = image.astype(jnp.int32)
  grey = _luma(pixels)
  contrast_mean = jnp.floor(jnp.mean(grey.astype(jnp.float32)) + 0.5)
  degenerate = jnp.stack([
      jnp.broadcast_to(grey[..., None], image.shape).astype(jnp.float32),
      jnp.full(image.shape, contrast_mean),
      jnp.zeros(image.shape, jnp.float32),
      _smooth(pixels),
  ])[index]
  factor = jnp.maximum(0.1, 1.0 + sign * level * 0.9)
  # Image.blend truncates towards zero after the blend (the result is >= 0 once clipped).
  out = degenerate + factor * (image.astype(jnp.float32) - degenerate)
  return jnp.floor(jnp.clip(out, 0, 255)).astype(jnp.uint8)


def _luma(pixels: jax.Array) -> jax.Array:
  """PIL's RGB -> L conversion (ITU-R 601-2, fixed point with rounding)."""
  return (pixels[..., 0] * 19595 + pixels[..., 1] * 38470 + pixels[..., 2] * 7471 + 0x8000) >> 16


def _smooth(pixels: jax.Array) -> jax.Array:
  """ImageFilter.SMOOTH (3x3 kernel 1s with centre 5, / 13); the one-pixel border stays as it is."""
  x = pixels.astype(jnp.float32)
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  height, width = x.shape[:2]
  box = sum(padded[i:i + height, j:j + width] for i in range(3) for j in range(3))
  smooth = jnp.floor((box + 4 * x) / 13 + 0.5)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  return jnp.where(interior, smooth, x)


# ---------------------------------------------------------------------------------- random erasing --


def random_erasing(rng: jax.Array, images: jax.Array, prob: float = 0.25,
                   area: tuple[float, float] = (0.02, 1 / 3),
                   aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> jax.Array:
  """timm's RandomErasing(mode='pixel', max_count=1) on normalised float NHWC images.

  With probability `prob` per image, one box (the first of `attempts` draws of area fraction x
  log-uniform aspect that fits strictly inside the image) is replaced by N(0, 1) noise.
  """
  batch, height, width, _ = images.shape
  k_uniform, k_noise = jax.random.split(rng)
  u = jax.random.uniform(k_uniform, (batch, 2 * attempts + 3))
  u_area, u_aspect, (u_apply, u_top, u_left) = u[:, :attempts], u[:, attempts:-3], u[:, -3:].T
  target = (area[0] + (area[1] - area[0]) * u_area) * (height * width)
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  ratio = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
  h = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  h, w = pick(h), pick(w)
  erase = (u_apply < prob) & jnp.any(fits, axis=1)
  top = jnp.floor(u_top * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(u_left * (width - w + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]) & erase[:, None, None])
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)


# --------------------------------------------------------------------------------- mixup / cutmix --


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's targets: off = smoothing / classes, on = 1 - smoothing + off."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(u_y: jax.Array, u_x: jax.Array, height: int, width: int,
               lam: jax.Array) -> tuple[jax.Array, ...]:
  """timm's `rand_bbox`: a (sqrt(1-lam) H, sqrt(1-lam) W) box around a uniform centre, clipped.

  Args:
    u_y, u_x: uniform [0, 1) draws for the centre row and column (any shape, e.g. one per shard).
    height, width: image size.
    lam: the drawn mixing ratio, shaped like u_y.

  Returns:
    (top, bottom, left, right) int32 arrays shaped like u_y, bottom/right exclusive.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jnp.floor(u_y * height).astype(jnp.int32)
  cx = jnp.floor(u_x * width).astype(jnp.int32)
  return (jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
          jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width))


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1, shards: int = 1) -> tuple[jax.Array, jax.Array]:
  """timm's Mixup in 'batch' mode (prob 1) on each of `shards` equal, contiguous slices of the batch.

  As in the official code, where each GPU mixes its own batch: per slice one lambda, and each image is mixed
  with the slice reversed. With one slice per device no image crosses devices. Cutmix (chosen with
  `switch_prob` when both alphas are > 0) pastes a box of the reversed slice and sets lambda to the kept
  area fraction. Targets are smoothed one-hots mixed with the same lambda.

  Returns:
    (images, soft targets float32 (B, num_classes)).
  """
  batch, height, width = images.shape[:3]
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  if batch % shards:
    raise ValueError(f"mixup_cutmix: a batch of {batch} does not split into {shards} shards")
  k_uniform, k_beta = jax.random.split(rng)
  u_switch, u_y, u_x = jax.random.uniform(k_uniform, (3, shards))
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = u_switch < switch_prob
  else:
    use_cutmix = jnp.full((shards,), cutmix_alpha > 0)
  # Both lambdas in one draw (an alpha of 0 is replaced by 1; its lambda is then unused).
  alphas = jnp.broadcast_to(jnp.asarray([mixup_alpha or 1.0, cutmix_alpha or 1.0], jnp.float32), (shards, 2))
  lam_mix, lam_cut = jax.random.beta(k_beta, alphas, alphas).T
  top, bottom, left, right = (x[:, None, None] for x in cutmix_box(u_y, u_x, height, width, lam_cut))
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (shards, H, W)
  lam_box = 1.0 - ((bottom - top) * (right - left))[:, 0, 0] / (height * width)
  lam = jnp.where(use_cutmix, lam_box, lam_mix).astype(jnp.float32)

  by_shard = images.reshape(shards, batch // shards, *images.shape[1:])
  flipped = by_shard[:, ::-1]
  cut = jnp.where(in_box[:, None, :, :, None], flipped, by_shard)
  mixed = lam_mix[:, None, None, None, None] * by_shard + (1.0 - lam_mix[:, None, None, None, None]) * flipped
  images = jnp.where(use_cutmix[:, None, None, None, None], cut, mixed.astype(images.dtype))
  targets = targets.reshape(shards, batch // shards, num_classes)
  targets = lam[:, None, None] * targets + (1.0 - lam[:, None, None]) * targets[:, ::-1]
  return images.reshape(batch, *images.shape[2:]), targets.reshape(batch, num_classes)


# ------------------------------------------------------------------------------------- the chain --


def _settings(config: Any) -> types.SimpleNamespace:
  """`config` (the augment block, or a config holding one) over the defaults; unknown keys fail."""
  if "augment" in config:
    config = config["augment"]
  settings = default_config()
  unknown = sorted(set(config.keys()) - set(settings.keys()))
  if unknown:
    raise ValueError(f"unknown config.augment keys {unknown}; known: {sorted(settings.keys())}")
  settings.update(dict(config.items()))
  return types.SimpleNamespace(**settings)


def train_augment(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
                  config: Any, shards: int = 1) -> tuple[jax.Array, jax.Array]:
  """The device-side training chain: RandAugment -> normalise -> erasing -> mixup/cutmix + smoothing.

  Args:
    rng: PRNG key (fold in the step outside).
    images: uint8 (B, H, W, 3) from the host pipeline (already cropped and flipped).
    labels: int (B,).
    num_classes: size of the soft targets.
    config: `config.augment` (keys of `default_config()`; missing keys take the recipe's values).
    shards: mixup/cutmix pair images within this many equal slices of the batch (one per device).

  Returns:
    (float32 normalised images (B, H, W, 3), float32 soft targets (B, num_classes)).
  """
  cfg = _settings(config)
  k_ra, k_erase, k_mix = jax.random.split(rng, 3)
  if cfg.randaugment:
    images = rand_augment(k_ra, images, cfg.randaugment_num_ops, cfg.randaugment_magnitude,
                          cfg.randaugment_magnitude_std)
  images = normalize(images)
  if cfg.erasing_prob > 0:
    images = random_erasing(k_erase, images, cfg.erasing_prob)
  return mixup_cutmix(k_mix, images, labels, num_classes, cfg.mixup_alpha, cfg.cutmix_alpha,
                      cfg.mixup_switch_prob, cfg.label_smoothing, shards)
