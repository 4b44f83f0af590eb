"""A checkpoint as a serving artefact that plain `jax` loads: StableHLO through `jax.export`.

  checkpoint = weights.load("cvt13_224.npz")
  check_out_dir("cvt13_served")                       # before any work: nothing is left behind on errors
  exported = export(checkpoint, image_size=224, platforms=("cpu", "cuda"))
  save(exported, checkpoint, "cvt13_served", dtype="float32")
  model = load("cvt13_served")                        # a predictor for `cvt_jax.predict.predict`

OUT_DIR holds `model.stablehlo` (`Exported.serialize()`: the eval-mode forward with the weights baked in as
constants, uint8 (b, S, S, 3) images of the official eval transform in, the ImageNet normalisation inside,
fp32 logits (b, classes) out, b symbolic), `signature.json` (that contract, the eval transform, platforms,
versions) and `classes.txt` (label order) when the class names are known. Any JAX that reads the calling
convention recorded in the signature loads it: `jax.export.deserialize(blob).call(images)`.

`cvt_jax.export_onnx` writes the same contract as `model.onnx`; what both formats share (the checks, the
signature's common part, the all-or-nothing write, reading an artefact back) is here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from cvt_jax import model as model_lib
from cvt_jax import predict
from cvt_jax import weights
from cvt_jax import workdir as workdir_lib
from cvt_jax.data import labels
from cvt_jax.data import preprocess

FORMAT = "cvt_jax.export/1"
PLATFORMS = ("cpu", "cuda", "tpu")
DTYPES = ("float32", "bfloat16")
MIN_IMAGE_SIZE = 32
MODEL_FILE, SIGNATURE_FILE, CLASSES_FILE = "model.stablehlo", "signature.json", "classes.txt"
ONNX_FILE = "model.onnx"  # `cvt_jax.export_onnx`
_FILES = {MODEL_FILE, ONNX_FILE, SIGNATURE_FILE, CLASSES_FILE}


def check_out_dir(out_dir: str) -> None:
  """Raises `OutputError` before any work unless `out_dir` is a new or empty local folder, or an earlier
  artefact (replaced), in a folder that can be written."""
  if not workdir_lib.is_local(out_dir):
    raise workdir_lib.OutputError(f"output {out_dir}: exports are written to a local folder")
  path = epath.Path(out_dir)
  entries = {p.name for p in path.iterdir()} if path.is_dir() else set()
  if path.exists() and not (path.is_dir() and (not entries or SIGNATURE_FILE in entries)):
    raise workdir_lib.OutputError(f"output {out_dir} exists and is not an exported model; name a new folder")
  if others := sorted(entries - _FILES):
    # An earlier export is replaced whole: a file of the user's beside it would be deleted with it.
    raise workdir_lib.OutputError(f"output {out_dir} is an earlier export that also holds "
                                  f"{', '.join(others)}; move them or name a new folder")
  workdir_lib.check_output(str(_staging_dir(out_dir)))


def check_model(checkpoint: weights.Checkpoint, image_size: int, dtype: str, dtypes: Sequence[str]) -> None:
  """Raises ValueError unless `checkpoint` at `image_size` in `dtype` (one of `dtypes`) can be served."""
  if checkpoint.num_classes == 0:
    raise ValueError(f"{checkpoint.source} has no classification head; nothing to serve")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image size {image_size}: CvT needs at least {MIN_IMAGE_SIZE} pixels")
  if dtype not in dtypes:
    raise ValueError(f"dtype {dtype!r}: expected one of {tuple(dtypes)}")


def export(checkpoint: weights.Checkpoint, image_size: int, dtype: str = "float32",
           platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  """The eval-mode forward of `checkpoint`, uint8 (b, image_size, image_size, 3) -> fp32 logits (b, classes),
  lowered for `platforms`, with `dtype` (float32 or bfloat16) as the compute dtype."""
  check_model(checkpoint, image_size, dtype, DTYPES)
  if not platforms or not set(platforms) <= set(PLATFORMS):
    raise ValueError(f"platforms {platforms!r}: expected some of {PLATFORMS}")
  variables = jax.tree.map(np.asarray, checkpoint.variables)

  def logits(kernels: str):
    model = checkpoint.model(dtype=model_lib.compute_dtype(dtype), kernels=kernels)
    return lambda images: model.apply(variables, model_lib.normalize(images))

  # Each lowering gets the kernels that platform runs in training and evaluation (`cvt_jax.ops`).
  forward = lambda images: jax.lax.platform_dependent(images, cpu=logits("cpu"), default=logits("plain"))
  batch, = jax.export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
  return jax.export.export(jax.jit(forward), platforms=tuple(platforms))(images)


def eval_transform(size: int) -> dict[str, Any]:
  """The official eval transform at `size` as torchvision's arguments: Resize(resize, BICUBIC) (an int: the
  shorter side, the longer in proportion) and CenterCrop(center_crop) unless None."""
  # A square image shows the resize target: the shorter side's, or `size` itself (a squash, no crop).
  (resized, _), _ = preprocess.eval_geometry(size, size, size)
  if resized == size:
    return {"resize": [size, size], "center_crop": None, "interpolation": "bicubic",
            "description": f"resize to {size}x{size} (PIL bicubic)"}
  return {"resize": resized, "center_crop": size, "interpolation": "bicubic",
          "description": f"resize the shorter side to {resized} (PIL bicubic), then centre crop {size}x{size}"}


def signature(exported: jax.export.Exported, checkpoint: weights.Checkpoint, dtype: str,
              has_classes: bool) -> dict[str, Any]:
  """What `signature.json` says about `exported`: the calling contract and where it came from."""
  _, size, _, _ = exported.in_avals[0].shape
  _, num_classes = exported.out_avals[0].shape
  return {**common_signature(checkpoint, MODEL_FILE, size, num_classes, dtype, has_classes),
          "platforms": list(exported.platforms),
          "calling_convention_version": exported.calling_convention_version,
          "jax_version": jax.__version__}


def common_signature(checkpoint: weights.Checkpoint, model_file: str, size: int, num_classes: int, dtype: str,
                     has_classes: bool) -> dict[str, Any]:
  """The part of `signature.json` that every format shares: the contract and where it came from."""
  return {
      "format": FORMAT,
      "model_file": model_file,
      "inputs": [{"name": "images", "dtype": "uint8", "shape": ["b", size, size, 3],
                  "layout": "NHWC, RGB, 0-255, after eval_transform; normalised inside the model"}],
      "outputs": [{"name": "logits", "dtype": "float32", "shape": ["b", num_classes]}],
      "image_size": size,
      "eval_transform": eval_transform(size),
      "normalization": {"inside": True, "formula": "(images / 255 - mean) / std", "mean": model_lib.MEAN_RGB,
                        "std": model_lib.STD_RGB},
      "num_classes": num_classes,
      "classes": CLASSES_FILE if has_classes else None,
      "dtype": dtype,
      "model": {**checkpoint.variant.to_json(), "source": checkpoint.source, "step": checkpoint.step},
  }


def save(exported: jax.export.Exported, checkpoint: weights.Checkpoint, out_dir: str, dtype: str) -> None:
  """Writes the artefact into a staging folder next to `out_dir`, then renames it: all or nothing."""
  write(out_dir, checkpoint, MODEL_FILE, exported.serialize,
        lambda has_classes: signature(exported, checkpoint, dtype, has_classes))


def write(out_dir: str, checkpoint: weights.Checkpoint, model_file: str, model: Callable[[], bytes],
          signature_of: Callable[[bool], dict[str, Any]]) -> None:
  """Writes `model()` as `model_file`, `signature_of(has class names)` and classes.txt into a staging folder
  next to `out_dir`, then renames it to `out_dir`: all or nothing."""
  check_out_dir(out_dir)
  names = predict.known_class_names(checkpoint)
  staging = _staging_dir(out_dir)
  staging.mkdir(parents=True)
  try:
    (staging / model_file).write_bytes(model())
    (staging / SIGNATURE_FILE).write_text(json.dumps(signature_of(bool(names)), indent=1))
    if names:
      (staging / CLASSES_FILE).write_text("".join(f"{n}\n" for n in names))
    _replace(staging, epath.Path(out_dir))
  finally:
    if staging.exists():
      shutil.rmtree(staging)


def read_signature(path: str | os.PathLike) -> dict[str, Any]:
  """An artefact's signature.json, checked: ValueError or FileNotFoundError naming what is wrong."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if not path.is_dir():
    raise ValueError(f"{path} is a file, not an exported model's folder (`cvt-jax export` writes one)")
  file = path / SIGNATURE_FILE
  if not file.exists():
    raise FileNotFoundError(f"{path}: no {SIGNATURE_FILE}; not an exported model (`cvt-jax export` writes one)")
  try:
    signature = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: damaged ({e}); export the model again") from None
  if not isinstance(signature, dict) or signature.get("format") != FORMAT:
    found = signature.get("format") if isinstance(signature, dict) else None
    raise ValueError(f"{file}: format {found!r}, this version reads {FORMAT!r}")
  missing = [k for k in ("image_size", "num_classes") if not isinstance(signature.get(k), int)]
  if missing:
    raise ValueError(f"{file}: damaged (no {' or '.join(missing)}); export the model again")
  model_file = signature.setdefault("model_file", MODEL_FILE)  # exports before ONNX named no model file
  if model_file not in (MODEL_FILE, ONNX_FILE):
    raise ValueError(f"{file}: model_file {model_file!r}, this version reads {MODEL_FILE} or {ONNX_FILE}")
  if not (path / model_file).exists():
    raise FileNotFoundError(f"{path}: no {model_file}; export the model again")
  return signature


