r"""Top classes of image files: `cvt-jax predict --checkpoint X image.jpg [more.png | a_folder ...]`.

  cvt-jax predict --checkpoint CvT-13-224x224-IN-1k.pth cat.jpg dog.png photos/
  cvt-jax predict --checkpoint out/finetune --output predictions.json photos/   # a workdir: its classes
  cvt-jax predict --exported cvt13_served cat.jpg        # what `cvt-jax export` wrote (either format)

The checkpoint is anything `cvt-jax convert` reads; --exported takes a `cvt-jax export` folder instead,
whose resolution and dtype were fixed at export. Class names come from --labels (one per line, label
order), else those stored with the checkpoint (fine-tuned workdirs and their exports), else the ImageNet
names for a 1000-class head, else the label index. Images go through the evaluation transform (224:
resize 256 + centre crop; 384: squash), in float32 unless --dtype says otherwise; greyscale, CMYK, palette
and alpha images are converted to RGB. A file that is not a readable image is reported and skipped; the
exit status is then 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags
from etils import epath

from cvt_jax import export
from cvt_jax import predict
from cvt_jax import weights
from cvt_jax import workdir as workdir_lib
from cvt_jax.cli import runner

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, converted .npz, PyTorch "
                                  ".pth/.bin/.safetensors or hub name.", flag_values=FLAGS)
_EXPORTED = flags.DEFINE_string("exported", None, "A `cvt-jax export` folder (StableHLO or ONNX), instead of "
                                "--checkpoint.", flag_values=FLAGS)
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
_HEADS = runner.define_heads_flag(FLAGS)
flags.mark_flags_as_mutual_exclusive(["checkpoint", "exported"], required=True, flag_values=FLAGS)


def _as_json(p: predict.Prediction) -> dict:
  return {"path": p.path, "top": [{"label": i, "name": n, "probability": round(q, 6)}
                                  for i, n, q in zip(p.labels, p.names, p.probabilities)]}


def main(argv: Sequence[str]) -> int:
  if len(argv) < 2:
    raise runner.UsageError("name at least one image file or folder")
  if _OUTPUT.value:
    workdir_lib.check_output(_OUTPUT.value, ".json")
  paths = predict.expand_paths(argv[1:])
  if not paths:
    raise runner.UsageError(f"no image files in {' '.join(argv[1:])}")
  if _EXPORTED.value:
    fixed = [f"--{f}" for f in (_IMAGE_SIZE.name, _DTYPE.name, _HEADS.name) if FLAGS[f].present]
    if fixed:
      raise runner.UsageError(f"{', '.join(fixed)}: fixed when the model was exported; not with --exported")
    predictor = export.load(_EXPORTED.value, _BATCH_SIZE.value)
    names = predict.class_names(predictor, _LABELS.value)
  else:
    checkpoint = weights.load(_CHECKPOINT.value, heads=_HEADS.value)
    names = predict.class_names(checkpoint, _LABELS.value)
    predictor = predict.Predictor(checkpoint, _IMAGE_SIZE.value or checkpoint.image_size or 224,
                                  _BATCH_SIZE.value, _DTYPE.value)
  predictions, failed = predict.predict(predictor, paths, names, _TOP_K.value)
  if _OUTPUT.value:
    epath.Path(_OUTPUT.value).write_text(json.dumps([_as_json(p) for p in predictions], indent=1))
  lines = []
  for p in predictions:
    if _JSON.value:
      lines.append(json.dumps(_as_json(p)))
    else:
      lines.append(p.path)
      lines += [f"  {100 * q:6.2f}%  {i:4d}  {n}" for i, n, q in zip(p.labels, p.names, p.probabilities)]
  runner.print_lines(lines)
  for path, message in failed:
    print(f"cvt-jax predict: skipped {path}: {message}", file=sys.stderr)
  return 1 if failed else 0


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
