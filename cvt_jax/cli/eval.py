r"""Evaluate a checkpoint over every image of a split: `cvt-jax eval --config cvt13 --checkpoint X`.

  cvt-jax eval --config cvt13 --checkpoint CvT-13-224x224-IN-1k.pth \
      --config.data.data_dir=~/tensorflow_datasets
  cvt-jax eval --config cvt13:res=384 --checkpoint cvt13_384.npz --data ~/imagenet   # a folder tree
  cvt-jax eval --config finetune:... --checkpoint out/finetune                       # a training workdir

The checkpoint is anything `cvt-jax convert` reads (a workdir, a converted .npz, a PyTorch file, a hub
name); its own architecture and head are used, and the config supplies the data, the eval batch size and
the compute dtype (model.eval_dtype, float32 as the official evaluation; bfloat16 is faster on GPU/TPU).
The resolution is the checkpoint's training resolution when it knows it (a workdir, or an .npz converted
from one) unless --image_size, the config's `res=` or --config.data.image_size asks for another, else the
config's (224: resize 256 + centre crop, 384: squash). The dataset's classes are checked against the head
and the output is checked writable before any image is read. Unreadable images are skipped, listed in the
output and reported (--strict: fail instead). The eval batch is the config's eval_batch_size, or the split
rounded up to the device count when that is smaller; on a CPU a batch the host's memory cannot hold is
refused before it runs. The result is printed and written as JSON (--output, default next to the
checkpoint, named after the dataset, split, resolution and step).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from cvt_jax import evaluate
from cvt_jax.cli import runner
from cvt_jax.data import input_pipeline

FLAGS = flags.FlagValues()
_CONFIG = runner.define_config_flag(
    FLAGS, "Config name or file (data, resolution, eval batch), e.g. cvt13:res=384.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir, converted .npz, PyTorch .pth/.bin/.safetensors or hub name.",
    flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", None, "Shortcut for a folder tree: sets data.source=folder and "
                            "data.data_dir (the root holding train/ and val/).", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "JSON summary path (default: next to the checkpoint).",
                              flag_values=FLAGS)
_STRICT = flags.DEFINE_bool("strict", False, "Fail if any image of the split is unreadable (default: "
                            "skip, list and report them).", flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Resolution (default: the checkpoint's training "
                                   "resolution when it knows it, else the config's: res=, data.image_size).",
                                   lower_bound=32, flag_values=FLAGS)
_HEADS = runner.define_heads_flag(FLAGS)
flags.mark_flags_as_required(["config", "checkpoint"], flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  runner.no_arguments(argv)
  config = _CONFIG.value
  if _DATA.value:
    config.data.source, config.data.data_dir = "folder", os.path.expanduser(_DATA.value)
  try:
    input_pipeline.check_config(config.data)
  except ValueError as e:
    raise runner.UsageError(str(e)) from e
  summary = evaluate.evaluate_checkpoint(config, _CHECKPOINT.value, _OUTPUT.value, _HEADS.value, _STRICT.value,
                                         _IMAGE_SIZE.value or _asked_resolution(config))
  skipped = f", {len(summary['skipped'])} unreadable skipped" if summary["skipped"] else ""
  steady = summary["images_per_second_after_first_batch"]
  print(f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  loss {summary['loss']:.4f}  "
        f"images {summary['count']}{skipped}  in {summary['seconds']:.1f} s with start-up and compile "
        f"({summary['images_per_second']:.1f} img/s" + ("" if steady is None else f"; {steady:.1f} img/s after "
                                                        "the first batch") + f")  -> {summary['output']}")


def _asked_resolution(config) -> int | None:
  """The config's resolution if the command line sets it (`:res=` or --config.data.image_size), else None:
  the checkpoint's own resolution then wins over the config's default."""
  arg = config_flags.get_config_filename(FLAGS["config"]).partition(":")[2]
  explicit = "data.image_size" in config_flags.get_override_values(FLAGS["config"]) or any(
      item.split("=")[0].strip() == "res" for item in arg.split(","))
  return config.data.image_size if explicit else None


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS, runner.config_fields_help)


if __name__ == "__main__":
  run()
