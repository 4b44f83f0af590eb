"""Device augmentation: each RandAugment op against its PIL definition, erasing, mixup/cutmix, the chain.

Tolerances, on sklearn's two sample photos, a digit and a flat image at 96x128, four magnitudes/signs:
the pixel-map and enhance ops are exact except AutoContrast (PIL's double vs our float32 stretch:
|diff| <= 1 on 0.011 % of pixels measured, 0.1 % allowed); the bicubic geometric ops differ by at most 1 on
<= 0.38 % of pixels measured, 1 % allowed (float32 vs double before PIL's truncation).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import OPTIMISED
from PIL import Image, ImageEnhance, ImageOps
from sklearn.datasets import load_digits
from sklearn.datasets import load_sample_images

from cvt_jax import model as model_lib
from cvt_jax.data import augment

FILL = augment.FILL_RGB
_f32 = np.float32


def _lut(fn):
  return [fn(i) for i in range(256)] * 3


def pil_op(img: Image.Image, name: str, level: np.float32, sign: float) -> np.ndarray:
  """timm's auto_augment op with timm's level -> argument mapping (args in float32 like the JAX side)."""
  width, height = img.size
  factor = max(0.1, 1 + sign * float(level) * 0.9)
  affine = lambda m: img.transform(img.size, Image.Transform.AFFINE, m, resample=Image.Resampling.BICUBIC,
                                   fillcolor=FILL)
  bits = 4 - int(level * _f32(4))
  ops = {
      "AutoContrast": lambda: ImageOps.autocontrast(img),
      "Equalize": lambda: ImageOps.equalize(img),
      "Invert": lambda: ImageOps.invert(img),
      "Rotate": lambda: img.rotate(sign * float(level) * 30, resample=Image.Resampling.BICUBIC,
                                   fillcolor=FILL),
      # ImageOps.posterize's mask; Pillow >= 11 refuses bits=0, older ones (and timm at m=10) zero the image.
      "PosterizeIncreasing": lambda: img.point(_lut(lambda i: i & ~(2**(8 - bits) - 1))),
      "SolarizeIncreasing": lambda: ImageOps.solarize(img, 256 - int(level * _f32(256))),
      "SolarizeAdd": lambda: img.point(_lut(lambda i: min(255, i + int(level * _f32(110))) if i < 128 else i)),
      "ColorIncreasing": lambda: ImageEnhance.Color(img).enhance(factor),
      "ContrastIncreasing": lambda: ImageEnhance.Contrast(img).enhance(factor),
      "BrightnessIncreasing": lambda: ImageEnhance.Brightness(img).enhance(factor),
      "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(img).enhance(factor),
      "ShearX": lambda: affine((1, sign * float(level) * 0.3, 0, 0, 1, 0)),
      "ShearY": lambda: affine((1, 0, 0, sign * float(level) * 0.3, 1, 0)),
      "TranslateXRel": lambda: affine((1, 0, sign * float(level) * 0.45 * width, 0, 1, 0)),
      "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, sign * float(level) * 0.45 * height)),
  }
  return np.asarray(ops[name]())


@pytest.fixture(scope="module")
def photos():
  """sklearn's two sample photos, a digit (grey, flat background) and a flat image (degenerate stats)."""
  photos = [Image.fromarray(p).resize((128, 96), Image.Resampling.BICUBIC) for p in load_sample_images().images]
  digit = Image.fromarray((load_digits().images[0] * 15).astype(np.uint8)).resize((128, 96)).convert("RGB")
  flat = Image.new("RGB", (128, 96), (90, 90, 200))
  return [np.asarray(p) for p in (*photos, digit, flat)]


