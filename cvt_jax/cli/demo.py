"""`cvt-jax demo` (`./run.sh demo`): builds the digits folder tree, trains a narrow CvT on it, prints top-1.

The same path as a pod's run: the folder tree is written as ArrayRecord shards (`cvt-jax prepare`), read
by grain's decode processes (host crop/flip) -> device augment -> jitted step -> orbax -> padded eval,
with the packaged config `demo`. Rerunning resumes from (or, when finished, re-evaluates)
the checkpoints in --workdir; --fresh starts over, deleting only what a cvt_jax run wrote there.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

from absl import flags
from absl import logging

from cvt_jax import workdir as workdir_lib
from cvt_jax.cli import runner
from cvt_jax.configs import demo as demo_config
from cvt_jax.data import digits
from cvt_jax.train import trainer

FLAGS = flags.FlagValues()
_DATA_DIR = flags.DEFINE_string("data_dir", "demo_data/digits", "Where the digits JPEG tree is built (its "
                                "ArrayRecord shards go to <data_dir>_shards).", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Checkpoints, logs and TensorBoard summaries.",
                               flag_values=FLAGS)
_EPOCHS = flags.DEFINE_integer("epochs", None, "Training epochs (default: the demo config's).", lower_bound=1,
                               flag_values=FLAGS)
_FRESH = flags.DEFINE_bool("fresh", False, "Delete the previous demo run in --workdir first (refused on a "
                           "folder that is not a cvt_jax workdir).", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  runner.no_arguments(argv)
  started = time.time()
  workdir = _WORKDIR.value
  if _FRESH.value:
    workdir_lib.check_removable(workdir)  # before the data tree is built
  config = demo_config.get_config(None if _EPOCHS.value is None else f"epochs={_EPOCHS.value}")
  tree = digits.build_digits_tree(_DATA_DIR.value)
  config.data.data_dir = digits.prepared_shards(tree, f"{tree.rstrip('/')}_shards")

  @contextlib.contextmanager
  def log_to(path: str) -> Iterator[None]:
    with runner.logging_to(path):
      logging.info("Training a %s on %s into %s (full log: %s).", config.model.variant, config.data.data_dir,
                   workdir, path)
      yield

  _, result = trainer.train_and_evaluate(config, workdir, log_to=log_to, fresh=_FRESH.value)
  minutes = (time.time() - started) / 60
  print(f"Final validation top-1: {result['top1']:.2f}% (top-5 {result['top5']:.2f}%) over "
        f"{result['count']} images; {minutes:.1f} min wall time.", flush=True)


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
