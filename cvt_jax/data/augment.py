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

The chain works on channels-first (B, 3, H, W) images: TPUs tile the two minor axes of an array in
(8, 128), so an NHWC array pads its 3 channels to 128 lanes, and the augmentation of a batch was most of
a train step's memory (bench/README.md, fifth round). The resampling and the table lookup
come in two formulations (`cvt_jax.ops` kernels): 'cpu' gathers the taps and table entries, which XLA:CPU
does fast; 'plain' (GPU/TPU) uses no gather at all (a TPU gather costs about a memory tile per element):
the bicubic taps of each output tile are a small matrix product against a window of the image, the tables
closed forms and 256-way comparisons. Both give PIL's pixels (tested against PIL).
"""

from __future__ import annotations

import math
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvt_jax import model as model_lib
from cvt_jax import ops

FILL_RGB = tuple(round(255 * m) for m in model_lib.MEAN_RGB)  # (124, 116, 104): timm's `img_mean` fill

RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
            "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_PIXEL_MAP = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd")
_ENHANCE = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
_FAMILIES = (_GEOMETRIC, _PIXEL_MAP, _ENHANCE)
# Per op of RAND_OPS: its family and its index within the family.
_FAMILY = np.array([next(f for f, ops_ in enumerate(_FAMILIES) if op in ops_) for op in RAND_OPS])
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


# -------------------------------------------------------------------------------------- RandAugment --


def rand_augment(rng: jax.Array, planes: jax.Array, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, kernels: ops.Kernels = "cpu") -> jax.Array:
  """timm's RandAugment (increasing op set) on a uint8 (B, 3, H, W) batch, independently per image.

  Args:
    rng: PRNG key.
    planes: uint8 (B, 3, H, W).
    num_ops: ops per image, drawn with replacement from RAND_OPS.
    magnitude: mean magnitude on timm's 0..10 scale.
    magnitude_std: std of the per-op magnitude (clipped to [0, 10] after sampling).
    kernels: 'cpu' (gathers) or 'plain' (no gathers: GPU/TPU); the same pixels.

  Returns:
    uint8 (B, 3, H, W).
  """
  if planes.dtype != jnp.uint8 or planes.ndim != 4 or planes.shape[1] != 3:
    raise ValueError(f"rand_augment wants uint8 (B, 3, H, W) images, got {planes.dtype} {planes.shape}")
  batch = planes.shape[0]
  # Few, batched random draws: each jax.random call adds to the compile time.
  k_uniform, k_normal = jax.random.split(rng)
  u_op, u_apply, u_sign = jax.random.uniform(k_uniform, (3, num_ops, batch))
  op = jnp.minimum(jnp.floor(u_op * len(RAND_OPS)).astype(jnp.int32), len(RAND_OPS) - 1)
  apply = u_apply < 0.5
  signs = jnp.where(u_sign < 0.5, -1.0, 1.0)
  mags = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_normal, (num_ops, batch)), 0.0, 10.0)

  def layer(planes, args):  # a scan, so the op graph is compiled once for all layers
    op_, apply_, mag, sign = args
    out = apply_ops(planes, op_, mag / 10, sign, kernels)
    return jnp.where(apply_[:, None, None, None], out, planes), None

  return jax.lax.scan(layer, planes, (op, apply, mags, signs))[0]


def apply_ops(planes: jax.Array, op: jax.Array, level: jax.Array, sign: jax.Array,
              kernels: ops.Kernels = "cpu") -> jax.Array:
  """One RandAugment op per image of uint8 (B, 3, H, W).

  Args:
    planes: uint8 (B, 3, H, W).
    op: int (B,), indices into RAND_OPS.
    level: (B,) magnitude / 10, in [0, 1].
    sign: (B,) +-1, the random negation of the signed ops (rotate, shear, translate, enhance).
    kernels: 'cpu' or 'plain' (see the module docstring).

  Returns:
    uint8 (B, 3, H, W).
  """
  family = jnp.asarray(_FAMILY)[op][:, None, None, None]
  index = jnp.asarray(_INDEX_IN_FAMILY)[op]
  level, sign = jnp.asarray(level, jnp.float32), jnp.asarray(sign, jnp.float32)
  geometric = _geometric(planes, index, level, sign, kernels)
  pixel_map = _pixel_map(planes, index, level, kernels)
  enhance = _enhance(planes, index, level, sign)
  return jnp.where(family == 0, geometric, jnp.where(family == 1, pixel_map, enhance))


def _geometric(planes: jax.Array, index: jax.Array, level: jax.Array, sign: jax.Array,
               kernels: ops.Kernels) -> jax.Array:
  """Rotate / ShearX / ShearY / TranslateXRel / TranslateYRel via PIL's AFFINE output->input matrix."""
  height, width = planes.shape[2:]
  angle = -jnp.deg2rad(sign * level * 30.0)  # PIL's Image.rotate, about the image centre
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2, height / 2
  rotate = jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], axis=-1)
  shear = sign * level * 0.3
  shift = sign * level * 0.45
  one, zero = jnp.ones_like(shear), jnp.zeros_like(shear)
  matrices = jnp.stack([
      rotate,
      jnp.stack([one, shear, zero, zero, one, zero], axis=-1),
      jnp.stack([one, zero, zero, shear, one, zero], axis=-1),
      jnp.stack([one, zero, shift * width, zero, one, zero], axis=-1),
      jnp.stack([one, zero, zero, zero, one, shift * height], axis=-1),
  ], axis=1)  # (B, 5, 6)
  return affine_transform(planes, jnp.take_along_axis(matrices, index[:, None, None], axis=1)[:, 0], kernels)


