"""Image datasets as ArrayRecord shards: the format `cvt-jax prepare` writes and the pipeline reads.

  <root>/dataset_info.json                         class names, and per split its shards, counts, checksums
  <root>/<split>/<split>-00000-of-00128.array_record
  <root>/<split>/.done/00000.json                  a finished shard (written last, so resumes trust it)
  <root>/<split>/tmpXXXXXXXX/                      a shard being written (a killed `prepare` leaves it; the
                                                   next run removes it)

A record is one image as its file stored it (the encoded JPEG/PNG bytes, decoded by the training pipeline
with the same PIL calls as a folder tree) with its label and its key (the file's path under the source,
for messages): `<u32 label><u16 key length><key utf-8><image bytes>`, little-endian. Records are stored
in the source's sorted order, a fixed number per shard, so that an interrupted `prepare` knows which
shards are finished and writes only the rest. `verify` checks a dataset against its info file: every
shard's count and checksum, every record's label against the class names (and a folder tree's record
against its class folder), the order of the records, and that the split folders hold nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from etils import epath

from cvt_jax.text import plural

INFO_FILE = "dataset_info.json"
FORMAT = "cvt_jax.records/1"
_HEADER = struct.Struct("<IH")
_DONE = ".done"
_PARTIAL_PREFIX = "tmp"  # tempfile's name for the folder of a shard being written
_READ_BLOCK = 1024  # records read at a time by `verify`


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a dataset: its label, its key (where it came from) and its encoded bytes."""

  label: int
  key: str
  data: bytes

  def serialize(self) -> bytes:
    key = self.key.encode()
    return _HEADER.pack(self.label, len(key)) + key + self.data

  @classmethod
  def parse(cls, raw: bytes) -> Record:
    label, key_length = _HEADER.unpack_from(raw)
    start = _HEADER.size + key_length
    return cls(label, raw[_HEADER.size:start].decode(), raw[start:])


@dataclasses.dataclass(frozen=True)
class Shard:
  """A finished shard file of a split."""

  file: str  # relative to the dataset root
  num_records: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  name: str
  num_examples: int
  shards: tuple[Shard, ...]
  unreadable: tuple[str, ...] = ()  # keys of source files that were not images (not stored)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """`dataset_info.json`: what a prepared dataset holds."""

  class_names: tuple[str, ...]
  splits: dict[str, SplitInfo]
  source: str = ""

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT, "source": self.source, "class_names": list(self.class_names),
            "splits": {name: {"num_examples": s.num_examples, "unreadable": list(s.unreadable),
                              "shards": [dataclasses.asdict(shard) for shard in s.shards]}
                       for name, s in self.splits.items()}}

  @classmethod
  def from_json(cls, info: dict[str, Any]) -> DatasetInfo:
    splits = {name: SplitInfo(name, int(s["num_examples"]), tuple(Shard(**shard) for shard in s["shards"]),
                              tuple(s.get("unreadable", ()))) for name, s in info["splits"].items()}
    return cls(tuple(info["class_names"]), splits, info.get("source", ""))


class RecordsError(ValueError):
  """A prepared dataset that is missing, unfinished or damaged."""


def read_info(root: str | epath.PathLike) -> DatasetInfo:
  """The `dataset_info.json` of a prepared dataset; fails naming what is missing."""
  path = epath.Path(root) / INFO_FILE
  if not path.exists():
    raise RecordsError(f"{root} holds no {INFO_FILE}: not a dataset written by `cvt-jax prepare` (or one "
                       "whose preparation has not finished: rerun the same `cvt-jax prepare` to finish it)")
  try:
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
      raise ValueError(f"format {info.get('format')!r}, this version reads {FORMAT!r}")
    return DatasetInfo.from_json(info)
  except (ValueError, KeyError, TypeError) as e:
    raise RecordsError(f"{path} is unreadable ({e})") from None


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}/{split}-{index:05d}-of-{count:05d}.array_record"


def sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def write_shard(root: epath.Path, split: str, index: int, count: int, records: Iterable[Record]) -> Shard:
  """Writes one shard (to a temporary name, renamed once complete) and its `.done` marker.

  ArrayRecord writes local files only: an object-store root gets the shard through a local temporary.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  final = root / shard_name(split, index, count)
  final.parent.mkdir(parents=True, exist_ok=True)
  local = "://" not in str(root)
  with tempfile.TemporaryDirectory(prefix=_PARTIAL_PREFIX, dir=str(final.parent) if local else None) as tmp:
    tmp_file = epath.Path(tmp) / final.name
    writer = array_record_module.ArrayRecordWriter(str(tmp_file), "group_size:1")
    written = 0
    try:
      for record in records:
        writer.write(record.serialize())
        written += 1
    finally:
      writer.close()
    shard = Shard(str(final.relative_to(root)) if local else shard_name(split, index, count), written,
                  sha256(tmp_file))
    if local:
      tmp_file.rename(final)
    else:
      tmp_file.copy(final, overwrite=True)
  done = done_folder(root, split) / f"{index:05d}.json"
  done.parent.mkdir(parents=True, exist_ok=True)
  write_json(done, dataclasses.asdict(shard))
  return shard


def finished_shard(root: epath.Path, split: str, index: int, count: int) -> Shard | None:
  """The shard's record if a previous run finished it and the file is still the one it wrote."""
  done = done_folder(root, split) / f"{index:05d}.json"
  if not done.exists():
    return None
  shard = Shard(**json.loads(done.read_text()))
  file = root / shard.file
  if shard.file != shard_name(split, index, count) or not file.exists():
    return None
  return shard


