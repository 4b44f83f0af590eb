"""Image decoding in worker processes for the folder-tree path: batches that scale with the host's cores.

PIL's header parsing and the crop arithmetic hold the GIL, so threads of one process top out at a few
thousand images per second; worker processes do not. Workers write decoded rows straight into a batch in
shared memory and report only which rows failed, so nothing large is pickled. They import numpy, PIL and
`cvt_jax.data.preprocess` only (no JAX), and are started with 'spawn' (forking a process that runs JAX's
threads is unsafe). Every image is a pure function of its job (path, size, seed), so results do not depend
on the number of workers or on timing.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import multiprocessing
import os
import sys
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from cvt_jax.data import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_CHUNK = 8  # images per worker task: amortises the task's messages, keeps every worker busy


@dataclasses.dataclass(frozen=True)
class Job:
  """One row of a batch: the first of `paths` that decodes (training falls back to the next example).

  `seed` None is an evaluation row (`preprocess.eval_image`); else (seed, epoch, position) for the
  random-resized crop and flip of `preprocess.train_image`. `paths` empty is a padding row.
  """

  paths: tuple[str, ...]
  seed: tuple[int, ...] | None = None


def image_file(path: str) -> str | io.BytesIO:
  """What `PIL.Image.open` takes for `path`: a local path, or an object-store file (`gs://...`) read
  through etils.epath."""
  if "://" not in path:
    return path
  from etils import epath  # pylint: disable=g-import-not-at-top  # workers import it only when needed
  return io.BytesIO(epath.Path(path).read_bytes())


def decode(job: Job, size: int, crop: dict[str, Any]
           ) -> tuple[np.ndarray | None, int, list[tuple[str, str]]]:
  """(uint8 (size, size, 3) image or None, index of the path it came from or -1, [(path, error)] of the
  files that did not decode)."""
  failures = []
  for used, path in enumerate(job.paths):
    try:
      if job.seed is None:
        return preprocess.eval_image(image_file(path), size), used, failures
      rng = np.random.default_rng(job.seed)
      return preprocess.train_image(image_file(path), size, rng, **crop), used, failures
    except DECODE_ERRORS as e:
      failures.append((path, f"{type(e).__name__}: {e}"))
  return None, -1, failures


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


def _decode_chunk(buffer: str, shape: tuple[int, ...], start: int, jobs: Sequence[Job], size: int,
                  crop: dict[str, Any]) -> tuple[list[int], list[tuple[str, str]]]:
  """Worker: decodes `jobs` into rows start.. of the shared batch `buffer`; (path used per job, failures)."""
  if buffer not in _ATTACHED:
    _ATTACHED[buffer] = shared_memory.SharedMemory(name=buffer)
  rows = np.ndarray(shape, np.uint8, buffer=_ATTACHED[buffer].buf)
  used, failures = [], []
  for i, job in enumerate(jobs):
    image, index, failed = decode(job, size, crop)
    failures.extend(failed)
    rows[start + i] = 0 if image is None else image
    used.append(index)
  return used, failures


class DecodePool:
  """`num_workers` processes decoding batches of `Job`s into uint8 (B, size, size, 3) arrays, in order.

  `submit` queues a batch and returns at once; `result` returns the oldest queued batch as (images, index
  of the path each row came from or -1, failures). At most `slots` batches are queued at a time.
  """

  def __init__(self, num_workers: int, batch_size: int, size: int, crop: dict[str, Any], slots: int = 3):
    self._shape = (batch_size, size, size, 3)
    self._size, self._crop = size, dict(crop)
    self._buffers = [shared_memory.SharedMemory(create=True, size=int(np.prod(self._shape)))
                     for _ in range(slots)]
    self._free = list(range(slots))
    self._pending: list[tuple[int, list[concurrent.futures.Future]]] = []
    self._pool = _workers(num_workers or os.cpu_count() or 1)

  def can_submit(self) -> bool:
    return bool(self._free)

  def __len__(self) -> int:
    return len(self._pending)

  def submit(self, jobs: Sequence[Job]) -> None:
    if len(jobs) != self._shape[0]:
      raise ValueError(f"a batch has {self._shape[0]} jobs, got {len(jobs)}")
    slot = self._free.pop(0)
    futures = [self._pool.submit(_decode_chunk, self._buffers[slot].name, self._shape, start,
                                 jobs[start:start + _CHUNK], self._size, self._crop)
               for start in range(0, len(jobs), _CHUNK)]
    self._pending.append((slot, futures))

  def result(self) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    slot, futures = self._pending.pop(0)
    used, failures = [], []
    try:
      for future in futures:
        chunk_used, chunk_failures = future.result()
        used.extend(chunk_used)
        failures.extend(chunk_failures)
      images = np.ndarray(self._shape, np.uint8, buffer=self._buffers[slot].buf).copy()
    finally:
      self._free.append(slot)
    return images, np.asarray(used, np.int32), failures

  def close(self) -> None:
    for _, futures in self._pending:  # abandoned batches: let their tasks finish before the memory goes
      concurrent.futures.wait(futures)
    self._pending.clear()
    for buffer in self._buffers:
      buffer.close()
      buffer.unlink()
    self._buffers = []

  def __enter__(self) -> DecodePool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@functools.cache
def _workers(count: int) -> concurrent.futures.ProcessPoolExecutor:
  """One pool of `count` worker processes per process, shared by every `DecodePool` (starting is slow)."""
  pool = concurrent.futures.ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_exit_with_parent, initargs=(os.getpid(),))
  with _main_module_hidden():
    # Workers start on demand, one per submission while none is idle: start them all now, main hidden.
    concurrent.futures.wait([pool.submit(os.getpid) for _ in range(count)])
  atexit.register(pool.shutdown, wait=False, cancel_futures=True)
  return pool


def _exit_with_parent(parent: int) -> None:
  """A worker waits on its task queue forever, so a parent killed outright (SIGKILL, a dead host's abort)
  would leave it behind: each restart on the host would add a pool. It leaves within a second instead."""

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(1)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
  """'spawn' re-runs the parent's __main__ in every child: a training script would import JAX there, and a
  script read from stdin has no file to re-run. The workers need none of it."""
  main = sys.modules["__main__"]
  saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
  main.__dict__.pop("__file__", None)
  main.__spec__ = None
  try:
    yield
  finally:
    main.__dict__.update(saved)
    if "__spec__" not in saved:
      del main.__spec__
