"""The host input pipeline: per-process uint8 batches of any source, decoded in grain's worker processes.

One pipeline for every source (`cvt_jax.data.sources`: a folder tree, ArrayRecord shards written by
`cvt-jax prepare`, a TFDS dataset in the array_record format): a grain `MapDataset` over the source whose
element k is this process's part of global batch k, decoded and cropped by the one PIL implementation of the
official pixels (`cvt_jax.data.decode`), in `data.num_workers` worker processes. The host only decodes,
crops and flips; RandAugment, erasing, normalisation and mixup/cutmix run on the device inside the jitted
step (`cvt_jax.data.augment`). `Prefetcher` moves the next batches onto the devices while a step runs.

Processes. Process p of P reads its own contiguous 1/P of each split (examples [p n/P, (p+1) n/P)), so
hosts read disjoint shards; its batches are global_batch / P examples.

Determinism and resumption. Epoch e of a process is grain's permutation of its examples seeded by (seed, e),
cut into `steps_per_epoch` batches (the remainder is dropped); each example's crop and flip come from
(seed, epoch, process, position). A batch is therefore a pure function of (seed, step), whatever the number
of workers: `train_batches(..., start_step=k)` yields exactly the batches an uninterrupted run saw from step
k on, and a resumed run needs no iterator state. With `repeats` r > 1 (the repeated-augmentation sampler of
DeiT that the CvT-21 @224 yaml uses) an epoch shows n / r images r times each, with independent crops, the
copies on different devices.

Bad input. An undecodable image is reported (batches carry the keys under 'skipped'; `Prefetcher` hands
them to a callback): in training its slot is filled by the next image of the epoch; in evaluation the slot
is masked out. A missing data dir, split or class folder, or an empty class folder, fails at once with the
path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from absl import flags
from etils import epath

from cvt_jax import parallel
from cvt_jax.data import decode
from cvt_jax.data import sources

SOURCES = ("folder", "array_record", "tfds")
# How many later images of the epoch may stand in for an undecodable training image.
_STAND_INS = 8
_BUFFERED_BATCHES = 2  # per worker process, and on the devices (Prefetcher)

Batch = dict[str, np.ndarray]


class DataError(ValueError):
  """Data that cannot be read as asked (too few images, every stand-in undecodable, ...)."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where the data comes from and how it is cut (the config's `data` block; validated with the config).

  Attributes:
    source: 'folder', 'array_record' or 'tfds'.
    name: TFDS dataset name (e.g. 'imagenet2012'); otherwise only a label in messages.
    data_dir: the folder root holding the splits, the root `cvt-jax prepare` wrote, or TFDS's data_dir;
      local or `gs://`.
    train_split, eval_split: split names (sub-folders of a tree, splits of a prepared or TFDS dataset).
    image_size: output side in pixels.
    num_workers: decode processes; 0 decodes in this process (threads), None one per core.
    crop: random-resized crop options `scale`, `ratio`, `interpolation` (`preprocess.train_image`).
    repeats: repeated augmentation: each image of an epoch shown this many times (1 = off).
    reduced_jpeg_decode: training: decode large JPEGs at a reduced DCT scale (faster, pixels differ
      slightly from the official pipeline's; `preprocess.train_image(draft=True)`).
  """

  source: str
  name: str
  data_dir: str | None
  train_split: str
  eval_split: str
  image_size: int
  num_workers: int | None = None
  crop: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
  repeats: int = 1
  reduced_jpeg_decode: bool = False

  @classmethod
  def from_config(cls, data: Any) -> DataSpec:
    """A spec from a config's `data` block (`configs/common.py` defines every field)."""
    data_dir = os.path.expanduser(data.data_dir) if data.data_dir else None
    return cls(source=data.source, name=data.name or "", data_dir=data_dir, train_split=data.train_split,
               eval_split=data.eval_split or default_eval_split(data.source, data_dir),
               image_size=int(data.image_size), num_workers=data.num_workers,
               crop={"scale": tuple(data.crop_scale), "ratio": tuple(data.crop_ratio),
                     "interpolation": data.interpolation},
               repeats=int(data.repeated_augmentation), reduced_jpeg_decode=bool(data.reduced_jpeg_decode))

  def where(self, split: str | None = None) -> str:
    """'folder tree /data/imagenet/val', 'TFDS imagenet2012:validation', ..., for messages; without a split
    the whole dataset ('prepared dataset /data/shards')."""
    if self.source == "tfds":
      return f"TFDS {self.name}" + (f":{split}" if split else "")
    kind = "folder tree" if self.source == "folder" else "prepared dataset"
    return f"{kind} {os.path.join(self.data_dir or '', split or '')}".rstrip("/")


def check_config(data: Any) -> None:
  """Checks a config's `data` block before any data is read (`train` and `eval` share it).

  Raises:
    ValueError: 'invalid config: ...' naming the field, and the flag that sets it where one is missing.
  """
  def require(ok: bool, message: str) -> None:
    if not ok:
      raise ValueError(f"invalid config: {message}")

  require(data.source in SOURCES, f"data.source={data.source!r}; use one of {SOURCES}")
  require(data.image_size >= 32, f"data.image_size={data.image_size} must be >= 32")
  require(data.num_workers is None or data.num_workers >= 0,
          f"data.num_workers={data.num_workers} must be >= 0 (0: decode in this process; None: one per core)")
  if data.source == "folder":
    require(bool(data.data_dir), "data.source='folder' needs data.data_dir, the folder tree's root (holding "
            "train/ and val/): give --config.data.data_dir=<root>")
  if data.source == "array_record":
    require(bool(data.data_dir), "data.source='array_record' needs data.data_dir, a dataset written by "
            "`cvt-jax prepare`: give --config.data.data_dir=<the folder it wrote> (a folder tree instead: "
            "--config.data.source=folder --config.data.data_dir=<its root>)")
  if data.data_dir:
    require(epath.Path(os.path.expanduser(data.data_dir)).is_dir(),
            f"data.data_dir={data.data_dir!r} is not a directory")
  lo, hi = data.crop_scale
  require(0 < lo <= hi <= 1, f"data.crop_scale={tuple(data.crop_scale)} must satisfy 0 < min <= max <= 1")
  lo, hi = data.crop_ratio
  require(0 < lo <= hi, f"data.crop_ratio={tuple(data.crop_ratio)} must satisfy 0 < min <= max")
  require(data.interpolation in ("bicubic", "bilinear"),
          f"data.interpolation={data.interpolation!r}; use 'bicubic' or 'bilinear'")
  require(data.repeated_augmentation >= 1,
          f"data.repeated_augmentation={data.repeated_augmentation} must be >= 1 (1: off)")


def default_eval_split(source: str, data_dir: str | None) -> str:
  """'val' for a folder tree, 'validation' for TFDS, and whichever of the two a prepared dataset has."""
  if source == "folder":
    return "val"
  if source == "array_record" and data_dir:
    splits = sources.prepared_info(data_dir).splits
    return "val" if "val" in splits or "validation" not in splits else "validation"
  return "validation"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  class_names: tuple[str, ...]
  num_train_examples: int
  num_eval_examples: int


def split(spec: DataSpec, name: str) -> sources.Split:
  """Split `name` of the spec's source, labelled by the train split's classes."""
  if spec.source == "folder":
    classes = sources.class_folders(spec.data_dir, spec.train_split)
    return sources.folder_split(spec.data_dir, name, classes)
  if spec.source == "array_record":
    return sources.array_record_split(spec.data_dir, name)
  if spec.source == "tfds":
    return sources.tfds_split(spec.name, name, spec.data_dir)
  raise ValueError(f"data.source={spec.source!r}; use one of {SOURCES}")


def dataset_info(spec: DataSpec, splits: tuple[str, ...] | None = None) -> DatasetInfo:
  """Class names and split sizes (of `splits`, default both; a split left out counts 0 examples)."""
  wanted = splits or (spec.train_split, spec.eval_split)
  found = {name: split(spec, name) for name in wanted}
  names = next(iter(found.values())).class_names
  count = lambda name: len(found[name].source) if name in found else 0
  return DatasetInfo(len(names), names, count(spec.train_split), count(spec.eval_split))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Steps of an epoch: each process's examples (a 1/P of them) over its batch (global / P)."""
  processes = jax.process_count()
  return (num_examples // processes) // _local_batch_size(global_batch_size)


def train_batches(spec: DataSpec, global_batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
  """Endless training batches of this process: {'image': uint8 (B/P, S, S, 3), 'label': int32 (B/P,),
  'skipped': keys of undecodable images replaced by the next ones}, deterministic in (seed, step)."""
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  local = _local_batch_size(global_batch_size)
  data = split(spec, spec.train_split)
  start, stop = _process_part(len(data.source), drop_remainder=True)
  source = _localized(data.source, start, stop)
  count = stop - start
  if count // local == 0:
    raise DataError(f"the per-process batch of {local} exceeds this process's {count} training images of "
                    f"{spec.where(spec.train_split)} (global batch {global_batch_size})")
  rows = _TrainRow(source, spec, start, count, local, count // local, seed, jax.process_index(),
                   grain_module().MapDataset.range(count).shuffle(seed=_seed32(seed)).repeat())
  batches = _batched(rows, local, first=start_step, stop=sys.maxsize // (2 * local))
  spread = _spread_over_devices(local, jax.local_device_count()) if spec.repeats > 1 else None
  return _iterate(batches, spec.num_workers, spread)


def eval_batch_size(requested: int, num_examples: int) -> int:
  """The eval batch of a split of `num_examples`: `requested`, or the split rounded up to a multiple of the
  device count when that is less (a split of 9 images is not padded to a batch of 1024)."""
  devices = jax.device_count()
  return min(requested, -(-max(num_examples, 1) // devices) * devices)


def eval_batches(spec: DataSpec, global_batch_size: int) -> Iterator[Batch]:
  """One pass over every eval example: {'image', 'label', 'mask', 'skipped'}; padding rows and undecodable
  images have mask False. All batches have the same shape and every process yields the same number of them;
  across processes each example appears exactly once with mask True."""
  local = _local_batch_size(global_batch_size)
  data = split(spec, spec.eval_split)
  start, stop = _process_part(len(data.source), drop_remainder=False)
  largest = max(len(data.source) * (p + 1) // jax.process_count() - len(data.source) * p // jax.process_count()
                for p in range(jax.process_count()))
  rows = _EvalRow(_localized(data.source, start, stop), spec.image_size, start, stop)
  return _iterate(_batched(rows, local, first=0, stop=-(-largest // local)), spec.num_workers, None)


def _localized(source: sources.Source, start: int, stop: int) -> sources.Source:
  """`source` readable here for examples [start, stop) (ArrayRecord shards on an object store are copied)."""
  localized = getattr(source, "localized", None)
  return localized(start, stop) if localized else source


def _local_batch_size(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                     f"process count {n}")
  return global_batch_size // n


def _process_part(count: int, drop_remainder: bool) -> tuple[int, int]:
  """This process's contiguous [start, stop) of `count` examples: equal parts (the remainder dropped), or
  parts that differ by one and cover every example."""
  p, n = jax.process_index(), jax.process_count()
  if drop_remainder:
    return p * (count // n), (p + 1) * (count // n)
  return p * count // n, (p + 1) * count // n


def _spread_over_devices(local: int, devices: int) -> np.ndarray:
  """Row order that sends consecutive examples to different devices (row r takes example order[r])."""
  if local % devices:
    return np.arange(local)
  return np.arange(local).reshape(local // devices, devices).T.reshape(-1)


def _seed32(*values: int) -> int:
  return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


@functools.cache
def grain_module():
  """grain, imported on first use (it imports JAX's checkpointing, slow in processes that need neither)."""
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("the input pipeline needs grain: pip install grain (it is a cvt_jax dependency)") from None
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags; in a library process nothing parsed them
    flags.FLAGS.mark_as_parsed()
  return grain


@dataclasses.dataclass(frozen=True)
class _TrainRow:
  """Row q of this process's training stream: step q // local, position q % local of that batch."""

  source: sources.Source
  spec: DataSpec
  start: int  # this process's part of the split: examples [start, start + count)
  count: int
  local: int
  steps_per_epoch: int
  seed: int
  process: int
  order: Any  # grain MapDataset: position e * count + i -> the i-th example of epoch e

  def __call__(self, q: int) -> dict[str, Any]:
    step, row = divmod(q, self.local)
    epoch, within = divmod(step, self.steps_per_epoch)
    position = within * self.local + row
    crop = {**self.spec.crop, "draft": self.spec.reduced_jpeg_decode}
    rng_seed = (self.seed, epoch, self.process, position)
    failed = []
    for stand_in in range(_STAND_INS):  # a bad image is replaced by the next image of the epoch
      index = self.order[epoch * self.count + (position // self.spec.repeats + stand_in) % self.count]
      example = self.source[self.start + int(index)]
      try:
        pixels = decode.train_pixels(example, self.spec.image_size, rng_seed, crop)
      except decode.DECODE_ERRORS as e:
        failed.append(f"{example.key}\t{type(e).__name__}: {e}")
        continue
      return {"image": pixels, "label": np.int32(example.label), "skipped": "\n".join(failed)}
    raise DataError(f"{_STAND_INS} consecutive training images of {self.spec.where(self.spec.train_split)} "
                    f"failed to decode, e.g. {failed[0].replace(chr(9), ': ')}")


@dataclasses.dataclass(frozen=True)
class _EvalRow:
  """Row q of this process's eval pass: example start + q, or a masked padding row past `stop`."""

  source: sources.Source
  size: int
  start: int
  stop: int

  def __call__(self, q: int) -> dict[str, Any]:
    index = self.start + q
    blank = np.zeros((self.size, self.size, 3), np.uint8)
    if index >= self.stop:
      return {"image": blank, "label": np.int32(0), "mask": False, "skipped": ""}
    example = self.source[index]
    try:
      pixels = decode.eval_pixels(example, self.size)
    except decode.DECODE_ERRORS as e:
      return {"image": blank, "label": np.int32(example.label), "mask": False,
              "skipped": f"{example.key}\t{type(e).__name__}: {e}"}
    return {"image": pixels, "label": np.int32(example.label), "mask": True, "skipped": ""}


def _batched(row: Callable[[int], dict[str, Any]], local: int, first: int, stop: int) -> Any:
  """grain MapDataset whose element k is batch `first + k` of `row`s (batches up to `stop`)."""
  grain = grain_module()
  return grain.MapDataset.range(first * local, stop * local).map(row).batch(local)


def _iterate(batches: Any, num_workers: int | None, spread: np.ndarray | None) -> Iterator[Batch]:
  """The batches, decoded in `num_workers` processes (None: one per core; 0: threads of this process)."""
  grain = grain_module()
  workers = os.cpu_count() or 1 if num_workers is None else num_workers
  if workers == 0:
    stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=os.cpu_count() or 1,
                                                       prefetch_buffer_size=_BUFFERED_BATCHES))
  else:  # one batch at a time per worker: the processes are the parallelism
    _start_quiet_resource_tracker()
    stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=_BUFFERED_BATCHES),
        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  iterator = iter(stream)
  try:
    for batch in iterator:
      # Out of the workers' shared memory (a copy): a block released later than its module hits the
      # interpreter's shutdown.
      yield {k: np.array(v if spread is None else v[spread]) for k, v in batch.items()}
  finally:
    iterator.close()


def _start_quiet_resource_tracker() -> None:
  """Before Python 3.13 a process that opens another's shared memory registers it with the resource tracker
  again (CPython gh-82300), so the tracker reports every block grain's workers sent and this process
  unlinked as "leaked" at exit. The tracker (one per process tree) starts here with that report muted."""
  if sys.version_info >= (3, 13):
    return
  from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
  saved = list(sys.warnoptions)
  sys.warnoptions.append("ignore:resource_tracker:UserWarning")  # the tracker's command line takes these
  try:
    resource_tracker.ensure_running()
  finally:
    sys.warnoptions[:] = saved


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
  """A worker waits on its queue forever, so a parent killed outright (SIGKILL, a dead host's abort) would
  leave it behind: each restart on the host would add workers. It leaves within a second instead."""
  del worker_index, worker_count

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(1)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def skipped(batch: Batch) -> list[tuple[str, str]]:
  """(key, why) of the undecodable images a batch reports (and takes out of it)."""
  return [tuple(entry.split("\t", 1)) for entries in batch.pop("skipped", ()) for entry in str(entries).split("\n")
          if entry]


class Prefetcher:
  """Loads and shards the next batches on a background thread while the devices compute.

  Each batch's undecodable images, (key, why), go to `on_skipped` (on that thread) before the batch goes to
  the devices.
  """

  _DONE = object()

  def __init__(self, batches: Iterable[Batch], mesh: jax.sharding.Mesh,
               on_skipped: Callable[[list[tuple[str, str]]], None] | None = None,
               size: int = _BUFFERED_BATCHES):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._closed = threading.Event()
    self._on_skipped = on_skipped
    self._thread = threading.Thread(target=self._fill, args=(iter(batches), mesh), daemon=True)
    self._thread.start()

  def _fill(self, batches: Iterator[Batch], mesh: jax.sharding.Mesh) -> None:
    try:
      for batch in batches:
        bad = skipped(batch)
        if bad and self._on_skipped:
          self._on_skipped(bad)
        if not self._put(parallel.global_batch(batch, mesh)):
          return
      self._put(self._DONE)
    except BaseException as e:  # re-raised in the consumer, which owns error reporting
      self._put(e)
    finally:
      close = getattr(batches, "close", None)
      if close:
        close()  # a generator's `finally` (worker processes, shared memory) runs on this thread

  def _put(self, item: Any) -> bool:
    """Blocks until `item` is queued (True) or the prefetcher is closed (False)."""
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=0.5)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if item is self._DONE:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._closed.set()
    self._thread.join(timeout=30)


class SkipLog:
  """Warns once per undecodable image and keeps the keys in the order met (thread-safe)."""

  def __init__(self, log: Callable[..., None]):
    self._log = log
    self._lock = threading.Lock()
    self._seen: set[str] = set()
    self.keys: list[str] = []

  def __call__(self, skipped_images: list[tuple[str, str]]) -> None:
    with self._lock:
      new = [(key, why) for key, why in dict(skipped_images).items() if key not in self._seen]
      self._seen.update(key for key, _ in new)
      self.keys.extend(key for key, _ in new)
      total = len(self.keys)
    for key, why in new:
      self._log("Skipping undecodable image %s (%s); %d skipped so far", key, why, total)
