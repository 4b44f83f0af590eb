"""Writing a folder tree or a TFDS dataset as ArrayRecord shards (`cvt-jax prepare SRC DST`).

The images are stored as their files hold them (no re-encoding): the pipeline decodes records with the
same PIL calls as files. A file that is no image (PIL cannot read its header) is listed as unreadable in
`dataset_info.json` and left out; every other file, CMYK and greyscale JPEGs included, is stored. Shards
are written in parallel, each to a temporary name and then marked finished, so an interrupted run resumes
with the shards it had not finished; the last step writes `dataset_info.json` with every shard's record
count and SHA-256 (`records.verify` checks them).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
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

_JOB_FILE = ".prepare.json"  # what is being prepared: a resume must ask for the same
_PROGRESS_SECONDS = 10.0


class PrepareError(ValueError):
  """A source that cannot be prepared as asked, or a destination that is not ours to write."""


@dataclasses.dataclass(frozen=True)
class _Split:
  """A split to write: its size and a reader of its records in [start, stop)."""

  name: str
  count: int
  read: Callable[[int, int], Iterator[tuple[int, str, bytes]]]  # -> (label, key, encoded bytes)


def _folder_splits(root: str, names: Sequence[str] | None) -> tuple[tuple[str, ...], list[_Split]]:
  classes = sources.class_folders(root, "train")
  present = [name for name, is_dir in sources._listdir(root) if is_dir]  # pylint: disable=protected-access
  names = list(names) if names else [s for s in ("train", "val", "validation", "test") if s in present]
  splits = []
  for name in names:
    listing = sources.folder_split(root, name, classes).source

    def read(start: int, stop: int, listing=listing) -> Iterator[tuple[int, str, bytes]]:
      for i in range(start, stop):
        example = listing[i]
        yield example.label, os.path.relpath(example.key, root), epath.Path(example.key).read_bytes()

    splits.append(_Split(name, len(listing), read))
  return classes, splits


def _tfds_splits(name: str, data_dir: str | None, names: Sequence[str] | None
                 ) -> tuple[tuple[str, ...], list[_Split]]:
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

  splits = [_Split(s, int(builder.info.splits[s].num_examples), reader(s)) for s in names]
  return sources.tfds_class_names(builder), splits


def _readable(data: bytes) -> str:
  """'' when PIL reads the image's header, else why not."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.size  # pylint: disable=pointless-statement
    return ""
  except decode.DECODE_ERRORS as e:
    return f"{type(e).__name__}: {e}"


def is_preparation(dst: str) -> bool:
  """Whether `dst` holds a preparation (finished or not) that `prepare` wrote."""
  return (epath.Path(dst) / _JOB_FILE).exists()


def check_destination(dst: str, job: dict[str, Any]) -> None:
  """Refuses a destination that holds anything but an unfinished or finished preparation of `job`."""
  path = epath.Path(dst)
  if not path.exists():
    return
  if not path.is_dir():
    raise PrepareError(f"destination {dst} is a file")
  entries = {p.name for p in path.iterdir()}
  if not entries:
    return
  if _JOB_FILE not in entries:
    raise PrepareError(f"destination {dst} is not empty and holds no preparation to resume "
                       f"({', '.join(sorted(entries)[:3])}, ...): choose an empty or new folder")
  previous = json.loads((path / _JOB_FILE).read_text())
  if previous != job:
    differing = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
    raise PrepareError(f"destination {dst} holds the preparation of another job (it differs in "
                       f"{', '.join(differing)}: {previous}); choose another folder")


