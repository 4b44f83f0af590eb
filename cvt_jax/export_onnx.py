"""A checkpoint as an ONNX model: the StableHLO artefact's contract (`cvt_jax.export`) for ONNX Runtime.

  checkpoint = weights.load("cvt13_224.npz")
  export.check_out_dir("cvt13_onnx")                  # before any work: nothing is left behind on errors
  model = export_onnx.export(checkpoint, image_size=224)   # an onnx.ModelProto, converted by jax2onnx
  export_onnx.save(model, checkpoint, "cvt13_onnx", dtype="float32")
  predictor = export.load("cvt13_onnx")               # an `OnnxModel` for `cvt_jax.predict.predict`

OUT_DIR holds `model.onnx` (the eval-mode forward with the weights as initializers, input `images` uint8
(b, S, S, 3) of the official eval transform, the ImageNet normalisation inside, output `logits` fp32
(b, classes), b symbolic), `signature.json` and `classes.txt` as for StableHLO. Any ONNX runtime serves it;
`examples/serve_onnx.py` needs only onnxruntime, numpy and PIL. Converting needs `jax2onnx` and `onnx`, serving
`onnxruntime` (`pip install 'cvt-jax[onnx]'`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from cvt_jax import export as export_lib
from cvt_jax import model as model_lib
from cvt_jax import weights

if TYPE_CHECKING:
  import onnx

# ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul, Conv or Softmax.
DTYPES = ("float32",)
OPSET = 21  # ONNX Runtime 1.17+ and OpenVINO 2024+ read it; the graph uses nothing newer
INSTALL = "pip install 'cvt-jax[onnx]'"


class ConversionError(ValueError):
  """jax2onnx could not convert the model (reported in one line)."""


class NotInstalled(ValueError):
  """A package that ONNX export or serving needs is missing (reported in one line, with the install)."""


def check_installed(*modules: str) -> None:
  """Raises `NotInstalled` naming the install command unless `modules` import."""
  for module in modules:
    try:
      __import__(module)
    except ImportError:
      raise NotInstalled(f"ONNX export and serving need {module}: {INSTALL}") from None


def export(checkpoint: weights.Checkpoint, image_size: int, dtype: str = "float32") -> onnx.ModelProto:
  """The eval-mode forward of `checkpoint`, uint8 (b, image_size, image_size, 3) -> fp32 logits (b, classes)."""
  export_lib.check_model(checkpoint, image_size, dtype, DTYPES)
  check_installed("jax2onnx", "onnx")
  import jax2onnx  # pylint: disable=import-outside-toplevel
  variables = jax.tree.map(np.asarray, checkpoint.variables)
  model = checkpoint.model(dtype=model_lib.compute_dtype(dtype), kernels="onnx")
  forward = lambda images: model.apply(variables, model_lib.normalize(images))
  images = jax.ShapeDtypeStruct(("b", image_size, image_size, 3), jnp.uint8)
  with _quiet():
    try:
      return jax2onnx.to_onnx(forward, [images], model_name="cvt", opset=OPSET, input_names=["images"],
                              output_names=["logits"])
    except Exception as e:  # pylint: disable=broad-except  # jax2onnx raises all kinds for what it lacks
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise ConversionError(f"jax2onnx {_version('jax2onnx')} cannot convert {checkpoint.source} "
                            f"({type(e).__name__}: {first})") from e


@contextlib.contextmanager
def _quiet():
  """jax2onnx prints plugin debug lines and the tracebacks of plugins it could not import (dm_pix with this
  jax), and onnx_ir warns about every untyped shape constant: none of it is the user's concern."""
  loggers = [logging.getLogger(name) for name in ("onnx_ir", "jax2onnx")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def signature(model: onnx.ModelProto, checkpoint: weights.Checkpoint, dtype: str,
              has_classes: bool) -> dict[str, Any]:
  """What `signature.json` says about `model`: the shared contract, the opset and the converter."""
  image, = model.graph.input
  logits, = model.graph.output
  size = image.type.tensor_type.shape.dim[1].dim_value
  num_classes = logits.type.tensor_type.shape.dim[1].dim_value
  return {**export_lib.common_signature(checkpoint, export_lib.ONNX_FILE, size, num_classes, dtype, has_classes),
          "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
          "jax_version": jax.__version__, "jax2onnx_version": _version("jax2onnx")}


def save(model: onnx.ModelProto, checkpoint: weights.Checkpoint, out_dir: str, dtype: str) -> None:
  """Writes model.onnx, signature.json and classes.txt into `out_dir`: all or nothing (`export.write`)."""
  export_lib.write(out_dir, checkpoint, export_lib.ONNX_FILE, model.SerializeToString,
                   lambda has_classes: signature(model, checkpoint, dtype, has_classes))


class OnnxModel(export_lib.Served):
  """A `model.onnx` artefact in an ONNX Runtime session (`export.load` returns one for ONNX folders).

  Attributes:
    session: the `onnxruntime.InferenceSession`; `session.run(None, {"images": uint8})[0]` -> fp32 logits.
  """

  def __init__(self, path: str | os.PathLike, batch_size: int = 16):
    super().__init__(path, batch_size)
    check_installed("onnxruntime")
    import onnxruntime  # pylint: disable=import-outside-toplevel
    try:
      self.session = onnxruntime.InferenceSession(str(self.model_file),
                                                  providers=onnxruntime.get_available_providers())
    except Exception as e:  # pylint: disable=broad-except  # onnxruntime's own exception types
      raise self.damaged(e) from None

  def logits(self, images: np.ndarray) -> np.ndarray:
    """uint8 (b, S, S, 3) -> fp32 logits (b, classes)."""
    return self.session.run(None, {"images": images})[0]

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> class probabilities (N, classes), in batches of `batch_size` (no padding: the
    graph takes any batch size)."""
    out = [softmax(self.logits(images[i:i + self.batch_size])) for i in range(0, len(images), self.batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
  """Probabilities over the last axis, in fp32."""
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"
