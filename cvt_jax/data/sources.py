"""Random-access image sources: a folder tree, ArrayRecord shards (`cvt-jax prepare`), a TFDS data source.

Each is a sequence of `Example`s (label, key, and the encoded image as bytes or as a path to read) that
grain's worker processes index into; none decodes anything (`cvt_jax.data.decode` does, with the same PIL
calls for every source). They import no JAX, so that the workers stay light.

Labels. A folder tree `<root>/train/<class>/*`, `<root>/val/<class>/*` (the official CvT README layout)
gets labels = index of the class folder name in the sorted list of train class folders. For ImageNet the
folders are WordNet ids (n01440764, ...), and TFDS `imagenet2012` numbers its labels by the same sorted WNID
list (its `label.names`), so a model trained or converted on one source evaluates correctly on the other.
`cvt-jax prepare` keeps the labels of its source. A different order (e.g. by human-readable class name) is
the classic "0.1 % top-1" failure.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from absl import logging
from etils import epath

from cvt_jax.data import decode
from cvt_jax.data import records


@dataclasses.dataclass(frozen=True)
class Example:
  """One image of a source: its label, its key (a path, for messages) and its bytes, or None to read
  the file at `key`."""

  label: int
  key: str
  data: bytes | None = None


class Source(Protocol):
  """A random-access split of a dataset."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Example:
    ...


@dataclasses.dataclass(frozen=True)
class Split:
  """What a split is: its source, the dataset's class names, and its examples' keys that were found
  unreadable before training (by `cvt-jax prepare`; they are not in the source)."""

  source: Source
  class_names: tuple[str, ...]
  unreadable: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- folder --


class FolderSource:
  """The images of `<root>/<split>/<class>/`, sorted by class folder, then by file name."""

  def __init__(self, paths: Sequence[str], labels: np.ndarray):
    self._paths = np.asarray(paths, dtype=object)  # one pickled array for the workers, not a list
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> Example:
    return Example(int(self._labels[index]), str(self._paths[index]))


def _listdir(path: str) -> list[tuple[str, bool]]:
  """(name, is_dir) of `path`'s entries, hidden ones excluded; os.scandir locally (fast), else epath."""
  if "://" not in path:
    return [(e.name, e.is_dir()) for e in os.scandir(path) if not e.name.startswith(".")]
  return [(p.name, p.is_dir()) for p in epath.Path(path).iterdir() if not p.name.startswith(".")]


def _is_dir(path: str) -> bool:
  return os.path.isdir(path) if "://" not in path else epath.Path(path).is_dir()


def class_folders(root: str, split: str) -> tuple[str, ...]:
  """The sorted class folder names of `<root>/<split>`; fails with the path when there are none (saying so
  when `root` is a prepared dataset instead)."""
  if not _is_dir(root):
    raise FileNotFoundError(f"data dir {root} does not exist or is not a directory")
  split_dir = os.path.join(root, split)
  found = tuple(sorted(name for name, is_dir in _listdir(split_dir) if is_dir)) if _is_dir(split_dir) else ()
  if found:
    return found
  if _exists(os.path.join(root, records.INFO_FILE)):
    raise FileNotFoundError(f"{root} is a dataset written by `cvt-jax prepare`, not a folder tree of class "
                            f"folders: read it with --config.data.source=array_record "
                            f"--config.data.data_dir={root}")
  if not _is_dir(split_dir):
    raise FileNotFoundError(f"split folder {split_dir} does not exist (expected "
                            "<data_dir>/<split>/<class>/<image>)")
  raise FileNotFoundError(f"split folder {split_dir} has no class sub-folders")


def _exists(path: str) -> bool:
  return os.path.exists(path) if "://" not in path else epath.Path(path).exists()


def _is_class_tree(root: str) -> bool:
  """Whether `root` looks like `<root>/<split>/<class>/` (a sub-folder holding sub-folders)."""
  return _is_dir(root) and any(
      is_dir and any(d for _, d in _listdir(os.path.join(root, name))) for name, is_dir in _listdir(root))


