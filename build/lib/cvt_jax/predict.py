r"""Top classes of image files: `cvt-jax predict --checkpoint X image.jpg [more.png | a_folder ...]`.

  cvt-jax predict --checkpoint CvT-13-224x224-IN-1k.pth cat.jpg dog.png photos/
  cvt-jax predict --checkpoint out/finetune --output predictions.json photos/   # a workdir: its classes

The checkpoint is anything `cvt-jax convert` reads. Class names come from --labels (one per line, label
order), else those stored with the checkpoint (fine-tuned workdirs and their exports), else the ImageNet
names for a 1000-class head, else the label index. Images go through the evaluation transform (224:
resize 256 + centre crop; 384: squash), in float32 unless --dtype says otherwise; greyscale, CMYK, palette
and alpha images are converted to RGB. A file that is not a readable image is reported and skipped; the
exit status is then 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags
from etils import epath

from cvt_jax import augment
from cvt_jax import cli
from cvt_jax import host_decode
from cvt_jax import input_pipeline
from cvt_jax import model as model_lib
from cvt_jax import preprocess
from cvt_jax import weights


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The `top_k` classes of one image, most probable first."""

  path: str
  labels: tuple[int, ...]
  names: tuple[str, ...]
  probabilities: tuple[float, ...]


def class_names(checkpoint: weights.Checkpoint, labels_file: str | None = None) -> tuple[str, ...]:
  """Display names for the head's labels (see the module docstring for the order of preference)."""
  if labels_file:
    names = weights.read_labels(labels_file)
  elif checkpoint.class_names:
    names = checkpoint.class_names
  elif checkpoint.num_classes == 1000:
    names = tuple(name for _, name in weights.imagenet_classes())
  else:
    names = tuple(f"class {i}" for i in range(checkpoint.num_classes))
  if len(names) != checkpoint.num_classes:
    raise ValueError(f"{labels_file or checkpoint.source}: {len(names)} class names for a "
                     f"{checkpoint.num_classes}-class head")
  return names


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given; folders replaced by their image files (by extension, recursively, sorted)."""
  files = []
  for path in paths:
    if not os.path.isdir(path):
      files.append(path)
      continue
    for folder, subdirs, names in os.walk(path):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
      files.extend(os.path.join(folder, n) for n in sorted(names)
                   if n.lower().endswith(input_pipeline.IMAGE_EXTENSIONS) and not n.startswith("."))
  return files


class Predictor:
  """A checkpoint's model, jitted for fixed-size batches of uint8 images."""

  def __init__(self, checkpoint: weights.Checkpoint, image_size: int, batch_size: int = 16,
               dtype: str = "float32"):
    if checkpoint.num_classes == 0:
      raise ValueError(f"{checkpoint.source} has no classification head; use cvt_jax.features instead")
    self.image_size, self.batch_size = image_size, batch_size
    model = checkpoint.model(dtype=model_lib.compute_dtype(dtype))
    self._variables = jax.device_put(checkpoint.variables)
    self._probabilities = jax.jit(
        lambda variables, images: jax.nn.softmax(model.apply(variables, augment.normalize(images))))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> class probabilities (N, classes), in padded batches of `batch_size`."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.zeros((self.batch_size,) + chunk.shape[1:], np.uint8)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._probabilities(self._variables, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predict(predictor: Predictor, paths: Sequence[str], names: Sequence[str], top_k: int = 5
            ) -> tuple[list[Prediction], list[tuple[str, str]]]:
  """Classifies `paths`; returns (predictions, [(path, error message)] for unreadable files)."""
  images, good, failed = [], [], []
  for path in paths:
    try:
      images.append(preprocess.eval_image(host_decode.image_file(path), predictor.image_size))
      good.append(path)
    except FileNotFoundError:
      failed.append((path, "no such file"))
    except host_decode.DECODE_ERRORS as e:
      failed.append((path, f"not a readable image ({type(e).__name__}: {e})"))
  if not images:
    return [], failed
  probs = predictor.probabilities(np.stack(images))
  k = min(top_k, probs.shape[-1])
  predictions = []
  for path, p in zip(good, probs):
    top = np.argsort(-p, kind="stable")[:k]
    predictions.append(Prediction(path, tuple(int(i) for i in top), tuple(names[i] for i in top),
                                  tuple(float(p[i]) for i in top)))
  return predictions, failed


FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, converted .npz, PyTorch "
                                  ".pth/.bin/.safetensors or hub name.", flag_values=FLAGS)
_LABELS = flags.DEFINE_string("labels", None, "Class names, one per line in label order.", flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input resolution (default: the workdir's training "
                                   "resolution, else 224).", lower_bound=32, flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes per image.", lower_bound=1, flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per forward pass.", lower_bound=1,
                                   flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", flag_values=FLAGS)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per image instead of a table.",
                          flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the predictions to this .json file.",
                              flag_values=FLAGS)
_HEADS = cli.define_heads_flag(FLAGS)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)


def _as_json(p: Prediction) -> dict:
  return {"path": p.path, "top": [{"label": i, "name": n, "probability": round(q, 6)}
                                  for i, n, q in zip(p.labels, p.names, p.probabilities)]}


def main(argv: Sequence[str]) -> int:
  if len(argv) < 2:
    raise cli.UsageError("name at least one image file or folder")
  if _OUTPUT.value:
    cli.check_output(_OUTPUT.value, ".json")
  paths = expand_paths(argv[1:])
  if not paths:
    raise cli.UsageError(f"no image files in {' '.join(argv[1:])}")
  checkpoint = weights.load(_CHECKPOINT.value, heads=_HEADS.value)
  names = class_names(checkpoint, _LABELS.value)
  predictor = Predictor(checkpoint, _IMAGE_SIZE.value or checkpoint.image_size or 224, _BATCH_SIZE.value,
                        _DTYPE.value)
  predictions, failed = predict(predictor, paths, names, _TOP_K.value)
  for p in predictions:
    if _JSON.value:
      print(json.dumps(_as_json(p)))
    else:
      print(p.path)
      for i, n, q in zip(p.labels, p.names, p.probabilities):
        print(f"  {100 * q:6.2f}%  {i:4d}  {n}")
  if _OUTPUT.value:
    epath.Path(_OUTPUT.value).write_text(json.dumps([_as_json(p) for p in predictions], indent=1))
  for path, message in failed:
    print(f"cvt-jax predict: skipped {path}: {message}", file=sys.stderr)
  return 1 if failed else 0


def run(argv: Sequence[str] | None = None) -> None:
  cli.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
