"""CvT as a backbone: the three stage feature maps (NHWC) and the cls embedding, from any checkpoint.

  from cvt_jax import features
  backbone = features.Backbone.load("cvt13_224.npz")    # or a workdir, or a PyTorch .pth
  out = backbone(images)   # uint8 (B, H, W, 3) RGB; H, W multiples of 16 give exact strides
  out["stage0"]  # (B, H/4,  W/4,  64)   CvT-13 widths; strides 4, 8, 16 for FPN-style necks
  out["stage1"]  # (B, H/8,  W/8,  192)
  out["stage2"]  # (B, H/16, W/16, 384)
  out["cls"]     # (B, 384): the cls token after the last block, before the final LayerNorm

Inside your own Flax model, use the module directly: `CvT.from_variant('cvt-13', num_classes=0)` as a
submodule and call its `features(images, train)` method; load `backbone.variables` into its slot.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from cvt_jax import model as model_lib
from cvt_jax import weights

STAGE_STRIDES = (4, 8, 16)


def extract(model: model_lib.CvT, variables: dict[str, Any], images: jax.Array) -> dict[str, jax.Array]:
  """Features of normalised float NHWC images (jit-able): {'stage0', 'stage1', 'stage2', 'cls'}."""
  return model.apply(variables, images, method="features")


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A frozen CvT feature extractor: `backbone(uint8 images)` -> feature dict (see the module docstring)."""

  model: model_lib.CvT
  variables: dict[str, Any]

  @classmethod
  def load(cls, checkpoint: str | os.PathLike, dtype: Any = jnp.float32, **load_kwargs: Any) -> "Backbone":
    """Any checkpoint `weights.load` reads; the head, if any, is dropped."""
    ckpt = weights.load(checkpoint, **load_kwargs).without_head()
    return cls(ckpt.model(dtype=dtype), jax.device_put(ckpt.variables))

  @property
  def dims(self) -> tuple[int, int, int]:
    """Channels of stage0..stage2 (the last is also the cls embedding width)."""
    return tuple(s.dim for s in self.model.spec.stages)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """uint8 RGB NHWC images (normalised here with the ImageNet mean/std) -> features."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC with 3 channels, got shape {tuple(images.shape)}")
    return _features_of_uint8(self.model, self.variables, images)


@functools.partial(jax.jit, static_argnums=0)
def _features_of_uint8(model: model_lib.CvT, variables: dict[str, Any], images: jax.Array
                       ) -> dict[str, jax.Array]:
  return extract(model, variables, model_lib.normalize(images))
