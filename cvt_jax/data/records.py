"""Image datasets as ArrayRecord shards: the format `cvt-jax prepare` writes and the pipeline reads.

  <root>/dataset_info.json                         class names, and per split its shards, counts, checksums
  <root>/<split>/<split>-00000-of-00128.array_record
  <root>/<split>/.done/00000.json                  a finished shard (written last, so resumes trust it)

A record is one image as its file stored it (the encoded JPEG/PNG bytes, decoded by the training pipeline
with the same PIL calls as a folder tree) with its label and its key (the file's path under the source,
for messages): `<u32 label><u16 key length><key utf-8><image bytes>`, little-endian. Records are stored
in the source's sorted order, a fixed number per shard, so that an interrupted `prepare` knows which
shards are finished and writes only the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from etils import epath

INFO_FILE = "dataset_info.json"
FORMAT = "cvt_jax.records/1"
_HEADER = struct.Struct("<IH")


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
  import tempfile  # pylint: disable=g-import-not-at-top

  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  final = root / shard_name(split, index, count)
  final.parent.mkdir(parents=True, exist_ok=True)
  local = "://" not in str(root)
  with tempfile.TemporaryDirectory(dir=str(final.parent) if local else None) as tmp:
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
  done = root / split / ".done" / f"{index:05d}.json"
  done.parent.mkdir(parents=True, exist_ok=True)
  done.write_text(json.dumps(dataclasses.asdict(shard)))
  return shard


def finished_shard(root: epath.Path, split: str, index: int, count: int) -> Shard | None:
  """The shard's record if a previous run finished it and the file is still the one it wrote."""
  done = root / split / ".done" / f"{index:05d}.json"
  if not done.exists():
    return None
  shard = Shard(**json.loads(done.read_text()))
  file = root / shard.file
  if shard.file != shard_name(split, index, count) or not file.exists():
    return None
  return shard


def verify(root: str | epath.PathLike, log: Callable[[str], None] = print) -> DatasetInfo:
  """Checks every shard of a prepared dataset against the counts and checksums of `dataset_info.json`."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  root = epath.Path(root)
  info = read_info(root)
  for split in info.splits.values():
    total = 0
    for shard in split.shards:
      path = root / shard.file
      if not path.exists():
        raise RecordsError(f"{path} is missing")
      if sha256(path) != shard.sha256:
        raise RecordsError(f"{path} does not match its checksum in {INFO_FILE} (damaged or replaced)")
      reader = array_record_module.ArrayRecordReader(str(path))
      try:
        count = reader.num_records()
      finally:
        reader.close()
      if count != shard.num_records:
        raise RecordsError(f"{path} holds {count} records, {INFO_FILE} says {shard.num_records}")
      total += count
    if total != split.num_examples:
      raise RecordsError(f"split {split.name!r}: {total} records in its shards, {INFO_FILE} says "
                         f"{split.num_examples}")
    log(f"{split.name}: {len(split.shards)} shards, {total} records, checksums match")
  return info


def write_info(root: str | epath.PathLike, info: DatasetInfo) -> None:
  path = epath.Path(root) / INFO_FILE
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(info.to_json(), indent=1))
  tmp.replace(path)


def blocks(count: int, per_shard: int) -> Sequence[range]:
  """The record ranges of the shards of a split of `count` records."""
  shards = max(1, -(-count // per_shard))
  return [range(i * per_shard, min(count, (i + 1) * per_shard)) for i in range(shards)]
