r"""Train and evaluate CvT from a config: `cvt-jax train --config cvt13 --workdir out/cvt13`.

Running the same command again resumes from the newest readable checkpoint in --workdir, which may be
local or on an object store (gs://bucket/run). --config takes a packaged config by name (cvt13, cvt21,
cvtw24, finetune, demo) or a path, optionally with its argument (cvt13:res=384,batch=1024); any field is
overridden with --config.<field>=<value> (the fields are listed below). A second run in the same local
workdir refuses to start while the first holds it; a run whose model or classes differ from the
workdir's model_info.json refuses before touching anything.

Multi-host: run the same command on every host with --jax_distributed (TPU pods, SLURM and Open MPI are
detected; elsewhere set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID).
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import jax
from absl import flags
from absl import logging

from cvt_jax import cli
from cvt_jax import parallel
from cvt_jax import train_lib
from cvt_jax import workdir as workdir_lib

FLAGS = flags.FlagValues()
_CONFIG = cli.define_config_flag(
    FLAGS, "Config name or file, optionally with an argument: cvt13:res=384.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and model_info.json (local or gs://); "
                               "reused to resume.", flag_values=FLAGS)
_JAX_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() "
                                     "(multi-host runs).", flag_values=FLAGS)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "With --jax_distributed: seconds after which a silent process counts as dead "
    "and every other process stops with an error instead of waiting for it.", lower_bound=1, flag_values=FLAGS)
_STARTUP_TIMEOUT = flags.DEFINE_integer(
    "startup_timeout", 300, "With --jax_distributed: seconds the processes wait for each other at start-up "
    "(hosts of a large slice can start minutes apart).", lower_bound=1, flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
  if _JAX_DISTRIBUTED.value or config.jax_distributed:
    parallel.initialize_distributed(_HEARTBEAT_TIMEOUT.value, _STARTUP_TIMEOUT.value)
  try:
    train_lib.validate_config(config)
  except ValueError as e:
    raise cli.UsageError(str(e)) from e
  with contextlib.ExitStack() as stack:
    if workdir_lib.is_local(workdir):
      workdir_lib.check_writable(workdir)
      if jax.process_index() == 0:
        stack.enter_context(workdir_lib.Lock(workdir))  # before the log file: a refused run writes nothing
      train_lib.check_workdir(config, workdir)
      suffix = "" if jax.process_index() == 0 else f".process{jax.process_index()}"
      stack.enter_context(cli.logging_to(os.path.join(workdir, f"train{suffix}.log")))
    logging.info("JAX process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
    logging.info("Config:\n%s", config, extra=cli.LOG_FILE_ONLY)
    train_lib.train_and_evaluate(config, workdir)


def run(argv: Sequence[str] | None = None) -> None:
  cli.run(main, argv, __doc__, FLAGS, cli.config_fields_help)


if __name__ == "__main__":
  run()