def affine_transform(planes: jax.Array, matrix: jax.Array, kernels: ops.Kernels = "cpu",
                     fill: tuple[int, ...] = FILL_RGB) -> jax.Array:
  """PIL's `Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill)` on uint8 (B, 3, H, W).

  Output pixel (x, y) samples the input at (a, b, c, d, e, f) @ (x + .5, y + .5, 1) (pixel centres),
  one (B, 6) matrix row per image; samples outside the image take `fill`, inside ones use PIL's cubic
  (a = -1) with clamped taps: each row of taps weighted by x first, then the rows by y, as PIL does.
  """
  _, _, height, width = planes.shape
  a, b, c, d, e, f = (m[:, None, None] for m in matrix.T)
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                        jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
  x_in = a * xs + b * ys + c  # (B, H, W)
  y_in = d * xs + e * ys + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  resample = _resample_gathered if kernels == "cpu" else _resample_tiled
  value = resample(planes, x_in - 0.5, y_in - 0.5)  # (B, 3, H, W) float32
  # PIL truncates a double; a float32 sum lands just below an exact integer (e.g. on flat regions), so
  # nudge it up by far less than the spacing of distinct results.
  value = jnp.floor(jnp.clip(value + 1e-3, 0, 255))
  fill = jnp.asarray(fill, jnp.float32)[None, :, None, None]
  return jnp.where(inside[:, None], value, fill).astype(jnp.uint8)


def _cubic_weights(t: jax.Array) -> list[jax.Array]:
  """PIL Geometry.c's BICUBIC (a = -1) tap weights for fraction t: 4 arrays like t."""
  t2, t3 = t * t, t * t * t
  return [-t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, t3 - t2]


