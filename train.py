r"""Trains and evaluates CvT from a config: `python train.py --config configs/cvt13.py --workdir out/cvt13`.

Running the same command again resumes from the latest checkpoint in --workdir. Any config field can be
overridden (`--config.optim.lr=1e-3`, `--config.data.data_dir=...`); unknown keys fail. See configs/*.py.

Multi-host: pass --jax_distributed (or --config.jax_distributed=True) on every host. TPU pods and
SLURM/Open MPI GPU clusters are detected automatically; elsewhere set JAX_COORDINATOR_ADDRESS=host:port,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or the matching jax.distributed.initialize arguments) on each process.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/cvt13.py:res=384.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard logs; reused to resume.")
_JAX_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                     "Call jax.distributed.initialize() (multi-host runs).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "With --jax_distributed: seconds after which a silent process counts as dead "
    "and every other process stops with an error instead of waiting for it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  import jax  # after flag parsing, so that --help stays fast

  from cvt_jax import parallel
  from cvt_jax import train_lib

  config = _CONFIG.value
  if _JAX_DISTRIBUTED.value or config.jax_distributed:
    parallel.initialize_distributed(_HEARTBEAT_TIMEOUT.value)
  logging.info("JAX process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
  try:
    train_lib.validate_config(config)
  except ValueError as e:
    sys.exit(f"train.py: {e}")
  logging.info("Config:\n%s", config)
  try:
    train_lib.train_and_evaluate(config, _WORKDIR.value)
  except (FileNotFoundError, FloatingPointError, ValueError) as e:  # bad data/weights or a diverged run
    logging.debug("Details:", exc_info=True)
    sys.exit(f"train.py: {type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main)
