"""Parameters and multiply-accumulates (MACs) of a CvT variant (`cvt-jax summary` prints them).

The paper's "GFLOPs" are MACs with the attention einsums included (ptflops misses those and reports
4.06G for CvT-13).
"""

from __future__ import annotations

import math

from cvt_jax.model import Variant
from cvt_jax.model import get_variant
from cvt_jax.model import variable_shapes


def count_params(variant: str | Variant, num_classes: int = 1000) -> int:
  """Number of trainable parameters (BatchNorm running statistics excluded), without allocating them."""
  shapes = variable_shapes(get_variant(variant), num_classes)
  return sum(math.prod(shape) for key, shape in shapes.items() if key.startswith("params/"))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


def count_macs(variant: str | Variant, image_size: int = 224, num_classes: int = 1000) -> int:
  """MACs of one forward pass on one image: convolutions, linear layers and both attention einsums.

  Norms, softmax, activations and biases are left out, like the official `compute_macs` hooks.
  """
  macs, size, channels = 0, image_size, 3
  for s in get_variant(variant).stages:
    size = _conv_out(size, s.patch_size, s.patch_stride, s.patch_padding)
    c = s.dim
    macs += size * size * c * channels * s.patch_size**2
    kv_size = _conv_out(size, 3, 2, 1)
    extra = 1 if s.cls_token else 0
    tokens, kv_tokens = size * size + extra, kv_size * kv_size + extra
    per_block = (
        9 * c * size * size + 2 * 9 * c * kv_size * kv_size  # depthwise q (stride 1), k and v (stride 2)
        + c * c * tokens + 2 * c * c * kv_tokens  # proj_q, proj_k, proj_v
        + 2 * tokens * kv_tokens * c  # q k^T and attn v
        + c * c * tokens  # output projection
        + 8 * c * c * tokens)  # mlp C -> 4C -> C
    macs += s.depth * per_block
    channels = c
  return macs + channels * num_classes


def model_flops(macs: int, train: bool) -> int:
  """FLOPs of one image: 2 per MAC forward; a training step's backward pass costs two forwards more."""
  return 2 * macs * (3 if train else 1)
