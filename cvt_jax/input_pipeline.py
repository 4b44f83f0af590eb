"""Host input pipeline: per-process uint8 batches from TFDS (tf.data) or from a folder tree (PIL, no TF).

The host only decodes, crops and flips (`cvt_jax.preprocess`); RandAugment, erasing, normalisation and
mixup/cutmix run on the device inside the jitted step (`cvt_jax.augment`).

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

Bad input. Undecodable files are skipped with one warning per path: in training the slot is filled by the
next example of the epoch; in evaluation the slot is masked out and the number skipped is logged at the end
of the pass. A missing data dir, split or class folder, or an empty class folder, fails at once with the path.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from PIL import Image

from cvt_jax import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_PREFETCH_BATCHES = 2
_TFDS_SHUFFLE_BUFFER = 16_384

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where the data comes from and how big the images are (from the config's `data` block)."""

  source: str  # 'tfds' or 'folder'
  name: str  # TFDS name, e.g. 'imagenet2012' (ignored for folder)
  data_dir: str | None  # TFDS data_dir, or the folder root holding train/ and val/
  train_split: str
  eval_split: str
  image_size: int
  num_workers: int  # host decode threads (folder) / tf.data parallel calls (TFDS; 0 = autotune)

  def __post_init__(self):
    if self.source not in ("tfds", "folder"):
      raise ValueError(f"config.data.source must be 'tfds' or 'folder', got {self.source!r}")
    if self.source == "folder" and not self.data_dir:
      raise ValueError("config.data.data_dir must name the folder root (holding train/ and val/) "
                       "when config.data.source='folder'")
    if self.source == "tfds" and not self.name:
      raise ValueError("config.data.name must name a TFDS dataset when config.data.source='tfds'")
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}")
    if self.num_workers < 0:
      raise ValueError(f"config.data.num_workers must be >= 0, got {self.num_workers}")

  @classmethod
  def from_config(cls, data_config: Any, image_size: int) -> DataSpec:
    """Builds a spec from an ml_collections `config.data` block (split defaults depend on the source)."""
    source = data_config.source
    default_eval = "val" if source == "folder" else "validation"
    get = data_config.get
    data_dir = get("data_dir", None)
    return cls(source=source, name=get("name", "") or "",
               data_dir=os.path.expanduser(data_dir) if data_dir else None,
               train_split=get("train_split", None) or "train",
               eval_split=get("eval_split", None) or default_eval, image_size=int(image_size),
               num_workers=int(get("num_workers", 0) or 0))


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
  if spec.source == "folder":
    return _folder_train(spec, global_batch_size, local, seed, start_step)
  return _tfds_train(spec, local, seed, start_step)


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


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class _SkippedFiles:
  """Thread-safe record of undecodable files; warns once per path."""

  def __init__(self):
    self._lock = threading.Lock()
    self._paths: set[str] = set()

  def add(self, path: str, error: Exception) -> None:
    with self._lock:
      if path in self._paths:
        return
      self._paths.add(path)
      count = len(self._paths)
    logging.warning("Skipping undecodable image %s (%s: %s); %d skipped so far", path,
                    type(error).__name__, error, count)

  def __len__(self) -> int:
    with self._lock:
      return len(self._paths)


SKIPPED_FILES = _SkippedFiles()


# ---------------------------------------------------------------------------------------------- folder --


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
  paths: tuple[str, ...]
  labels: np.ndarray  # int32
  class_names: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def _list_folder(root: str, split: str, class_names: tuple[str, ...] | None = None) -> _FolderSplit:
  """Lists `<root>/<split>/<class>/<image>`; labels index `class_names` (default: this split's, sorted).

  Cached per process (an ImageNet listing takes seconds and info, train and eval all need it), so files
  added under `root` after the first call are not seen until the process restarts.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data dir {root!r} does not exist or is not a directory")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"split folder {split_dir!r} does not exist (expected "
                            f"<data_dir>/<split>/<class>/<image>)")
  found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
  if not found:
    raise FileNotFoundError(f"split folder {split_dir!r} has no class sub-folders")
  if class_names is None:
    class_names = tuple(found)
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f"{split_dir!r} has class folders absent from the train split: {unknown[:5]}")
  index = {name: i for i, name in enumerate(class_names)}
  paths, labels = [], []
  for name in found:
    class_dir = os.path.join(split_dir, name)
    files = sorted(e.name for e in os.scandir(class_dir)
                   if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"class folder {class_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([index[name]] * len(files))
  logging.info("Found %d images in %d classes under %s", len(paths), len(found), split_dir)
  return _FolderSplit(tuple(paths), np.asarray(labels, np.int32), class_names)


class _BatchPrefetcher:
  """Decodes batches on a thread pool, `_PREFETCH_BATCHES` ahead of the consumer.

  PIL releases the GIL while decoding and resizing, so threads scale across cores without the
  copies a process pool would need.
  """

  def __init__(self, num_workers: int):
    self._pool = concurrent.futures.ThreadPoolExecutor(num_workers or os.cpu_count() or 1,
                                                       thread_name_prefix="cvt_decode")
    self._pending: collections.deque = collections.deque()
    # Runs at the latest at interpreter exit, before the modules the pool needs are torn down.
    self.close = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

  def submit(self, shape: tuple[int, ...], jobs: list[Callable[[], np.ndarray | None]], extra: Any) -> None:
    images = np.zeros(shape, np.uint8)

    def run(j):
      image = jobs[j]()
      if image is not None:
        images[j] = image
      return image is not None

    self._pending.append((images, [self._pool.submit(run, j) for j in range(len(jobs))], extra))

  def __len__(self) -> int:
    return len(self._pending)

  def pop(self) -> tuple[np.ndarray, np.ndarray, Any]:
    images, futures, extra = self._pending.popleft()
    ok = np.array([f.result() for f in futures], dtype=bool)
    return images, ok, extra


def _folder_train(spec: DataSpec, global_batch: int, local: int, seed: int,
                  start_step: int) -> Iterator[Batch]:
  split = _list_folder(spec.data_dir, spec.train_split)
  n = len(split.paths)
  steps_per_epoch = n // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f"global batch size {global_batch} exceeds the {n} training images under "
                     f"{os.path.join(spec.data_dir, spec.train_split)!r}")
  offset = jax.process_index() * local
  size = spec.image_size

  @functools.lru_cache(maxsize=2)
  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng(_epoch_seed(seed, epoch)).permutation(n)

  def load(epoch: int, position: int) -> np.ndarray:
    perm = permutation(epoch)
    rng = np.random.default_rng([seed, epoch, position])
    # A bad file is replaced by the next example of the epoch, so batches keep their size.
    for k in range(n):
      index = perm[(position + k) % n]
      try:
        return preprocess.train_image(split.paths[index], size, rng), split.labels[index]
      except _DECODE_ERRORS as e:
        SKIPPED_FILES.add(split.paths[index], e)
    raise RuntimeError(f"no decodable image under {os.path.join(spec.data_dir, spec.train_split)!r}")

  def submit(step: int) -> None:
    epoch, i = divmod(step, steps_per_epoch)
    positions = range(i * global_batch + offset, i * global_batch + offset + local)
    labels = np.zeros((local,), np.int32)

    def job(j, position):
      image, labels[j] = load(epoch, position)
      return image

    prefetcher.submit((local, size, size, 3), [functools.partial(job, j, p)
                                               for j, p in enumerate(positions)], labels)

  def batches() -> Iterator[Batch]:
    try:
      next_step = start_step
      while True:
        while len(prefetcher) < _PREFETCH_BATCHES + 1:
          submit(next_step)
          next_step += 1
        images, _, labels = prefetcher.pop()
        yield {"image": images, "label": labels}
    finally:
      prefetcher.close()

  prefetcher = _BatchPrefetcher(spec.num_workers)
  return batches()


def _folder_eval(spec: DataSpec, global_batch: int, local: int) -> Iterator[Batch]:
  train = _list_folder(spec.data_dir, spec.train_split)
  split = _list_folder(spec.data_dir, spec.eval_split, train.class_names)
  n = len(split.paths)
  num_batches = -(-n // global_batch)
  offset = jax.process_index() * local
  size = spec.image_size

  def load(index: int) -> np.ndarray | None:
    if index >= n:
      return None  # padding
    try:
      return preprocess.eval_image(split.paths[index], size)
    except _DECODE_ERRORS as e:
      SKIPPED_FILES.add(split.paths[index], e)
      return None

  def submit(b: int) -> None:
    indices = np.arange(b * global_batch + offset, b * global_batch + offset + local)
    prefetcher.submit((local, size, size, 3), [functools.partial(load, int(i)) for i in indices], indices)

  def batches() -> Iterator[Batch]:
    skipped = 0
    try:
      next_batch = 0
      for _ in range(num_batches):
        while len(prefetcher) < _PREFETCH_BATCHES + 1 and next_batch < num_batches:
          submit(next_batch)
          next_batch += 1
        images, ok, indices = prefetcher.pop()
        skipped += int(np.sum(~ok & (indices < n)))
        labels = np.where(indices < n, split.labels[np.minimum(indices, n - 1)], 0).astype(np.int32)
        yield {"image": images, "label": labels, "mask": ok}
    finally:
      prefetcher.close()
    if skipped:
      logging.warning("Eval on %s: %d of this process's images were undecodable and not counted",
                      os.path.join(spec.data_dir, spec.eval_split), skipped)

  prefetcher = _BatchPrefetcher(spec.num_workers)
  return batches()


# ------------------------------------------------------------------------------------------------ TFDS --


def _import_tf():
  """Imports TensorFlow for tf.data only, hiding every GPU from it (JAX owns the accelerators)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tf