@functools.lru_cache(maxsize=8)
def folder_split(root: str, split: str, class_names: tuple[str, ...]) -> Split:
  """Lists `<root>/<split>/<class>/<image>` with labels indexing `class_names` (the train split's).

  Cached per process (an ImageNet listing takes seconds), so files added later are not seen.
  """
  found = class_folders(root, split)
  unknown = sorted(set(found) - set(class_names))
  split_dir = os.path.join(root, split)
  if unknown:
    raise ValueError(f"{split_dir} has class folders absent from the train split: {unknown[:5]}")
  index = {name: i for i, name in enumerate(class_names)}
  paths, labels = [], []
  for name in found:
    class_dir = os.path.join(split_dir, name)
    files = sorted(f for f, is_dir in _listdir(class_dir)
                   if not is_dir and f.lower().endswith(decode.IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"class folder {class_dir} holds no images "
                              f"({', '.join(decode.IMAGE_EXTENSIONS)})")
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([index[name]] * len(files))
  logging.info("Found %d files in %d classes under %s", len(paths), len(found), split_dir)
  return Split(FolderSource(paths, np.asarray(labels)), class_names)


# ---------------------------------------------------------------------------------------- ArrayRecord --


@dataclasses.dataclass(frozen=True)
class _ShardPart:
  """grain/array_record's FileInstruction: `take` records from `skip` of a file of `examples_in_shard`."""

  filename: str
  skip: int
  take: int
  examples_in_shard: int


class ArrayRecordSource:
  """The records of a prepared split (`cvt_jax.data.records`), through grain's ArrayRecord data source.

  ArrayRecord reads local files only: the shards of a split on an object store are copied to a local
  cache (each process copies the shards of its own part, `localized`) and checked against their SHA-256.
  """

  def __init__(self, root: str, split: records.SplitInfo, local_files: dict[str, str] | None = None):
    import grain  # pylint: disable=g-import-not-at-top  # the folder and TFDS paths need no grain here

    self._root, self._split, self._local = root, split, local_files or {}
    parts = [_ShardPart(self._local.get(s.file, os.path.join(root, s.file)), 0, s.num_records, s.num_records)
             for s in split.shards]
    self._records = grain.sources.ArrayRecordDataSource(parts) if parts else []

  def __len__(self) -> int:
    return self._split.num_examples

  def __getitem__(self, index: int) -> Example:
    record = records.Record.parse(self._records[index])
    return Example(record.label, record.key, record.data)

  def localized(self, start: int, stop: int, cache_dir: str | None = None) -> ArrayRecordSource:
    """This source with the shards holding records [start, stop) on a local disk (the same source when
    they are there already)."""
    if "://" not in self._root:
      return self
    cache = epath.Path(cache_dir or tempfile.gettempdir()) / "cvt_jax_records" / hashlib.sha1(
        self._root.encode()).hexdigest()[:12]
    local, first = dict(self._local), 0
    for shard in self._split.shards:
      if first < stop and start < first + shard.num_records and shard.file not in local:
        local[shard.file] = _cached_copy(epath.Path(self._root) / shard.file, cache / shard.file, shard.sha256)
      first += shard.num_records
    return ArrayRecordSource(self._root, self._split, local)


def _cached_copy(remote: epath.Path, local: epath.Path, sha256: str) -> str:
  """`remote` copied to `local` unless a copy with that checksum is there already."""
  if not (local.exists() and records.sha256(local) == sha256):
    local.parent.mkdir(parents=True, exist_ok=True)
    logging.info("Copying %s to %s (ArrayRecord reads local files)", remote, local)
    partial = local.parent / f".{local.name}.{os.getpid()}"
    remote.copy(partial, overwrite=True)
    if records.sha256(partial) != sha256:
      partial.unlink()
      raise records.RecordsError(f"{remote} does not match its checksum in {records.INFO_FILE}")
    partial.rename(local)
  return os.fspath(local)


def prepared_info(root: str) -> records.DatasetInfo:
  """`records.read_info(root)`; a folder tree of class folders in its place gets both ways to read it."""
  try:
    return records.read_info(root)
  except records.RecordsError:
    if _is_class_tree(root):
      raise records.RecordsError(
          f"{root} is a folder tree of class folders, not a dataset written by `cvt-jax prepare`: read it as "
          f"it is with --config.data.source=folder, or prepare it once (cvt-jax prepare {root} <folder>) and "
          "read that with --config.data.data_dir=<folder>") from None
    raise


def array_record_split(root: str, split: str) -> Split:
  info = prepared_info(root)
  if split not in info.splits:
    raise ValueError(f"{root} has no split {split!r} (splits: {sorted(info.splits)})")
  return Split(ArrayRecordSource(root, info.splits[split]), info.class_names, info.splits[split].unreadable)


# ----------------------------------------------------------------------------------------------- TFDS --


class TfdsSource:
  """A split of a TFDS dataset prepared in the array_record file format (`tfds.data_source`)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self._where = f"{name}:{split}"
    self._data = tfds.data_source(name, split=split, data_dir=data_dir,
                                  decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> Example:
    example = self._data[index]
    return Example(int(example["label"]), f"{self._where}[{index}]", example["image"])


def tfds_builder(name: str, data_dir: str | None) -> Any:
  """The TFDS builder of a prepared dataset with 'image' and 'label' features; fails saying what is wrong."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("data.source='tfds' needs TFDS: pip install 'cvt-jax[tfds]'") from None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for unknown names; re-raise with the name.
    raise ValueError(f"cannot load TFDS dataset {name!r} (data_dir={data_dir!r}): "
                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
  if not builder.info.splits:
    raise ValueError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}: prepare it first "
                     f"(tfds.builder({name!r}).download_and_prepare(file_format='array_record'); ImageNet "
                     "needs its tar files in <data_dir>/downloads/manual, see the README)")
  features = builder.info.features
  for key in ("image", "label"):
    if key not in features:
      raise ValueError(f"TFDS dataset {name!r} has no {key!r} feature (features: {list(features)})")
  return builder


def tfds_class_names(builder: Any) -> tuple[str, ...]:
  label = builder.info.features["label"]
  if getattr(label, "names", None):
    return tuple(label.names)
  return tuple(str(i) for i in range(label.num_classes))


def tfds_split(name: str, split: str, data_dir: str | None) -> Split:
  if data_dir and "://" in data_dir:
    raise ValueError(f"TFDS data_dir {data_dir}: TFDS data sources read local files only (ArrayRecord); write "
                     f"the dataset as shards into the bucket (cvt-jax prepare tfds:{name} <bucket folder>) and "
                     "train with --config.data.source=array_record, which copies each host's shards to a "
                     "local cache")
  builder = tfds_builder(name, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (splits: {list(builder.info.splits)})")
  if "array_record" not in str(builder.info.file_format).lower():
    raise ValueError(f"TFDS dataset {name!r} is prepared as {builder.info.file_format.value}, which only "
                     "TensorFlow reads in order; convert it once for random access: cvt-jax prepare "
                     f"tfds:{name} <folder> --data_dir {data_dir or '~/tensorflow_datasets'}, then train with "
                     "--config.data.source=array_record --config.data.data_dir=<folder>")
  return Split(TfdsSource(name, split, data_dir), tfds_class_names(builder))
