r"""Top-5 classes of image files: `python -m cvt_jax.predict --checkpoint X image.jpg [more.png | a_folder]`.

  python -m cvt_jax.predict --checkpoint CvT-13-224x224-IN-1k.pth cat.jpg dog.png photos/
  python -m cvt_jax.predict --checkpoint out/finetune --json photos/     # a workdir: its class names

The checkpoint is a training workdir, a converted `.npz` or a PyTorch file. Class names come from
`--labels` (one per line, label order), else those stored with the checkpoint (fine-tuned workdirs and
their exports), else the ImageNet names for a 1000-class head, else the label index. Images go through the
evaluation transform (224: resize 256 + centre crop; 384: squash); greyscale, CMYK, palette and alpha
images are converted to RGB. A file that is not a readable image is reported and skipped; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from cvt_jax import augment
from cvt_jax import input_pipeline
from cvt_jax import preprocess
from cvt_jax import pretrained

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The `top_k` classes of one image, most probable first."""

  path: str
  labels: tuple[int, ...]
  names: tuple[str, ...]
  probabilities: tuple[float, ...]


def class_names(checkpoint: pretrained.Checkpoint, labels_file: str | None = None) -> tuple[str, ...]:
  """Display names for the head's labels (see the module docstring for the order of preference)."""
  if labels_file:
    names = pretrained.read_labels(labels_file)
  elif checkpoint.class_names:
    names = checkpoint.class_names
  elif checkpoint.num_classes == 1000:
    names = tuple(name for _, name in pretrained.imagenet_classes())
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

  def __init__(self, checkpoint: pretrained.Checkpoint, image_size: int, batch_size: int = 16):
    if checkpoint.num_classes == 0:
      raise ValueError(f"{checkpoint.source} has no classification head; use cvt_jax.features instead")
    self.image_size, self.batch_size = image_size, batch_size
    model = checkpoint.model()
    self._variables = jax.device_put(checkpoint.variables)
    self._probabilities = jax.jit(
        lambda variables, images: jax.nn.softmax(model.apply(variables, augment.eval_preprocess(images))))

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
      images.append(preprocess.eval_image(path, predictor.image_size))
      good.append(path)
    except FileNotFoundError:
      failed.append((path, "no such file"))
    except _DECODE_ERRORS as e:
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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cvt_jax.predict", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
  parser.add_argument("--checkpoint", required=True,
                      help="training workdir, converted .npz, or PyTorch .pth/.bin/.safetensors")
  parser.add_argument("--labels", help="class names, one per line in label order")
  parser.add_argument("--image_size", type=int,
                      help="input resolution (default: the workdir's training resolution, else 224)")
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--heads", help="heads per stage of a custom-width PyTorch checkpoint, e.g. 1,2,3")
  parser.add_argument("--json", action="store_true", help="print one JSON object per image instead")
  args = parser.parse_args(argv)
  try:
    heads = tuple(int(h) for h in args.heads.split(",")) if args.heads else None
    checkpoint = pretrained.load(args.checkpoint, heads=heads)
    names = class_names(checkpoint, args.labels)
    predictor = Predictor(checkpoint, args.image_size or checkpoint.image_size or 224, args.batch_size)
  except (OSError, ValueError) as e:
    print(f"predict: {e}", file=sys.stderr)
    return 2
  paths = expand_paths(args.images)
  if not paths:
    print(f"predict: no image files in {' '.join(args.images)}", file=sys.stderr)
    return 2
  predictions, failed = predict(predictor, paths, names, args.top_k)
  for p in predictions:
    if args.json:
      print(json.dumps({"path": p.path, "top": [{"label": i, "name": n, "probability": round(q, 6)}
                                                for i, n, q in zip(p.labels, p.names, p.probabilities)]}))
    else:
      print(p.path)
      for i, n, q in zip(p.labels, p.names, p.probabilities):
        print(f"  {100 * q:6.2f}%  {i:4d}  {n}")
  for path, message in failed:
    print(f"predict: skipped {path}: {message}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
