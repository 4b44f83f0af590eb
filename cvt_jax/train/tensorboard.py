"""The training run's TensorBoard scalars, written by tensorboardX: no TensorFlow on the training path.

clu's metric writers would do, but importing any of them imports TensorFlow and TensorBoard (their package
loads its TF summary writer), which a training host need not have.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from typing import Any

import jax


class ScalarWriter:
  """Scalars into TensorBoard event files in `logdir` (local or gs://), written by process 0 only.

  tensorboardX queues each event and writes it on a thread of its own, so the training loop never waits
  on the file system.
  """

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:  # the other processes, like the commands that only compile, write nothing
      self._writer = _tensorboardx().SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if self._writer is not None:
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(value), global_step=step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _tensorboardx() -> types.ModuleType:
  """tensorboardX, imported without PyTorch: it imports torch wherever torch is installed, only to accept torch
  tensors, which would add seconds to every training process's start."""
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX
