"""cvt_jax.features: stage maps and cls embedding of a converted PyTorch checkpoint, against PyTorch's."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_jax import features
from cvt_jax import model as model_lib

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny")
extract = jax.jit(features.extract, static_argnums=0)  # op by op, a CvT compiles each of its ops apart


def test_features_match_the_pytorch_reference():
  reference = np.load(os.path.join(FIXTURES, "reference.npz"))
  backbone = features.Backbone.load(os.path.join(FIXTURES, "hf", "model.safetensors"))
  assert "head" not in backbone.variables["params"] and backbone.dims == (8, 16, 24)
  out = extract(backbone.model, backbone.variables, jnp.asarray(reference["images"]))
  assert set(out) == {"stage0", "stage1", "stage2", "cls"}
  for key in out:  # NHWC grids at strides 4, 8, 16 of the 56x40 input: (14, 10), (7, 5), (4, 3)
    np.testing.assert_allclose(out[key], reference[key], atol=2e-5, rtol=1e-4)


def test_backbone_takes_uint8_images_of_any_size():
  backbone = features.Backbone.load(os.path.join(FIXTURES, "official.pth"), heads=(1, 2, 3))
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
  out = backbone(images)
  for key, stride, dim in zip(("stage0", "stage1", "stage2"), features.STAGE_STRIDES, backbone.dims):
    assert out[key].shape == (3, 64 // stride, 96 // stride, dim)
  assert out["cls"].shape == (3, 24)
  direct = extract(backbone.model, backbone.variables, model_lib.normalize(images))
  np.testing.assert_allclose(out["cls"], direct["cls"], atol=1e-4)
  with pytest.raises(ValueError, match=r"NHWC with 3 channels, got shape \(3, 64, 96\)"):
    backbone(images[..., 0])