def load(path: str | os.PathLike, batch_size: int = 16) -> Served:
  """The artefact in `path`, StableHLO or ONNX (whichever its signature.json names), as a predictor."""
  if read_signature(path)["model_file"] == ONNX_FILE:
    from cvt_jax import export_onnx  # pylint: disable=import-outside-toplevel  # it imports this module
    return export_onnx.OnnxModel(path, batch_size)
  return ExportedModel(path, batch_size)


class Served:
  """An artefact written by `save` or `cvt_jax.export_onnx.save`, as a predictor (`cvt_jax.predict.predict`
  takes it): subclasses run the model file.

  Attributes:
    signature: signature.json.
    model_file: the model's path.
    image_size, num_classes, class_names (None without classes.txt), source: as a `weights.Checkpoint`'s.
  """

  def __init__(self, path: str | os.PathLike, batch_size: int):
    path = epath.Path(path)
    self.signature = read_signature(path)
    self.model_file = path / self.signature["model_file"]
    self.source, self.batch_size = str(path), batch_size
    self.image_size, self.num_classes = self.signature["image_size"], self.signature["num_classes"]
    classes = path / CLASSES_FILE
    self.class_names = labels.read_labels(classes) if classes.exists() else None

  def damaged(self, error: Exception) -> ValueError:
    """The error for a model file that its runtime cannot read."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(f"{self.model_file}: damaged or truncated, export the model again ({type(error).__name__}: "
                      f"{first[:200]})")

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> class probabilities (N, classes), in batches of `batch_size`."""
    raise NotImplementedError


class ExportedModel(Served):
  """A StableHLO artefact written by `save`; `exported.call(uint8 images)` -> fp32 logits."""

  def __init__(self, path: str | os.PathLike, batch_size: int = 16):
    super().__init__(path, batch_size)
    try:
      self.exported = jax.export.deserialize(bytearray(self.model_file.read_bytes()))
    except Exception as e:  # pylint: disable=broad-except  # flatbuffers' errors on a cut file vary
      raise self.damaged(e) from None
    platform = jax.export.default_export_platform()
    if platform not in self.exported.platforms:
      raise ValueError(f"{path} was exported for {', '.join(self.exported.platforms)}, not for this host's "
                       f"{platform} (cvt-jax export --platforms)")
    self._probabilities = jax.jit(lambda images: jax.nn.softmax(self.exported.call(images)))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> class probabilities (N, classes), in padded batches of `batch_size`."""
    return predict.in_batches(self._probabilities, images, self.batch_size)


def _staging_dir(out_dir: str) -> epath.Path:
  out_dir = epath.Path(os.path.abspath(out_dir))
  return out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"


def _replace(staging: epath.Path, out_dir: epath.Path) -> None:
  """Renames `staging` to `out_dir`; an earlier artefact there (`check_out_dir`) is moved aside, then deleted."""
  if out_dir.exists() and any(out_dir.iterdir()):
    old = staging.parent / f"{staging.name}.old"
    out_dir.replace(old)
    staging.replace(out_dir)
    shutil.rmtree(old)
  else:
    staging.replace(out_dir)  # rename(2) replaces an empty folder