@pytest.mark.parametrize("kernels", ["cpu", "plain"])
def test_rand_augment_ops_match_pil(photos, kernels):
  """Both formulations: 'cpu' gathers the taps and table entries, 'plain' (GPU/TPU) gathers nothing. 256
  images of 96 x 128 px: the one test here whose program's run, not its compile, is the cost."""
  cases = [(p, k, name, _f32(level), sign) for p in photos for k, name in enumerate(augment.RAND_OPS)
           for level, sign in ((0.9, 1.0), (0.53, -1.0), (0.17, 1.0), (1.0, -1.0))]
  planes = jnp.asarray(np.stack([c[0] for c in cases]).transpose(0, 3, 1, 2))
  ours = jax.jit(augment.apply_ops, static_argnums=4, compiler_options=OPTIMISED)(
      planes, jnp.asarray([c[1] for c in cases]), jnp.asarray([c[3] for c in cases]),
      jnp.asarray([c[4] for c in cases], jnp.float32), kernels)
  worst = {}
  for out, (photo, _, name, level, sign) in zip(np.asarray(ours).transpose(0, 2, 3, 1), cases):
    ref = pil_op(Image.fromarray(photo), name, level, sign)
    diff = np.abs(out.astype(int) - ref.astype(int))
    max_diff, frac = worst.get(name, (0, 0.0))
    worst[name] = (max(max_diff, diff.max()), max(frac, np.mean(diff > 0)))
  for name, (max_diff, frac) in worst.items():
    geometric = name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    assert max_diff <= 1, (name, max_diff)
    assert frac <= (0.01 if geometric else 1e-3), (name, frac)


def test_rand_augment_batch_is_per_image_and_deterministic(photos):
  images = jnp.asarray(np.stack([photos[0].transpose(2, 0, 1)] * 16))
  fn = jax.jit(augment.rand_augment)
  out = np.asarray(fn(jax.random.key(0), images))
  assert out.shape == images.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.asarray(fn(jax.random.key(0), images)))
  changed = [not np.array_equal(o, images[0]) for o in out]
  distinct = {o.tobytes() for o in out}
  assert 4 <= sum(changed) < 16  # each image keeps its input with chance 1/4 (two ops, p 0.5 each)
  assert len(distinct) >= 8
  assert not np.array_equal(out, np.asarray(fn(jax.random.key(1), images)))


def test_normalize():
  x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  expected = (x / 255.0 - np.array(model_lib.MEAN_RGB)) / np.array(model_lib.STD_RGB)
  np.testing.assert_allclose(model_lib.normalize(jnp.asarray(x)), expected, atol=1e-5)
  planar = model_lib.normalize(jnp.asarray(x.transpose(0, 3, 1, 2)), channel_axis=1)
  np.testing.assert_allclose(planar, expected.transpose(0, 3, 1, 2), atol=1e-5)


def test_random_erasing_boxes():
  images = jnp.full((200, 3, 16, 24), 5.0)
  erase = jax.jit(augment.random_erasing)  # prob is traced: one compile
  out = np.asarray(erase(jax.random.key(0), images, 1.0))
  for img in out[:50]:
    erased = (img != 5.0).any(0)
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert erased.sum() == h * w  # one rectangle
    assert 0.02 * 16 * 24 * 0.7 <= h * w <= 16 * 24 / 3 * 1.3 and h < 16 and w < 24
  noise = out[(out != 5.0)]
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1  # N(0, 1) per pixel and channel
  assert (out != 5.0).any(axis=(1, 2, 3)).all()
  rate = (np.asarray(erase(jax.random.key(1), images, 0.25)) != 5.0).any(axis=(1, 2, 3)).mean()
  assert 0.15 < rate < 0.35
  np.testing.assert_array_equal(erase(jax.random.key(1), images, 0.0), images)


_mixup = jax.jit(augment.mixup_cutmix, static_argnums=range(3, 9))


def _labelled_constant_batch(batch=8, height=20, width=30):
  """Image i is the constant i; label i."""
  images = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None, None],
                            (batch, 3, height, width))
  return images, jnp.arange(batch)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_box_area_matches_lambda(seed):
  images, labels = _labelled_constant_batch()
  mixed, targets = _mixup(jax.random.key(seed), images, labels, 8, 0.0, 1.0, 0.5, 0.0, 1)
  mixed, targets = np.asarray(mixed), np.asarray(targets)
  np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
  for i in range(8):
    own = np.mean(mixed[i] == i)
    assert set(np.unique(mixed[i])) <= {i, 7 - i}
    np.testing.assert_allclose(targets[i, i], own, atol=1e-6)  # lambda = kept area
    np.testing.assert_allclose(targets[i, 7 - i], 1 - own, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_mixup_blend_matches_lambda(seed):
  images, labels = _labelled_constant_batch()
  mixed, targets = _mixup(jax.random.key(seed), images, labels, 8, 0.8, 0.0, 0.5, 0.0, 1)
  lam = float(targets[0, 0])
  assert 0.0 < lam < 1.0
  expected = lam * np.arange(8) + (1 - lam) * np.arange(8)[::-1]
  np.testing.assert_allclose(np.asarray(mixed)[:, 0, 0, 0], expected, atol=1e-5)


def test_mixing_stays_within_each_shard():
  """Per-device mixing: with 2 shards, images 0-3 mix among themselves (reversed), as do 4-7."""
  images, labels = _labelled_constant_batch()
  for seed, (mixup, cutmix) in enumerate(((0.8, 0.0), (0.0, 1.0), (0.8, 1.0))):
    mixed, targets = _mixup(jax.random.key(seed), images, labels, 8, mixup, cutmix, 0.5, 0.0, 2)
    for i in range(8):
      partner = 3 - i if i < 4 else 11 - i
      assert set(np.flatnonzero(np.asarray(targets)[i])) <= {i, partner}
      values = np.asarray(mixed)[i]  # each pixel is i, its partner, or a blend of the two
      assert min(i, partner) - 1e-5 <= values.min() and values.max() <= max(i, partner) + 1e-5


def test_smoothing_values_and_switch():
  images, labels = _labelled_constant_batch(batch=4)
  _, targets = augment.mixup_cutmix(jax.random.key(0), images, labels, 10, 0.0, 0.0, label_smoothing=0.1)
  expected = np.full((4, 10), 0.01)
  expected[np.arange(4), np.arange(4)] = 0.91
  np.testing.assert_allclose(targets, expected, atol=1e-7)
  # Both on: cutmix outputs contain only the two source values, mixup ones a blend; ~half each.
  keys = jax.random.split(jax.random.key(1), 40)
  mixed, t = jax.vmap(lambda k: _mixup(k, images, labels, 10, 0.8, 1.0, 0.5, 0.1, 1))(keys)
  cutmix = [set(np.unique(np.asarray(m[0]))) <= {0.0, 3.0} for m in mixed]
  assert 8 <= sum(cutmix) <= 32
  np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, atol=1e-6)
  assert np.asarray(t).min() >= 0.01 - 1e-7


def test_train_augment_switches():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8))
  labels = jnp.asarray([0, 1, 2, 3])
  off = ml_collections.ConfigDict({"randaugment": False, "erasing_prob": 0.0, "mixup_alpha": 0.0,
                                   "cutmix_alpha": 0.0, "label_smoothing": 0.0})
  x, y = jax.jit(lambda k: augment.train_augment(k, images, labels, 5, off))(jax.random.key(0))
  np.testing.assert_allclose(x, model_lib.normalize(images))
  np.testing.assert_array_equal(y, np.eye(5)[:4])
  full = ml_collections.ConfigDict({"augment": augment.default_config()})
  x, y = jax.jit(lambda k: augment.train_augment(k, images, labels, 5, full))(jax.random.key(1))
  assert x.dtype == jnp.float32 and x.shape == (4, 24, 24, 3) and np.isfinite(x).all()
  plain = jax.jit(lambda k: augment.train_augment(k, images, labels, 5, full, kernels="plain"))
  x_plain, y_plain = plain(jax.random.key(1))  # the same draws, the same pixels
  np.testing.assert_array_equal(y_plain, y)
  assert np.mean(np.asarray(x_plain) != np.asarray(x)) < 1e-3
  assert not np.allclose(x, model_lib.normalize(images))
  np.testing.assert_allclose(np.asarray(y).sum(1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="mixup_prob"):
    augment.train_augment(jax.random.key(0), images, labels, 5,
                          ml_collections.ConfigDict({"mixup_prob": 1.0}))
