"""The training run's TensorBoard scalars: clu's metric writers over tensorboardX, without TensorFlow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import tensorboardX
from clu.metric_writers import async_writer
from clu.metric_writers import interface
from clu.metric_writers import multi_writer


def make_writer(logdir: str) -> interface.MetricWriter:
  """Scalars into TensorBoard event files in `logdir` (local or gs://), written by process 0 on a thread of
  its own; the other processes write nothing."""
  if jax.process_index() > 0:
    return multi_writer.MultiWriter([])
  return async_writer.AsyncWriter(TensorboardWriter(logdir))


class TensorboardWriter(interface.MetricWriter):
  """clu's MetricWriter interface for scalars, written by tensorboardX."""

  def __init__(self, logdir: str):
    super().__init__()
    self._writer = tensorboardX.SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def _only_scalars(self, *args: Any, **kwargs: Any) -> None:
    raise NotImplementedError("the training run writes scalars only")

  write_summaries = write_images = write_videos = write_audios = write_texts = write_histograms = (
      write_hparams) = _only_scalars

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