def _resample_gathered(planes: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  """Bicubic samples at (x, y) (pixel centre = integer): the 16 taps gathered from the three channels
  packed into one uint32 per pixel (a gather of (.., 3) slices pads 3 -> 128 lanes on TPU)."""
  batch, channels, height, width = planes.shape

  def taps(coord, size):  # the 4 clamped tap indices around coord (leading axis) and the fraction
    base = jnp.floor(coord)
    return jnp.clip(base[None].astype(jnp.int32) + jnp.arange(-1, 3)[:, None, None, None], 0, size - 1), \
        coord - base

  x0, dx = taps(x, width)
  y0, dy = taps(y, height)
  pixels = planes.astype(jnp.uint32)
  packed = pixels[:, 0] | (pixels[:, 1] << 8) | (pixels[:, 2] << 16)  # (B, H, W)
  offset = (jnp.arange(batch, dtype=jnp.int32) * (height * width))[:, None, None]
  flat = (y0[:, None] * width + x0[None, :]) + offset  # (4, 4, B, H, W)
  gathered = jnp.take(packed.reshape(-1), flat, mode="clip")
  wy, wx = _cubic_weights(dy), _cubic_weights(dx)
  out = []
  for channel in range(channels):
    p = ((gathered >> (8 * channel)) & 255).astype(jnp.float32)
    rows = [wx[0] * p[i, 0] + wx[1] * p[i, 1] + wx[2] * p[i, 2] + wx[3] * p[i, 3] for i in range(4)]
    out.append(wy[0] * rows[0] + wy[1] * rows[1] + wy[2] * rows[2] + wy[3] * rows[3])
  return jnp.stack(out, axis=1)


# Output tiles of `_resample_tiled` and the input windows that hold every tap of a tile: for RandAugment's
# matrices (rotation <= 30 degrees, shear <= 0.3) the x taps of an (8, 32) tile span <= 38 columns, the
# y taps <= 26 rows, so (32, 40) windows of the edge-padded image suffice.
_TILE_H, _TILE_W = 8, 32
_WINDOW_H, _WINDOW_W = 32, 40


def _split3(w: jax.Array) -> jax.Array:
  """float32 -> three bfloat16 parts that sum exactly to it, concatenated on the last axis."""
  hi = w.astype(jnp.bfloat16)
  rest = w - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  return jnp.concatenate([hi, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)], axis=-1)


def _tap_matrix(base: jax.Array, fraction: jax.Array, origin: jax.Array, size: int) -> jax.Array:
  """(B, P) tap bases and fractions -> (B, P, size): cubic weight j at window index base + 1 + j - origin."""
  offset = jnp.arange(size, dtype=jnp.int32) - (base + 1 - origin[:, None])[..., None]
  w = _cubic_weights(fraction[..., None])
  return jnp.where(offset == 0, w[0], jnp.where(offset == 1, w[1], jnp.where(
      offset == 2, w[2], jnp.where(offset == 3, w[3], 0.0))))


def _resample_tiled(planes: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  """Bicubic samples at (x, y) without a gather: per (8, 32) output tile, the taps lie in one (32, 40)
  window of the edge-padded image (edge padding = PIL's clamped taps). The x interpolation is a
  (pixels x 40) weight matrix times the window on the matrix unit, the weights split into three bfloat16
  parts (the pixels are exact in bfloat16, so every product is exact), the y interpolation a weighted sum
  over the window's rows."""
  batch, channels, height, width = planes.shape
  bx, by = jnp.floor(x), jnp.floor(y)
  fx, fy = x - bx, y - by
  # Samples outside the image become the fill: clamping their taps keeps every window in range.
  bx = jnp.clip(bx, -1, width - 1).astype(jnp.int32)
  by = jnp.clip(by, -1, height - 1).astype(jnp.int32)
  padded = jnp.pad(planes, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge").astype(jnp.bfloat16)
  window_h, window_w = min(_WINDOW_H, height + 4), min(_WINDOW_W, width + 4)
  tiles_y, tiles_x = -(-height // _TILE_H), -(-width // _TILE_W)
  grid_h, grid_w = tiles_y * _TILE_H, tiles_x * _TILE_W

  def tiled(v):  # (B, H, W) -> (tiles, B, TH * TW), padded with edge values
    v = jnp.pad(v, ((0, 0), (0, grid_h - height), (0, grid_w - width)), mode="edge")
    v = v.reshape(batch, tiles_y, _TILE_H, tiles_x, _TILE_W).transpose(1, 3, 0, 2, 4)
    return v.reshape(tiles_y * tiles_x, batch, _TILE_H * _TILE_W)

  window = jax.vmap(lambda img, oy, ox: jax.lax.dynamic_slice(img, (0, oy, ox), (channels, window_h, window_w)))

  def tile(_, args):
    bx_t, fx_t, by_t, fy_t = args  # (B, P)
    ox = jnp.clip(jnp.min(bx_t, axis=1) + 1, 0, width + 4 - window_w)  # padded column of tap bx - 1
    oy = jnp.clip(jnp.min(by_t, axis=1) + 1, 0, height + 4 - window_h)
    win = window(padded, oy, ox)  # (B, C, window_h, window_w)
    wx = _split3(_tap_matrix(bx_t, fx_t, ox, window_w))  # (B, P, 3 window_w)
    wy = _tap_matrix(by_t, fy_t, oy, window_h)  # (B, P, window_h)
    rows = jnp.einsum("bpk,bcyk->bcpy", wx, jnp.concatenate([win] * 3, axis=-1),
                      preferred_element_type=jnp.float32)  # each window row interpolated at each x
    return None, jnp.sum(rows * wy[:, None], axis=-1)  # (B, C, P)

  _, out = jax.lax.scan(tile, None, (tiled(bx), tiled(fx), tiled(by), tiled(fy)))  # (tiles, B, C, P)
  out = out.reshape(tiles_y, tiles_x, batch, channels, _TILE_H, _TILE_W).transpose(2, 3, 0, 4, 1, 5)
  return out.reshape(batch, channels, grid_h, grid_w)[:, :, :height, :width]


def _pixel_map(planes: jax.Array, index: jax.Array, level: jax.Array, kernels: ops.Kernels) -> jax.Array:
  """AutoContrast / Equalize / Invert / PosterizeIncreasing / SolarizeIncreasing / SolarizeAdd.

  'cpu': one lookup table per image and channel, gathered; 'plain': the maps in closed form, Equalize's
  histogram and lookup as 256-way compare-and-sum reductions (fused: nothing (.., 256) per pixel is kept).
  """
  pixels = planes.astype(jnp.int32)  # (B, 3, H, W)
  batch, channels, height, width = pixels.shape
  values = jnp.arange(256, dtype=jnp.int32)
  level = level[:, None, None, None]
  bits = 4 - jnp.floor(level * 4).astype(jnp.int32)
  mask = 255 - (jnp.left_shift(1, 8 - bits) - 1)
  threshold = 256 - jnp.floor(level * 256).astype(jnp.int32)
  add = jnp.floor(level * 110).astype(jnp.int32)
  if kernels == "cpu":
    rows = (jnp.arange(batch * channels, dtype=jnp.int32) * 256).reshape(batch, channels, 1, 1)
    hist = jnp.zeros((batch * channels * 256,), jnp.int32).at[(rows + pixels).reshape(-1)].add(
        1, mode="promise_in_bounds").reshape(batch, channels, 256)
    maps = [_autocontrast_lut(hist), _equalize_lut(hist), 255 - values, values & mask[..., 0],
            jnp.where(values < threshold[..., 0], values, 255 - values),
            jnp.where(values < 128, jnp.minimum(values + add[..., 0], 255), values)]
    table = _select(index[:, None, None], [jnp.broadcast_to(m, hist.shape) for m in maps])
    return jnp.take(table.reshape(-1), rows + pixels, mode="clip").astype(jnp.uint8)
  lo = jnp.min(pixels, axis=(2, 3), keepdims=True)  # AutoContrast needs only each channel's range
  hi = jnp.max(pixels, axis=(2, 3), keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1)
  autocontrast = jnp.where(hi > lo, jnp.clip((pixels * scale - lo * scale).astype(jnp.int32), 0, 255), pixels)
  flat = pixels.reshape(batch, channels, 1, height * width)
  hist = jnp.sum(flat == values[:, None], axis=-1, dtype=jnp.int32)
  lut = _equalize_lut(hist)
  equalize = jnp.sum(jnp.where(pixels[..., None] == values, lut[:, :, None, None, :], 0), axis=-1)
  maps = [autocontrast, equalize, 255 - pixels, pixels & mask,
          jnp.where(pixels < threshold, pixels, 255 - pixels),
          jnp.where(pixels < 128, jnp.minimum(pixels + add, 255), pixels)]
  return _select(index[:, None, None, None], maps).astype(jnp.uint8)


def _select(index: jax.Array, choices: list[jax.Array]) -> jax.Array:
  """choices[index], elementwise (index broadcasts against the choices)."""
  out = choices[-1]
  for k in range(len(choices) - 2, -1, -1):
    out = jnp.where(index == k, choices[k], out)
  return out


def _autocontrast_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.autocontrast (cutoff 0): stretch [min, max] of each channel to [0, 255]."""
  present = hist > 0
  values = jnp.arange(256)
  lo = jnp.min(jnp.where(present, values, 255), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(present, values, 0), axis=-1, keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1)
  stretched = jnp.clip((values * scale - lo * scale).astype(jnp.int32), 0, 255)
  return jnp.where(hi > lo, stretched, values)


def _equalize_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.equalize: the histogram's cumulative counts in steps of (N - count of the top value) // 255."""
  values = jnp.arange(256)
  top = jnp.max(jnp.where(hist > 0, values, -1), axis=-1, keepdims=True)
  top_count = jnp.take_along_axis(hist, top, axis=-1)
  step = (jnp.sum(hist, axis=-1, keepdims=True) - top_count) // 255
  before = jnp.cumsum(hist, axis=-1) - hist  # pixels strictly below each value
  lut = jnp.clip((step // 2 + before) // jnp.maximum(step, 1), 0, 255)
  # A single grey level, or too few pixels for one step: PIL leaves the channel unchanged.
  return jnp.where(step > 0, lut, values)


def _enhance(planes: jax.Array, index: jax.Array, level: jax.Array, sign: jax.Array) -> jax.Array:
  """ColorIncreasing / ContrastIncreasing / BrightnessIncreasing / SharpnessIncreasing (ImageEnhance)."""
  pixels = planes.astype(jnp.int32)
  grey = _luma(pixels)  # (B, H, W)
  contrast_mean = jnp.floor(jnp.mean(grey.astype(jnp.float32), axis=(1, 2)) + 0.5)
  degenerate = _select(index[:, None, None, None], [grey[:, None].astype(jnp.float32),
                                                    contrast_mean[:, None, None, None],
                                                    jnp.float32(0), _smooth(pixels)])
  factor = jnp.maximum(0.1, 1.0 + sign * level * 0.9)[:, None, None, None]
  # Image.blend truncates towards zero after the blend (the result is >= 0 once clipped).
  out = degenerate + factor * (planes.astype(jnp.float32) - degenerate)
  return jnp.floor(jnp.clip(out, 0, 255)).astype(jnp.uint8)


def _luma(pixels: jax.Array) -> jax.Array:
  """PIL's RGB -> L conversion (ITU-R 601-2, fixed point with rounding): (B, 3, H, W) -> (B, H, W)."""
  return (pixels[:, 0] * 19595 + pixels[:, 1] * 38470 + pixels[:, 2] * 7471 + 0x8000) >> 16


def _smooth(pixels: jax.Array) -> jax.Array:
  """ImageFilter.SMOOTH (3x3 kernel 1s with centre 5, / 13); the one-pixel border stays as it is."""
  x = pixels.astype(jnp.float32)
  padded = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  height, width = x.shape[2:]
  box = sum(padded[:, :, i:i + height, j:j + width] for i in range(3) for j in range(3))
  smooth = jnp.floor((box + 4 * x) / 13 + 0.5)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  return jnp.where(interior, smooth, x)


# ---------------------------------------------------------------------------------- random erasing --


def random_erasing(rng: jax.Array, planes: jax.Array, prob: float = 0.25,
                   area: tuple[float, float] = (0.02, 1 / 3),
                   aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> jax.Array:
  """timm's RandomErasing(mode='pixel', max_count=1) on normalised float (B, C, H, W) images.

  With probability `prob` per image, one box (the first of `attempts` draws of area fraction x
  log-uniform aspect that fits strictly inside the image) is replaced by N(0, 1) noise.
  """
  batch, _, height, width = planes.shape
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
  noise = jax.random.normal(k_noise, planes.shape, planes.dtype)
  return jnp.where(inside[:, None], noise, planes)


# --------------------------------------------------------------------------------- mixup / cutmix --


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's targets: off = smoothing / classes, on = 1 - smoothing + off."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(u_y: jax.Array, u_x: jax.Array, height: int, width: int,
               lam: jax.Array) -> tuple[jax.Array, ...]:
  """timm's `rand_bbox` as of timm 0.3.2 (the official code's): rows centre +- int(sqrt(1-lam) H) // 2 around
  a uniform centre, columns alike, clipped.

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


def mixup_cutmix(rng: jax.Array, planes: jax.Array, labels: jax.Array, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1, shards: int = 1) -> tuple[jax.Array, jax.Array]:
  """timm's Mixup in 'batch' mode (prob 1) on each of `shards` equal, contiguous slices of a batch of
  (B, C, H, W) images.

  As in the official code, where each GPU mixes its own batch: per slice one lambda, and each image is mixed
  with the slice reversed. With one slice per device no image crosses devices. Cutmix (chosen with
  `switch_prob` when both alphas are > 0) pastes a box of the reversed slice and sets lambda to the kept
  area fraction. Targets are smoothed one-hots mixed with the same lambda.

  Returns:
    (images, soft targets float32 (B, num_classes)).
  """
  batch, _, height, width = planes.shape
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return planes, targets
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
  top, bottom, left, right = (v[:, None, None] for v in cutmix_box(u_y, u_x, height, width, lam_cut))
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (shards, H, W)
  lam_box = 1.0 - ((bottom - top) * (right - left))[:, 0, 0] / (height * width)
  lam = jnp.where(use_cutmix, lam_box, lam_mix).astype(jnp.float32)

  per_shard = lambda v: v[:, None, None, None, None]  # (shards,) against (shards, B / shards, C, H, W)
  by_shard = planes.reshape(shards, batch // shards, *planes.shape[1:])
  flipped = by_shard[:, ::-1]
  cut = jnp.where(in_box[:, None, None], flipped, by_shard)
  mixed = per_shard(lam_mix) * by_shard + (1.0 - per_shard(lam_mix)) * flipped
  planes = jnp.where(per_shard(use_cutmix), cut, mixed.astype(planes.dtype)).reshape(planes.shape)
  targets = targets.reshape(shards, batch // shards, num_classes)
  targets = lam[:, None, None] * targets + (1.0 - lam[:, None, None]) * targets[:, ::-1]
  return planes, targets.reshape(batch, num_classes)


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
                  config: Any, shards: int = 1, kernels: ops.Kernels = "cpu") -> tuple[jax.Array, jax.Array]:
  """The device-side training chain: RandAugment -> normalise -> erasing -> mixup/cutmix + smoothing.

  Args:
    rng: PRNG key (fold in the step outside).
    images: uint8 (B, H, W, 3) from the host pipeline (already cropped and flipped).
    labels: int (B,).
    num_classes: size of the soft targets.
    config: `config.augment` (keys of `default_config()`; missing keys take the recipe's values).
    shards: mixup/cutmix pair images within this many equal slices of the batch (one per device).
    kernels: RandAugment's formulation, 'cpu' or 'plain' (see the module docstring).

  Returns:
    (float32 normalised images (B, H, W, 3), float32 soft targets (B, num_classes)).
  """
  cfg = _settings(config)
  k_ra, k_erase, k_mix = jax.random.split(rng, 3)
  planes = images.transpose(0, 3, 1, 2)  # TPUs lay out NHWC parameters channel-major: a free transpose
  if cfg.randaugment:
    planes = rand_augment(k_ra, planes, cfg.randaugment_num_ops, cfg.randaugment_magnitude,
                          cfg.randaugment_magnitude_std, kernels)
  planes = model_lib.normalize(planes, channel_axis=1)
  if cfg.erasing_prob > 0:
    planes = random_erasing(k_erase, planes, cfg.erasing_prob)
  planes, targets = mixup_cutmix(k_mix, planes, labels, num_classes, cfg.mixup_alpha, cfg.cutmix_alpha,
                                 cfg.mixup_switch_prob, cfg.label_smoothing, shards)
  return planes.transpose(0, 2, 3, 1), targets
