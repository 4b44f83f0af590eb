"""`./run.sh demo`: builds the digits folder tree, trains a narrow CvT on it, prints the val top-1.

The same path as a real run (folder tree -> host crop/flip -> device augment -> jitted step -> orbax ->
padded eval), with `configs/demo.py`. Rerunning resumes from (or, when finished, re-evaluates) the
checkpoints in --workdir; pass --fresh to start over.
"""

import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging

_DATA_DIR = flags.DEFINE_string("data_dir", "demo_data/digits", "Where the digits JPEG tree is built.")
_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Checkpoints and TensorBoard logs.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Training epochs (default: configs/demo.py's).")
_FRESH = flags.DEFINE_bool("fresh", False, "Delete --workdir first instead of resuming from it.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from configs import demo as demo_config
  from cvt_jax import demo_data
  from cvt_jax import train_lib

  started = time.time()
  config = demo_config.get_config(None if _EPOCHS.value is None else f"epochs={_EPOCHS.value}")
  config.data.data_dir = demo_data.build_digits_tree(_DATA_DIR.value)
  if _FRESH.value and os.path.isdir(_WORKDIR.value):
    shutil.rmtree(_WORKDIR.value)
  logging.info("Training a %s on %s into %s.", config.model.variant, config.data.data_dir, _WORKDIR.value)
  _, result = train_lib.train_and_evaluate(config, _WORKDIR.value)
  minutes = (time.time() - started) / 60
  print(f"Final validation top-1: {result['top1']:.2f}% (top-5 {result['top5']:.2f}%) over "
        f"{result['count']} images; {minutes:.1f} min wall time.", flush=True)


if __name__ == "__main__":
  app.run(main)