def verify(root: str | epath.PathLike, log: Callable[[str], None] = print) -> DatasetInfo:
  """Checks a prepared dataset against its `dataset_info.json`; fails in one line at the first disagreement.

  Every shard is read whole: its checksum and record count, and each record's label (one of the class
  names; for a folder tree, the name of the record's class folder) and place (records follow their source's
  sorted order, each once). A split folder may hold nothing but its listed shards and their markers.
  """
  root = epath.Path(root)
  info = read_info(root)
  folder_keys = bool(info.source) and not info.source.startswith("tfds:")
  for split in info.splits.values():
    listed = {epath.Path(shard.file).name for shard in split.shards} | {_DONE}
    stray = sorted(p.name for p in _entries(root / split.name) if p.name not in listed)
    if stray:
      raise RecordsError(f"{root / split.name / stray[0]} is not listed in {INFO_FILE}"
                         f"{f' (nor are {len(stray) - 1} more)' if len(stray) > 1 else ''}: left by an "
                         "interrupted or earlier preparation (rerun `cvt-jax prepare` with --restart to "
                         "write the dataset again without it)")
    total, previous = 0, None
    for shard in split.shards:
      path = root / shard.file
      for record in _checked_records(path, shard):
        previous = _check_record(record, previous, info.class_names, folder_keys, path)
      total += shard.num_records
    if total != split.num_examples:
      raise RecordsError(f"split {split.name!r}: {total} records in its shards, {INFO_FILE} says "
                         f"{split.num_examples}")
    log(f"{split.name}: {plural(len(split.shards), 'shard')}, {total} records, "
        "checksums, labels and order match")
  return info


def _checked_records(path: epath.Path, shard: Shard) -> Iterator[Record]:
  """The records of the shard file at `path`, once its checksum and record count are `shard`'s.

  ArrayRecord reads local files only: a shard on an object store is read from a temporary local copy.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  if not path.exists():
    raise RecordsError(f"{path} is missing")
  remote = "://" in str(path)
  with tempfile.TemporaryDirectory() if remote else contextlib.nullcontext() as tmp:
    local = epath.Path(tmp) / path.name if remote else path
    if remote:
      path.copy(local)
    if sha256(local) != shard.sha256:
      raise RecordsError(f"{path} does not match its checksum in {INFO_FILE} (damaged or replaced)")
    reader = array_record_module.ArrayRecordReader(str(local))
    try:
      count = reader.num_records()
      if count != shard.num_records:
        raise RecordsError(f"{path} holds {count} records, {INFO_FILE} says {shard.num_records}")
      for start in range(0, count, _READ_BLOCK):
        yield from map(Record.parse, reader.read(start, min(count, start + _READ_BLOCK)))
    finally:
      reader.close()


def _check_record(record: Record, previous: tuple[str, ...] | None, class_names: Sequence[str],
                  folder_keys: bool, path: epath.Path) -> tuple[str, ...] | None:
  """Fails unless `record` agrees with the class names and comes after `previous`; returns its place."""
  where = f"{path}: the record of {record.key}"
  if not 0 <= record.label < len(class_names):
    raise RecordsError(f"{where} has label {record.label}, not one of the {len(class_names)} classes of "
                       f"{INFO_FILE}")
  if not folder_keys:
    return None
  # A folder tree's key is <split>/<class>/<file>; its records are sorted by class folder, then file.
  place = tuple(record.key.split("/")[-2:])
  if place[0] != class_names[record.label]:
    raise RecordsError(f"{where} has label {record.label} ({class_names[record.label]!r}), not its class "
                       f"folder {place[0]!r}: the records disagree with the class names of {INFO_FILE} "
                       "(prepare the tree again with --restart)")
  if previous is not None and place <= previous:
    raise RecordsError(f"{where} comes after that of {'/'.join(previous)} "
                       f"({'stored twice' if place == previous else 'out of order'}: prepare the tree again "
                       "with --restart)")
  return place


def write_info(root: str | epath.PathLike, info: DatasetInfo) -> None:
  write_json(epath.Path(root) / INFO_FILE, info.to_json())


def write_json(path: epath.Path, value: Any) -> None:
  """Writes `path` whole or not at all (through a temporary name): a killed run leaves no half a file."""
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(value, indent=1))
  tmp.replace(path)


def done_folder(root: epath.Path, split: str) -> epath.Path:
  """Where `write_shard` marks a split's finished shards (and `prepare` keeps its unreadable files)."""
  return root / split / _DONE


def is_shard_file(split: str, name: str) -> bool:
  """Whether `name` is a shard file name of `split` (of any shard count)."""
  return re.fullmatch(rf"{re.escape(split)}-\d{{5}}-of-\d{{5}}\.array_record", name) is not None


def partial_shards(split_dir: epath.Path) -> list[epath.Path]:
  """The folders of shards whose writing was cut short (a killed `prepare`; other exits remove them)."""
  return [p for p in _entries(split_dir) if p.name.startswith(_PARTIAL_PREFIX) and p.is_dir()
          and all(is_shard_file(split_dir.name, f.name) for f in p.iterdir())]


def written_by_prepare(split_dir: epath.Path) -> list[epath.Path]:
  """What `prepare` writes in a split folder: shards (of any shard count), their markers, partial shards."""
  return [p for p in _entries(split_dir) if p.name == _DONE or is_shard_file(split_dir.name, p.name)
          ] + partial_shards(split_dir)


def _entries(folder: epath.Path) -> list[epath.Path]:
  return list(folder.iterdir()) if folder.is_dir() else []


def blocks(count: int, per_shard: int) -> Sequence[range]:
  """The record ranges of the shards of a split of `count` records."""
  shards = max(1, -(-count // per_shard))
  return [range(i * per_shard, min(count, (i + 1) * per_shard)) for i in range(shards)]
