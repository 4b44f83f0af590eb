"""Classify images with an ONNX `cvt-jax export --format onnx` folder: onnxruntime, numpy and PIL only.

  pip install onnxruntime numpy pillow
  python examples/serve_onnx.py cvt13_onnx cat.jpg dog.png
"""

import sys
from pathlib import Path

import onnxruntime
from serve_common import eval_image  # noqa: F401  (the eval transform, for callers of this module)
from serve_common import read_artefact
from serve_common import top5

INSTALL = "pip install onnxruntime numpy pillow"


def load(out_dir):
  """-> (uint8 images (b, S, S, 3) -> fp32 logits (b, classes), signature.json, class names)."""
  session = onnxruntime.InferenceSession(str(Path(out_dir) / "model.onnx"),
                                         providers=onnxruntime.get_available_providers())
  return (lambda images: session.run(None, {"images": images})[0], *read_artefact(out_dir))


if __name__ == "__main__":
  top5(*load(sys.argv[1]), sys.argv[2:])
