"""Parameters and multiply-accumulates (MACs) of a CvT variant: `cvt-jax summary cvt-13 --res 384`.

  cvt-jax summary --all                               # every variant at 224 and 384
  cvt-jax summary cvt-21 --res 384 --num_classes 21841

The paper's "GFLOPs" are MACs with the attention einsums included (ptflops misses those and reports
4.06G for CvT-13).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import flags

from cvt_jax import cli
from cvt_jax.model import VARIANTS, CvT, Variant, get_variant


def count_params(variant: str | Variant, num_classes: int = 1000) -> int:
  """Number of trainable parameters (BatchNorm running statistics excluded), without allocating them."""
  model = CvT.from_variant(variant, num_classes=num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"]))


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


def format_table(rows: list[tuple[str, int, int, int]]) -> str:
  lines = ["| variant | resolution | params | GMACs |", "|---|---|---|---|"]
  lines += [f"| {name} | {res}x{res} | {params:,} | {macs / 1e9:.3f} |" for name, res, params, macs in rows]
  return "\n".join(lines)


FLAGS = flags.FlagValues()
_RES = flags.DEFINE_integer("res", 224, "Input resolution (224 or 384; any works).", lower_bound=32,
                            flag_values=FLAGS)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier size; 0 for no head.", lower_bound=0,
                                    flag_values=FLAGS)
_ALL = flags.DEFINE_bool("all", False, "The table for every variant at 224 and 384.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 2:
    raise cli.UsageError(f"expected at most one variant, got {' '.join(argv[1:])}")
  try:
    names = sorted(VARIANTS) if _ALL.value else [get_variant(argv[1] if len(argv) > 1 else "cvt-13").name]
  except ValueError as e:
    raise cli.UsageError(str(e)) from e
  resolutions = (224, 384) if _ALL.value else (_RES.value,)
  rows = [(name, res, count_params(name, _NUM_CLASSES.value), count_macs(name, res, _NUM_CLASSES.value))
          for name in names for res in resolutions]
  print(format_table(rows))


def run(argv: Sequence[str] | None = None) -> None:
  cli.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