def prepare(src: str, dst: str, *, splits: Sequence[str] | None = None, data_dir: str | None = None,
            records_per_shard: int = 1024, jobs: int = 4, log: Callable[[str], None] = print
            ) -> records.DatasetInfo:
  """Writes `src` (a folder tree, or 'tfds:NAME' with TFDS's `data_dir`) to ArrayRecord shards in `dst`.

  Resumes an interrupted preparation of the same job in `dst`; refuses any other non-empty `dst`.
  """
  if records_per_shard < 1 or jobs < 1:
    raise PrepareError(f"records_per_shard={records_per_shard} and jobs={jobs} must be >= 1")
  job = {"source": src, "splits": list(splits or []), "data_dir": data_dir or "",
         "records_per_shard": records_per_shard, "format": records.FORMAT}
  check_destination(dst, job)
  if src.startswith("tfds:"):
    class_names, todo = _tfds_splits(src[len("tfds:"):], data_dir, splits)
  else:
    class_names, todo = _folder_splits(os.path.expanduser(src), splits)
  root = epath.Path(dst)
  root.mkdir(parents=True, exist_ok=True)
  (root / _JOB_FILE).write_text(json.dumps(job))
  done = {split.name: _write_split(root, split, records_per_shard, jobs, log) for split in todo}
  info = records.DatasetInfo(class_names, done, src)
  records.write_info(root, info)
  log(f"wrote {dst}: {len(class_names)} classes; " + "; ".join(
      f"{s.name} {s.num_examples} images in {len(s.shards)} shard{'' if len(s.shards) == 1 else 's'}"
      for s in done.values()))
  return info


def _write_split(root: epath.Path, split: _Split, per_shard: int, jobs: int,
                 log: Callable[[str], None]) -> records.SplitInfo:
  blocks = records.blocks(split.count, per_shard)
  shards: list[records.Shard | None] = [records.finished_shard(root, split.name, i, len(blocks))
                                        for i in range(len(blocks))]
  unreadable_file = root / split.name / ".done" / "unreadable.json"
  unreadable: dict[str, str] = json.loads(unreadable_file.read_text()) if unreadable_file.exists() else {}
  todo = [i for i, shard in enumerate(shards) if shard is None]
  if len(todo) < len(blocks):
    log(f"{split.name}: {len(blocks) - len(todo)} of {len(blocks)} shards were written before; resuming")
  lock = threading.Lock()
  progress = _Progress(split.name, len(blocks), split.count, log, len(blocks) - len(todo),
                       sum(s.num_records for s in shards if s))

  def write(i: int) -> None:
    found: dict[str, str] = {}

    def readable_records() -> Iterator[records.Record]:
      for label, key, data in split.read(blocks[i].start, blocks[i].stop):
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
      unreadable_file.write_text(json.dumps(unreadable))
    for key, why in found.items():
      log(f"{split.name}: {key} is not a readable image ({why}); left out")
    progress.done(blocks[i].stop - blocks[i].start)

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    for future in concurrent.futures.as_completed([pool.submit(write, i) for i in todo]):
      future.result()
  return records.SplitInfo(split.name, sum(s.num_records for s in shards), tuple(shards),
                           tuple(sorted(unreadable)))


class _Progress:
  """'train: 12/128 shards, 12288/131072 images, 2150 img/s, ETA 00:00:55', every few seconds and at the end."""

  def __init__(self, split: str, shards: int, images: int, log: Callable[[str], None],
               shards_done: int = 0, images_done: int = 0):
    self._split, self._shards, self._images, self._log = split, shards, images, log
    self._lock = threading.Lock()
    self._shards_done, self._images_done, self._resumed = shards_done, images_done, images_done
    self._started = self._last = time.time()

  def done(self, images: int) -> None:
    """One more shard of `images` images is written."""
    with self._lock:
      self._shards_done += 1
      self._images_done += images
      now = time.time()
      if now - self._last < _PROGRESS_SECONDS and self._shards_done < self._shards:
        return
      self._last = now
      rate = (self._images_done - self._resumed) / max(now - self._started, 1e-9)
      eta = (self._images - self._images_done) / max(rate, 1e-9)
      self._log(f"{self._split}: {self._shards_done}/{self._shards} shards, {self._images_done}/{self._images} "
                f"images, {rate:.0f} img/s, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
