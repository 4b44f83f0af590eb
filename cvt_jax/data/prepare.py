"""Writing a folder tree or a TFDS dataset as ArrayRecord shards (`cvt-jax prepare SRC DST`).

The images are stored as their files hold them (no re-encoding): the pipeline decodes records with the
same PIL calls as files. A file that is no image (PIL cannot read its header) is listed as unreadable in
`dataset_info.json` and left out; every other file, CMYK and greyscale JPEGs included, is stored. Shards
are written in parallel, each to a temporary folder and then marked finished; the last step writes
`dataset_info.json` with every shard's record count and SHA-256 (`records.verify` checks them).

A preparation is a job, recorded first in DST's `.prepare.json`: the command's options and a fingerprint
of what it writes (the class names, and per split the number of files and a SHA-256 of the ordered
(key, label) listing; for TFDS the split sizes and the builder's version). A rerun lists the source again:
the same job resumes with the shards it had not finished (removing the temporary folders of a killed
run); any difference is refused in one line naming it, since shards of two listings would carry labels of
two class lists. `restart=True` removes what an earlier preparation wrote in DST and starts over.
Ctrl-C stops the writers after their current record, drops their partial shards and keeps the finished
ones.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from etils import epath
from PIL import Image

from cvt_jax.data import decode
from cvt_jax.data import records
from cvt_jax.data import sources
from cvt_jax.text import plural

_JOB_FILE = ".prepare.json"  # the job a resume must continue (`_Job`)
_UNREADABLE_FILE = "unreadable.json"  # in a split's .done folder: {key: why} of the files that are no images
_PROGRESS_SECONDS = 10.0
_START_OVER = "rerun with --restart to start over, or choose another folder"


class PrepareError(ValueError):
  """A source that cannot be prepared as asked, or a destination that is not ours to write."""


class _Stopped(Exception):
  """Raised in a writer once the preparation is stopped (Ctrl-C, or another writer's error)."""


@dataclasses.dataclass(frozen=True)
class _Split:
  """A split to write: its size, a digest of its ordered (key, label) listing, and a reader of its records
  in [start, stop)."""

  name: str
  count: int
  digest: str
  read: Callable[[int, int], Iterator[tuple[int, str, bytes]]]  # -> (label, key, encoded bytes)


@dataclasses.dataclass(frozen=True)
class _Job:
  """What a preparation writes: the command's options and a fingerprint of its source's listing."""

  options: dict[str, Any]  # source, splits, data_dir, records_per_shard, format
  class_names: tuple[str, ...]
  splits: dict[str, tuple[int, str]]  # split -> (files or examples, digest of the listing)
  version: str = ""  # a TFDS builder's version

  def to_json(self) -> dict[str, Any]:
    return {"options": self.options, "class_names": list(self.class_names), "version": self.version,
            "splits": {name: {"count": count, "sha256": digest} for name, (count, digest) in self.splits.items()}}

  @classmethod
  def from_json(cls, job: dict[str, Any]) -> _Job:
    return cls(job["options"], tuple(job["class_names"]),
               {name: (int(s["count"]), s["sha256"]) for name, s in job["splits"].items()}, job["version"])

  def differences(self, earlier: _Job) -> list[str]:
    """What differs from `earlier`, in words ('classes added: ant (4 classes, was 3)', ...)."""
    found = [f"{key} {self.options.get(key)!r}, was {earlier.options.get(key)!r}"
             for key in sorted(set(self.options) | set(earlier.options))
             if self.options.get(key) != earlier.options.get(key)]
    added = [c for c in self.class_names if c not in earlier.class_names]
    removed = [c for c in earlier.class_names if c not in self.class_names]
    if added or removed:
      found.append("; ".join(f"classes {what}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                             for what, names in (("added", added), ("removed", removed)) if names)
                   + f" ({plural(len(self.class_names), 'class')}, was {len(earlier.class_names)})")
    elif self.class_names != earlier.class_names:
      found.append("the class names are in another order")
    if self.version != earlier.version:
      found.append(f"version {self.version}, was {earlier.version}")
    if list(self.splits) != list(earlier.splits):
      found.append(f"splits {', '.join(self.splits)}, was {', '.join(earlier.splits)}")
    noun = "examples" if self.options["source"].startswith("tfds:") else "files"
    for name, (count, digest) in self.splits.items():
      if name not in earlier.splits:
        continue  # named with the splits above
      was, was_digest = earlier.splits[name]
      if count != was:
        found.append(f"{name}: {count} {noun}, was {was}")
      elif digest != was_digest:
        found.append(f"{name}: other {noun} or labels ({count}, as before)")
    return found


def _listing_digest(listing: Iterator[tuple[str, int]]) -> str:
  digest = hashlib.sha256()
  for key, label in listing:
    digest.update(f"{key}\t{label}\n".encode())
  return digest.hexdigest()


def _folder_splits(root: str, names: Sequence[str] | None) -> tuple[tuple[str, ...], list[_Split]]:
  classes = sources.class_folders(root, "train")
  present = [name for name, is_dir in sources._listdir(root) if is_dir]  # pylint: disable=protected-access
  names = list(names) if names else [s for s in ("train", "val", "validation", "test") if s in present]
  prefix = os.path.join(root, "")  # the listing's paths are os.path.join(root, split, class, file)
  splits = []
  for name in names:
    # The tree as it is now: folder_split caches its listings for the training pipeline.
    listing = sources.folder_split.__wrapped__(root, name, classes).source
    keys = [listing[i].key[len(prefix):] for i in range(len(listing))]  # os.path.relpath: 10 s for ImageNet

    def read(start: int, stop: int, listing=listing, keys=keys) -> Iterator[tuple[int, str, bytes]]:
      for i in range(start, stop):
        example = listing[i]
        yield example.label, keys[i], epath.Path(example.key).read_bytes()

    digest = _listing_digest((key, listing[i].label) for i, key in enumerate(keys))
    splits.append(_Split(name, len(listing), digest, read))
  return classes, splits


def _tfds_splits(name: str, data_dir: str | None, names: Sequence[str] | None
                 ) -> tuple[tuple[str, ...], list[_Split], str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = sources.tfds_builder(name, data_dir)
  names = list(names) if names else list(builder.info.splits)
  unknown = [s for s in names if s not in builder.info.splits]
  if unknown:
    raise PrepareError(f"TFDS dataset {name!r} has no split {unknown[0]!r} "
                       f"(splits: {list(builder.info.splits)})")
  skip = {"image": tfds.decode.SkipDecoding()}

  def reader(split: str) -> Callable[[int, int], Iterator[tuple[int, str, bytes]]]:
    def read(start: int, stop: int) -> Iterator[tuple[int, str, bytes]]:
      # A TFRecord dataset is read in order through tf.data (TensorFlow), one slice per shard.
      ds = builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False, decoders=skip)
      for i, example in enumerate(tfds.as_numpy(ds)):
        yield int(example["label"]), f"{name}:{split}[{start + i}]", bytes(example["image"])
    return read

  def split_of(s: str) -> _Split:
    # Listing a TFDS split means reading it: its file shards' sizes stand for the listing.
    shard_lengths = builder.info.splits[s].shard_lengths
    return _Split(s, int(builder.info.splits[s].num_examples),
                  _listing_digest((f"{name}:{s}#{i}", n) for i, n in enumerate(shard_lengths)), reader(s))

  return sources.tfds_class_names(builder), [split_of(s) for s in names], str(builder.info.version)


def _readable(data: bytes) -> str:
  """'' when PIL reads the image's header, else why not."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.size  # pylint: disable=pointless-statement
    return ""
  except decode.DECODE_ERRORS as e:
    return decode.why_undecodable(e)


def is_preparation(dst: str) -> bool:
  """Whether `dst` holds a preparation (finished or not) that `prepare` wrote."""
  return (epath.Path(dst) / _JOB_FILE).exists()


def check_destination(dst: str) -> None:
  """Refuses a destination that holds anything but a preparation (of any job)."""
  path = epath.Path(dst)
  if not path.exists():
    return
  if not path.is_dir():
    raise PrepareError(f"destination {dst} is a file")
  entries = {p.name for p in path.iterdir()}
  if entries and _JOB_FILE not in entries:
    raise PrepareError(f"destination {dst} is not empty and holds no preparation to resume "
                       f"({', '.join(sorted(entries)[:3])}, ...): choose an empty or new folder")


def _check_apart(src: str, dst: str) -> None:
  """Refuses a destination inside the source tree (its shards would join the tree) or around it."""
  if src.startswith("tfds:"):
    return
  src_path, dst_path = (p.rstrip("/") if "://" in p else os.path.realpath(os.path.expanduser(p))
                        for p in (src, dst))
  if dst_path == src_path or dst_path.startswith(src_path + "/"):
    raise PrepareError(f"destination {dst} is inside the source {src}: its shards would become part of the "
                       "tree they are read from; choose a folder outside it")
  if src_path.startswith(dst_path + "/"):
    raise PrepareError(f"the source {src} is inside the destination {dst}: choose a destination outside "
                       "the tree")


def _check_same_job(root: epath.Path, job: _Job, src: str, dst: str) -> None:
  """Refuses to resume in `root` a preparation that is not `job`, naming what differs."""
  path = root / _JOB_FILE
  if not path.exists():
    return
  try:
    earlier = _Job.from_json(json.loads(path.read_text()))
  except (ValueError, KeyError, TypeError):
    raise PrepareError(f"{path} is damaged or was written by an earlier cvt-jax that recorded no listing of "
                       f"its source, so a resume cannot tell whether the source changed; {_START_OVER}"
                       ) from None
  found = job.differences(earlier)
  if earlier.options != job.options:
    raise PrepareError(f"{dst} was prepared with other options: {'; '.join(found)}; {_START_OVER}")
  if found:
    raise PrepareError(f"{dst} was prepared from another listing of {src}: {'; '.join(found)}; {_START_OVER}")


def _remove_preparation(root: epath.Path, log: Callable[[str], None]) -> None:
  """Removes what `prepare` wrote in `root`, and nothing else: its job and info files, and in each split
  folder the shards, their markers and partial shards (then the folder itself if nothing is left)."""
  if not (root / _JOB_FILE).exists():
    return
  shards = 0
  for folder in (p for p in root.iterdir() if p.is_dir()):
    for path in records.written_by_prepare(folder):
      if path.is_dir():
        path.rmtree()
      else:
        path.unlink()
        shards += 1
    if not any(folder.iterdir()):
      folder.rmdir()
  for name in (records.INFO_FILE, _JOB_FILE):
    (root / name).unlink(missing_ok=True)
  log(f"--restart: removed the earlier preparation in {root} ({plural(shards, 'shard')})")


def prepare(src: str, dst: str, *, splits: Sequence[str] | None = None, data_dir: str | None = None,
            records_per_shard: int = 1024, jobs: int = 4, restart: bool = False,
            log: Callable[[str], None] = print) -> records.DatasetInfo:
  """Writes `src` (a folder tree, or 'tfds:NAME' with TFDS's `data_dir`) to ArrayRecord shards in `dst`.

  Resumes an interrupted preparation of the same job in `dst` (or, with `restart`, removes it and starts
  over); refuses a preparation of another job or source listing, and any other non-empty `dst`.
  """
  if records_per_shard < 1 or jobs < 1:
    raise PrepareError(f"records_per_shard={records_per_shard} and jobs={jobs} must be >= 1")
  _check_apart(src, dst)
  check_destination(dst)
  options = {"source": src, "splits": list(splits or []), "data_dir": data_dir or "",
             "records_per_shard": records_per_shard, "format": records.FORMAT}
  version = ""
  if src.startswith("tfds:"):
    class_names, todo, version = _tfds_splits(src[len("tfds:"):], data_dir, splits)
  else:
    class_names, todo = _folder_splits(os.path.expanduser(src), splits)
  job = _Job(options, class_names, {s.name: (s.count, s.digest) for s in todo}, version)
  root = epath.Path(dst)
  if restart:
    _remove_preparation(root, log)
  else:
    _check_same_job(root, job, src, dst)
  root.mkdir(parents=True, exist_ok=True)
  records.write_json(root / _JOB_FILE, job.to_json())
  done, written = {}, 0
  try:
    for split in todo:
      done[split.name], shards = _write_split(root, split, records_per_shard, jobs, log)
      written += shards
  except KeyboardInterrupt:
    log(f"interrupted: the finished shards stay in {dst}; rerun the same command to resume")
    raise
  info = records.DatasetInfo(class_names, done, src)
  records.write_info(root, info)
  log(f"{f'wrote {dst}' if written else f'{dst} is complete already, nothing to do'}: {len(class_names)} "
      "classes; " + "; ".join(_summary(s) for s in done.values()))
  return info


def _summary(split: records.SplitInfo) -> str:
  """'train 25 images in 1 shard (of 28 files, 3 not images)'."""
  summary = f"{split.name} {split.num_examples} images in {plural(len(split.shards), 'shard')}"
  unreadable = len(split.unreadable)
  return summary + (f" (of {split.num_examples + unreadable} files, {_not_images(unreadable)})" if unreadable
                    else "")


def _not_images(n: int) -> str:
  return f"{n} not {'an image' if n == 1 else 'images'}"


def _write_split(root: epath.Path, split: _Split, per_shard: int, jobs: int,
                 log: Callable[[str], None]) -> tuple[records.SplitInfo, int]:
  """Writes the shards of `split` that are not finished; returns the split's info and how many it wrote."""
  for partial in records.partial_shards(root / split.name):
    partial.rmtree()
  blocks = records.blocks(split.count, per_shard)
  shards: list[records.Shard | None] = [records.finished_shard(root, split.name, i, len(blocks))
                                        for i in range(len(blocks))]
  unreadable_file = records.done_folder(root, split.name) / _UNREADABLE_FILE
  unreadable: dict[str, str] = json.loads(unreadable_file.read_text()) if unreadable_file.exists() else {}
  todo = [i for i, shard in enumerate(shards) if shard is None]
  if todo and len(todo) < len(blocks):
    log(f"{split.name}: {len(blocks) - len(todo)} of {len(blocks)} shards were written before; writing the "
        f"other {len(todo)}")
  lock = threading.Lock()
  stop = threading.Event()
  progress = _Progress(split.name, len(blocks), split.count, log, len(blocks) - len(todo),
                       sum(len(b) for b, s in zip(blocks, shards) if s), len(unreadable))

  def write(i: int) -> None:
    found: dict[str, str] = {}

    def readable_records() -> Iterator[records.Record]:
      for label, key, data in split.read(blocks[i].start, blocks[i].stop):
        if stop.is_set():
          raise _Stopped  # write_shard removes the partial shard
        why = _readable(data)
        if why:
          found[key] = why
          continue
        yield records.Record(label, key, data)

    shard = records.write_shard(root, split.name, i, len(blocks), readable_records())
    with lock:
      shards[i] = shard
      unreadable.update(found)
      unreadable_file.parent.mkdir(parents=True, exist_ok=True)
      records.write_json(unreadable_file, unreadable)
    for key, why in found.items():
      log(f"{split.name}: {key} is not a readable image ({why}); left out")
    progress.done(len(blocks[i]), len(found))

  pool = concurrent.futures.ThreadPoolExecutor(jobs)
  try:
    for future in concurrent.futures.as_completed([pool.submit(write, i) for i in todo]):
      future.result()
  except BaseException:  # Ctrl-C (KeyboardInterrupt) or a writer's error: the other writers stop too
    stop.set()
    raise
  finally:
    pool.shutdown(cancel_futures=True)
  return records.SplitInfo(split.name, sum(s.num_records for s in shards), tuple(shards),
                           tuple(sorted(unreadable))), len(todo)


class _Progress:
  """'train: 12/128 shards, 12288/131072 files, 3 not images, 2150 files/s, ETA 00:00:55', every few seconds
  and at the end."""

  def __init__(self, split: str, shards: int, files: int, log: Callable[[str], None],
               shards_done: int = 0, files_done: int = 0, unreadable: int = 0):
    self._split, self._shards, self._files, self._log = split, shards, files, log
    self._lock = threading.Lock()
    self._shards_done, self._files_done, self._resumed = shards_done, files_done, files_done
    self._unreadable = unreadable
    self._started = self._last = time.time()

  def done(self, files: int, unreadable: int) -> None:
    """One more shard is written, of `files` files of which `unreadable` were no images."""
    with self._lock:
      self._shards_done += 1
      self._files_done += files
      self._unreadable += unreadable
      now = time.time()
      if now - self._last < _PROGRESS_SECONDS and self._shards_done < self._shards:
        return
      self._last = now
      rate = (self._files_done - self._resumed) / max(now - self._started, 1e-9)
      eta = (self._files - self._files_done) / max(rate, 1e-9)
      self._log(f"{self._split}: {self._shards_done}/{self._shards} shards, {self._files_done}/{self._files} "
                f"files{f', {_not_images(self._unreadable)}' if self._unreadable else ''}, {rate:.0f} files/s, "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
