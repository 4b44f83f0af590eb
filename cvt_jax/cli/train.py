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
import functools
import os
from typing import Any, Iterator, Sequence

import jax
from absl import flags
from absl import logging

from cvt_jax import parallel
from cvt_jax.cli import runner
from cvt_jax.train import trainer

FLAGS = flags.FlagValues()
_CONFIG = runner.define_config_flag(
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
  runner.no_arguments(argv)
  config = _CONFIG.value
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
  if _JAX_DISTRIBUTED.value or config.jax_distributed:
    parallel.initialize_distributed(_HEARTBEAT_TIMEOUT.value, _STARTUP_TIMEOUT.value)
  try:
    trainer.validate_config(config)
  except ValueError as e:
    raise runner.UsageError(str(e)) from e
  trainer.train_and_evaluate(config, _WORKDIR.value, log_to=functools.partial(_run_log, config))


@contextlib.contextmanager
def _run_log(config: Any, path: str) -> Iterator[None]:
  """The run's log file, opened with the processes and the whole config."""
  with runner.logging_to(path):
    logging.info("JAX process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
    logging.info("Config:\n%s", config, extra=runner.LOG_FILE_ONLY)
    yield


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS, runner.config_fields_help)


if __name__ == "__main__":
  run()