def _tfds_builder(spec: DataSpec):
  _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(spec.name, data_dir=spec.data_dir)
  except Exception as e:  # TFDS raises several types for unknown names; re-raise with the name.
    raise ValueError(f"cannot load TFDS dataset {spec.name!r} (data_dir={spec.data_dir!r}): {e}") from e
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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16,
                                add_tfds_id=False)
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _is_jpeg(builder) -> bool:
  return getattr(builder.info.features["image"], "encoding_format", None) == "jpeg"


def _tfds_train(spec: DataSpec, local: int, seed: int, start_step: int) -> Iterator[Batch]:
  tf = _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(spec)
  split = tfds.even_splits(spec.train_split, jax.process_count(), drop_remainder=True)[jax.process_index()]
  steps_per_epoch = _tfds_num_examples(builder, split) // local
  if steps_per_epoch == 0:
    raise ValueError(f"per-process batch {local} exceeds this process's part of "
                     f"{spec.name}:{spec.train_split} ({_tfds_num_examples(builder, split)} examples)")
  crop = functools.partial(preprocess.tf_train_image, size=spec.image_size, is_jpeg=_is_jpeg(builder))
  parallel = spec.num_workers or tf.data.AUTOTUNE

  def epoch_batches(epoch: int, skip: int):
    epoch_seed = _epoch_seed(seed, epoch) % (2**31)
    ds = _tfds_read(builder, split, shuffle_seed=epoch_seed)
    ds = ds.shuffle(_TFDS_SHUFFLE_BUFFER, seed=epoch_seed, reshuffle_each_iteration=False)
    # Positions count from the epoch start, so a resumed run draws the same crops.
    ds = ds.take(steps_per_epoch * local).enumerate().skip(skip * local)
    ds = ds.map(lambda i, ex: {
        "image": crop(ex["image"], tf.stack([tf.constant(epoch_seed, tf.int64), i])),
        "label": tf.cast(ex["label"], tf.int32)}, num_parallel_calls=parallel, deterministic=True)
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
