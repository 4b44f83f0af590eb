"""Host input pipeline: per-process uint8 batches from TFDS (tf.data) or a folder tree (PIL, no TF).

The host only decodes, crops and flips (`cvt_jax.data.preprocess`); RandAugment, erasing, normalisation and
mixup/cutmix run on the device inside the jitted step (`cvt_jax.data.augment`). `Prefetcher` moves the next
batches onto the devices while the current step runs.

Label order. A folder tree `<root>/train/<class>/*`, `<root>/val/<class>/*` (the official CvT README layout)
gets labels = index of the class folder name in the sorted list of train class folders. For ImageNet the
folders are WordNet ids (n01440764, ...), and TFDS `imagenet2012` numbers its labels by the same sorted WNID
list (its `label.names`), so a model trained or converted on one source evaluates correctly on the other.
A different order (e.g. by human-readable class name) is the classic "0.1 % top-1" failure.

Determinism and resumption. Training batches are a pure function of (seed, step): epoch e is a permutation
(folder: of the whole split, seeded by (seed, e); TFDS: file order + a shuffle buffer, seeded by (seed, e)),
cut into `steps_per_epoch = examples // global_batch` global batches (drop_last), and each example's crop and
flip come from its position in the epoch. `train_batches(..., start_step=k)` therefore yields exactly the
batches an uninterrupted run saw from step k on. Process p of n takes a disjoint part of every global batch
(folder) or a disjoint 1/n of the split (TFDS), so per-process batches are global_batch / n examples.
With `repeats` r > 1 (the repeated-augmentation sampler of DeiT that the CvT-21 @224 yaml uses) an epoch shows
n / r images r times each, with independent crops, the copies on different devices.

Bad input. Undecodable files are skipped with one warning per path: in training the slot is filled by the
next example of the epoch; in evaluation the slot is masked out and the number skipped is logged at the end
of the pass. A missing data dir, split or class folder, or an empty class folder, fails at once with the path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from cvt_jax import parallel
from cvt_jax.data import decode
from cvt_jax.data import preprocess

_PREFETCH_BATCHES = 2
_TFDS_SHUFFLE_BUFFER = 16_384
# Folder-path training: how many later examples of the epoch may stand in for an undecodable one.
_STAND_INS = 8

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where the data comes from and how it is cut (the config's `data` block; validated with the config).

  Attributes:
    source: 'tfds' or 'folder'.
    name: TFDS dataset name (e.g. 'imagenet2012'); for a folder tree only a label in messages.
    data_dir: TFDS data_dir, or the folder root holding the splits; local or `gs://`.
    train_split, eval_split: split names (TFDS) or sub-folders (folder).
    image_size: output side in pixels.
    num_workers: host decode processes (folder) / tf.data parallel calls (TFDS); 0 = as many as useful.
    crop: random-resized crop options `scale`, `ratio`, `interpolation` (`preprocess.train_image`).
    repeats: repeated augmentation: each image of an epoch shown this many times (1 = off).
    reduced_jpeg_decode: folder path, training: decode large JPEGs at a reduced DCT scale (faster, pixels
      differ slightly from the official pipeline's; `preprocess.train_image(draft=True)`).
  """

  source: str
  name: str
  data_dir: str | None
  train_split: str
  eval_split: str
  image_size: int
  num_workers: int = 0
  crop: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
  repeats: int = 1
  reduced_jpeg_decode: bool = False

  @classmethod
  def from_config(cls, data_config: Any) -> DataSpec:
    """A spec from a config's `data` block (split defaults depend on the source)."""
    get = data_config.get
    data_dir = get("data_dir", None)
    return cls(source=data_config.source, name=get("name", "") or "",
               data_dir=os.path.expanduser(data_dir) if data_dir else None,
               train_split=get("train_split", None) or "train",
               eval_split=(get("eval_split", None)
                           or ("val" if data_config.source == "folder" else "validation")),
               image_size=int(data_config.image_size), num_workers=int(get("num_workers", 0) or 0),
               crop={"scale": tuple(get("crop_scale", preprocess.TRAIN_SCALE)),
                     "ratio": tuple(get("crop_ratio", preprocess.TRAIN_RATIO)),
                     "interpolation": get("interpolation", "bicubic")},
               repeats=int(get("repeated_augmentation", 1) or 1),
               reduced_jpeg_decode=bool(get("reduced_jpeg_decode", False)))

  def where(self, split: str) -> str:
    """'folder tree /data/imagenet/val' or 'TFDS imagenet2012:validation', for messages."""
    if self.source == "folder":
      return f"folder tree {os.path.join(self.data_dir, split)}"
    return f"TFDS {self.name}:{split}"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  class_names: tuple[str, ...]
  num_train_examples: int
  num_eval_examples: int


