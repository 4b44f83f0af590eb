"""Classify images with a StableHLO `cvt-jax export` folder and nothing but jax, numpy and PIL (no cvt_jax).

  pip install jax flatbuffers numpy pillow
  python examples/serve.py cvt13_served cat.jpg dog.png

(jax reads `model.stablehlo` through flatbuffers, which jax itself does not install.)
"""

import sys
from pathlib import Path

import jax
from serve_common import eval_image  # noqa: F401  (the eval transform, for callers of this module)
from serve_common import read_artefact
from serve_common import top5

INSTALL = "pip install jax flatbuffers numpy pillow"


def load(out_dir):
  """-> (uint8 images (b, S, S, 3) -> fp32 logits (b, classes), signature.json, class names)."""
  exported = jax.export.deserialize(bytearray((Path(out_dir) / "model.stablehlo").read_bytes()))
  return (jax.jit(exported.call), *read_artefact(out_dir))


if __name__ == "__main__":
  top5(*load(sys.argv[1]), sys.argv[2:])