def dataset_info(spec: DataSpec) -> DatasetInfo:
  """Class names and split sizes; fails with the path/name when the data is missing."""
  if spec.source == "folder":
    train = _list_folder(spec.data_dir, spec.train_split)
    evals = _list_folder(spec.data_dir, spec.eval_split, train.class_names)
    return DatasetInfo(len(train.class_names), train.class_names, len(train.paths), len(evals.paths))
  builder = _tfds_builder(spec)
  label = builder.info.features["label"]
  names = tuple(label.names) if getattr(label, "names", None) else tuple(
      str(i) for i in range(label.num_classes))
  return DatasetInfo(label.num_classes, names, _tfds_num_examples(builder, spec.train_split),
                     _tfds_num_examples(builder, spec.eval_split))


def train_batches(spec: DataSpec, global_batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[Batch]:
  """Infinite training batches of this process: {'image': uint8 (B/P, S, S, 3), 'label': int32 (B/P,)}.

  Deterministic in (seed, step); see the module docstring. Random-resized crop + flip on the host.
  An epoch is `num_train_examples // global_batch_size` steps for both sources.
  """
  local = _local_batch_size(global_batch_size)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  batches = (_folder_train(spec, global_batch_size, local, seed, start_step) if spec.source == "folder"
             else _tfds_train(spec, local, seed, start_step))
  if spec.repeats == 1:
    return batches
  spread = _spread_over_devices(local, jax.local_device_count())
  return ({k: v[spread] for k, v in batch.items()} for batch in batches)


def eval_batches(spec: DataSpec, global_batch_size: int) -> Iterator[Batch]:
  """One pass over every eval example: {'image', 'label', 'mask'}; padding rows have mask False.

  All batches have the same shape and every process yields the same number of them; across processes
  each example appears exactly once with mask True.
  """
  local = _local_batch_size(global_batch_size)
  if spec.source == "folder":
    return _folder_eval(spec, global_batch_size, local)
  return _tfds_eval(spec, local)


def _local_batch_size(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                     f"process count {n}")
  return global_batch_size // n


def _spread_over_devices(local: int, devices: int) -> np.ndarray:
  """Row order that sends consecutive examples to different devices (row r takes example order[r])."""
  if local % devices:
    return np.arange(local)
  return np.arange(local).reshape(local // devices, devices).T.reshape(-1)


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class _SkippedFiles:
  """Thread-safe record of every skip of an undecodable file, in order; warns once per path."""

  def __init__(self):
    self._lock = threading.Lock()
    self._skips: list[str] = []
    self._distinct: set[str] = set()

  def add(self, path: str, error: str) -> None:
    with self._lock:
      first = path not in self._distinct
      self._skips.append(path)
      self._distinct.add(path)
      count = len(self._distinct)
    if first:
      logging.warning("Skipping undecodable image %s (%s); %d skipped so far", path, error, count)

  def since(self, mark: int) -> list[str]:
    """The distinct paths skipped after `mark` (a `len()` taken earlier), in the order met."""
    with self._lock:
      return list(dict.fromkeys(self._skips[mark:]))

  def __len__(self) -> int:
    with self._lock:
      return len(self._skips)


SKIPPED_FILES = _SkippedFiles()


class Prefetcher:
  """Loads and shards the next batches on a background thread while the devices compute."""

  _DONE = object()

  def __init__(self, batches: Iterable[Batch], mesh: jax.sharding.Mesh, size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(iter(batches), mesh), daemon=True)
    self._thread.start()

  def _fill(self, batches: Iterator[Batch], mesh: jax.sharding.Mesh) -> None:
    try:
      for batch in batches:
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


# ---------------------------------------------------------------------------------------------- folder --


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
  paths: tuple[str, ...]
  labels: np.ndarray  # int32
  class_names: tuple[str, ...]


def _listdir(path: str) -> list[tuple[str, bool]]:
  """(name, is_dir) of `path`'s entries, hidden ones excluded; os.scandir locally (fast), else epath."""
  if "://" not in path:
    return [(e.name, e.is_dir()) for e in os.scandir(path) if not e.name.startswith(".")]
  return [(p.name, p.is_dir()) for p in epath.Path(path).iterdir() if not p.name.startswith(".")]


def _is_dir(path: str) -> bool:
  return os.path.isdir(path) if "://" not in path else epath.Path(path).is_dir()


@functools.lru_cache(maxsize=8)
def _list_folder(root: str, split: str, class_names: tuple[str, ...] | None = None) -> _FolderSplit:
  """Lists `<root>/<split>/<class>/<image>`; labels index `class_names` (default: this split's, sorted).

  Cached per process (an ImageNet listing takes seconds and info, train and eval all need it), so files
  added under `root` after the first call are not seen until the process restarts.
  """
  if not _is_dir(root):
    raise FileNotFoundError(f"data dir {root} does not exist or is not a directory")
  split_dir = os.path.join(root, split)
  if not _is_dir(split_dir):
    raise FileNotFoundError(f"split folder {split_dir} does not exist (expected "
                            "<data_dir>/<split>/<class>/<image>)")
  found = sorted(name for name, is_dir in _listdir(split_dir) if is_dir)
  if not found:
    raise FileNotFoundError(f"split folder {split_dir} has no class sub-folders")
  if class_names is None:
    class_names = tuple(found)
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f"{split_dir} has class folders absent from the train split: {unknown[:5]}")
  index = {name: i for i, name in enumerate(class_names)}
  paths, labels = [], []
  for name in found:
    class_dir = os.path.join(split_dir, name)
    files = sorted(f for f, is_dir in _listdir(class_dir)
                   if not is_dir and f.lower().endswith(decode.IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"class folder {class_dir} holds no images ({', '.join(decode.IMAGE_EXTENSIONS)})")
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([index[name]] * len(files))
  logging.info("Found %d images in %d classes under %s", len(paths), len(found), split_dir)
  return _FolderSplit(tuple(paths), np.asarray(labels, np.int32), class_names)


def _decoded(pool: decode.DecodePool, submit: Any, first: int, count: int | None
             ) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
  """Runs `submit(k) -> (jobs, extra)` for k = first, first + 1, ... (`count` of them, None: forever) a few
  batches ahead of the consumer; yields (images, path index used per row or -1, extra) in order."""
  extras = []
  k = first
  try:
    while count is None or k < first + count or len(pool):
      while pool.can_submit() and (count is None or k < first + count):
        jobs, extra = submit(k)
        pool.submit(jobs)
        extras.append(extra)
        k += 1
      images, used, failures = pool.result()
      for path, error in failures:
        SKIPPED_FILES.add(path, error)
      yield images, used, extras.pop(0)
  finally:
    pool.close()


def _folder_train(spec: DataSpec, global_batch: int, local: int, seed: int,
                  start_step: int) -> Iterator[Batch]:
  split = _list_folder(spec.data_dir, spec.train_split)
  n = len(split.paths)
  steps_per_epoch = n // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f"global batch size {global_batch} exceeds the {n} training images under "
                     f"{os.path.join(spec.data_dir, spec.train_split)}")
  offset = jax.process_index() * local

  @functools.lru_cache(maxsize=2)
  def order(epoch: int) -> np.ndarray:
    """The epoch's examples by position (with repeats, each image `spec.repeats` times in a row)."""
    perm = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(n)
    return np.repeat(perm, spec.repeats)[:n] if spec.repeats > 1 else perm

  def submit(step: int) -> tuple[list[decode.Job], np.ndarray]:
    epoch, i = divmod(step, steps_per_epoch)
    examples = order(epoch)
    positions = np.arange(i * global_batch + offset, i * global_batch + offset + local)
    # A bad file is replaced by the next example of the epoch, so batches keep their size.
    candidates = examples[(positions[:, None] + np.arange(_STAND_INS)) % n]
    jobs = [decode.Job(tuple(split.paths[c] for c in row), (seed, epoch, int(p)))
            for row, p in zip(candidates, positions)]
    return jobs, candidates

  def batches() -> Iterator[Batch]:
    pool = decode.DecodePool(spec.num_workers, local, spec.image_size,
                                  {**spec.crop, "draft": spec.reduced_jpeg_decode})
    for images, used, candidates in _decoded(pool, submit, start_step, None):
      if (used < 0).any():
        raise RuntimeError(f"{_STAND_INS} consecutive training images under "
                           f"{os.path.join(spec.data_dir, spec.train_split)} failed to decode")
      yield {"image": images, "label": split.labels[candidates[np.arange(local), used]]}

  return batches()


def _folder_eval(spec: DataSpec, global_batch: int, local: int) -> Iterator[Batch]:
  train = _list_folder(spec.data_dir, spec.train_split)
  split = _list_folder(spec.data_dir, spec.eval_split, train.class_names)
  n = len(split.paths)
  num_batches = -(-n // global_batch)
  offset = jax.process_index() * local

  def submit(b: int) -> tuple[list[decode.Job], np.ndarray]:
    indices = np.arange(b * global_batch + offset, b * global_batch + offset + local)
    return [decode.Job((split.paths[i],) if i < n else ()) for i in indices], indices

  def batches() -> Iterator[Batch]:
    skipped = 0
    pool = decode.DecodePool(spec.num_workers, local, spec.image_size, {})
    for images, used, indices in _decoded(pool, submit, 0, num_batches):
      ok = used == 0
      real = indices < n
      skipped += int(np.sum(~ok & real))
      labels = np.where(real, split.labels[np.minimum(indices, n - 1)], 0).astype(np.int32)
      yield {"image": images, "label": labels, "mask": ok & real}
    if skipped:
      logging.warning("Eval on %s: %d of this process's images were undecodable and not counted",
                      os.path.join(spec.data_dir, spec.eval_split), skipped)

  return batches()


# ------------------------------------------------------------------------------------------------ TFDS --


def _import_tf():
  """Imports TensorFlow for tf.data only, hiding every GPU from it (JAX owns the accelerators)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("data.source='tfds' needs TensorFlow and TFDS: pip install 'cvt-jax[tfds]' "
                      "(or train from a folder tree, data.source='folder')") from None
  tf.config.set_visible_devices([], "GPU")
  return tf


def _tfds_builder(spec: DataSpec):
  _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(spec.name, data_dir=spec.data_dir)
  except Exception as e:  # TFDS raises several types for unknown names; re-raise with the name.
    raise ValueError(f"cannot load TFDS dataset {spec.name!r} (data_dir={spec.data_dir!r}): "
                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
  features = builder.info.features
  for key in ("image", "label"):
    if key not in features:
      raise ValueError(f"TFDS dataset {spec.name!r} has no {key!r} feature (features: {list(features)})")
  return builder


def _tfds_num_examples(builder, split: str) -> int:
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError) as e:
    raise ValueError(f"TFDS dataset {builder.name!r} has no split {split!r} "
                     f"(splits: {list(builder.info.splits)})") from e


def _tfds_read(builder, split: str, shuffle_seed: int | None):
  """The raw (undecoded image) dataset of `split`, files shuffled with `shuffle_seed` if given."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16,
                                add_tfds_id=False)
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _tfds_train(spec: DataSpec, local: int, seed: int, start_step: int) -> Iterator[Batch]:
  tf = _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(spec)
  split = tfds.even_splits(spec.train_split, jax.process_count(), drop_remainder=True)[jax.process_index()]
  steps_per_epoch = _tfds_num_examples(builder, split) // local
  if steps_per_epoch == 0:
    raise ValueError(f"per-process batch {local} exceeds this process's part of "
                     f"{spec.name}:{spec.train_split} ({_tfds_num_examples(builder, split)} examples)")
  crop = functools.partial(preprocess.tf_train_image, size=spec.image_size, **spec.crop)
  parallel_calls = spec.num_workers or tf.data.AUTOTUNE

  def epoch_batches(epoch: int, skip: int):
    epoch_seed = _epoch_seed(seed, epoch) % (2**31)
    ds = _tfds_read(builder, split, shuffle_seed=epoch_seed)
    ds = ds.shuffle(_TFDS_SHUFFLE_BUFFER, seed=epoch_seed, reshuffle_each_iteration=False)
    if spec.repeats > 1:
      ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(spec.repeats))
    # Positions count from the epoch start, so a resumed run draws the same crops.
    ds = ds.take(steps_per_epoch * local).enumerate().skip(skip * local)
    ds = ds.map(lambda i, ex: {
        "image": crop(ex["image"], tf.stack([tf.constant(epoch_seed, tf.int64), i])),
        "label": tf.cast(ex["label"], tf.int32)}, num_parallel_calls=parallel_calls, deterministic=True)
    return tfds.as_numpy(ds.batch(local, drop_remainder=True).prefetch(_PREFETCH_BATCHES))

  def batches() -> Iterator[Batch]:
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      yield from epoch_batches(epoch, skip)
      epoch, skip = epoch + 1, 0

  return batches()


def _tfds_eval(spec: DataSpec, local: int) -> Iterator[Batch]:
  tf = _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(spec)
  parts = tfds.even_splits(spec.eval_split, jax.process_count())
  sizes = [_tfds_num_examples(builder, part) for part in parts]
  num_batches = -(-max(sizes) // local)
  mine = sizes[jax.process_index()]
  size = spec.image_size
  resize = functools.partial(preprocess.tf_eval_image, size=size)

  ds = _tfds_read(builder, parts[jax.process_index()], shuffle_seed=None)
  ds = ds.map(lambda ex: {"image": resize(ex["image"]), "label": tf.cast(ex["label"], tf.int32),
                          "mask": tf.constant(True)},
              num_parallel_calls=spec.num_workers or tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors({"image": tf.zeros((size, size, 3), tf.uint8),
                                          "label": tf.constant(0, tf.int32), "mask": tf.constant(False)})
  ds = ds.concatenate(padding.repeat(num_batches * local - mine))
  return iter(tfds.as_numpy(ds.batch(local, drop_remainder=True).prefetch(_PREFETCH_BATCHES)))
