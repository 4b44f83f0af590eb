"""A training workdir: what it holds, what it describes, and who may write it.

  <workdir>/model_info.json   architecture, class names in label order, image size, data fingerprint
  <workdir>/checkpoints/      orbax steps (`cvt_jax.checkpointing`)
  <workdir>/tensorboard/      TensorBoard event files
  <workdir>/train.log         the full log of every run (library INFO lines included)
  <workdir>/.lock             held by the process that trains in it

`model_info.json` is written once state exists (created or restored), atomically, and a run whose model
or data disagree with it refuses before touching anything. The lock is an `fcntl` lock on a local file:
the OS releases it when its process dies, so a resume after `kill -9` is never blocked. On a multi-host
run process 0 takes it; every process writes checkpoints, so two multi-host runs in one workdir are kept
apart by process 0's lock only where all hosts see the same filesystem. Object-store workdirs (`gs://`)
cannot be locked: the rule there is one run per workdir.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

from etils import epath

from cvt_jax.model import Variant

MODEL_INFO = "model_info.json"
LOCK = ".lock"
# What runs write into a workdir; `--fresh` deletes these and nothing else.
RUN_ENTRIES = (MODEL_INFO, "checkpoints", "tensorboard", "profile", LOCK)
RUN_FILE_PATTERNS = ("train*.log", "eval_*.json")


class WorkdirError(ValueError):
  """A workdir that belongs to another run, or holds something this run must not overwrite."""


class OutputError(WorkdirError):
  """An output path that cannot be written as asked (a bad argument: the commands exit with status 2)."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a workdir's checkpoints are: enough to evaluate, predict and export without a config."""

  variant: Variant
  num_classes: int
  class_names: tuple[str, ...]
  image_size: int
  data: str = ""  # where the training data came from, with its split sizes (informational)

  def to_json(self) -> dict[str, Any]:
    return {**self.variant.to_json(), "num_classes": self.num_classes, "class_names": list(self.class_names),
            "image_size": self.image_size, "data": self.data}

  @classmethod
  def from_json(cls, info: dict[str, Any]) -> ModelInfo:
    return cls(Variant.from_json(info), int(info["num_classes"]), tuple(info["class_names"]),
               int(info["image_size"]), info.get("data", ""))

  def conflicts(self, other: ModelInfo) -> str:
    """'' when `other` may resume this workdir; else what differs (architecture, classes, their order)."""
    if self.variant.architecture != other.variant.architecture:
      return f"it holds a {self.variant.describe()}, the config asks for a {other.variant.describe()}"
    if self.num_classes != other.num_classes:
      return f"it holds a {self.num_classes}-class head, the data has {other.num_classes} classes"
    if self.class_names != other.class_names:
      first = next(i for i, (a, b) in enumerate(zip(self.class_names, other.class_names)) if a != b)
      return (f"its label {first} is {self.class_names[first]!r}, the data's is {other.class_names[first]!r} "
              "(other classes or another label order)")
    return ""


def data_fingerprint(source: str, name: str, num_train: int, num_eval: int,
                     class_names: Sequence[str]) -> str:
  """'folder /data/imagenet: 1281167 train / 50000 eval, classes sha1 1a2b3c4d'."""
  digest = hashlib.sha1("\n".join(class_names).encode()).hexdigest()[:8]
  return f"{source} {name}: {num_train} train / {num_eval} eval, classes sha1 {digest}"


def read_model_info(workdir: str | epath.PathLike) -> ModelInfo | None:
  """The workdir's `model_info.json`, or None when it has none."""
  path = epath.Path(workdir) / MODEL_INFO
  if not path.exists():
    return None
  try:
    return ModelInfo.from_json(json.loads(path.read_text()))
  except (ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f"{path} is unreadable ({type(e).__name__}: {e}); move it away to train anew") from e


def write_model_info(workdir: str | epath.PathLike, info: ModelInfo) -> None:
  """Writes `model_info.json` atomically (a local temp file renamed; an object-store write is atomic)."""
  write_atomically(epath.Path(workdir) / MODEL_INFO, json.dumps(info.to_json(), indent=1))


def write_atomically(path: epath.Path, text: str | bytes) -> None:
  """Writes `path` so that readers see the old content or the new, never a part."""
  mode = "wb" if isinstance(text, bytes) else "w"
  if not is_local(path):
    with path.open(mode) as f:
      f.write(text)
    return
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  try:
    with tmp.open(mode) as f:
      f.write(text)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def is_local(path: str | epath.PathLike) -> bool:
  """Whether `path` is on a local filesystem (not gs://, s3://, ...)."""
  return "://" not in os.fspath(path)


def check_writable(workdir: str | epath.PathLike) -> None:
  """Fails at start-up, not at the first save, when a local `workdir` cannot be created or written."""
  path = os.fspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise WorkdirError(f"workdir {path} is not writable: {e.strerror or e} ({e.filename or path})") from e


def check_output(path: str, suffix: str | None = None) -> None:
  """Fails before any work if `path` cannot be written as a file (a folder, a read-only or missing parent
  that cannot be made, a wrong suffix). Object-store paths are checked for the suffix and their bucket."""
  if suffix and not path.endswith(suffix):
    raise OutputError(f"output {path}: expected a {suffix} file name")
  if "://" in path:
    scheme, rest = path.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if not epath.Path(bucket).exists():
      raise OutputError(f"output {path}: bucket {bucket} does not exist (or cannot be reached with these "
                        "credentials)")
    return
  if os.path.isdir(path):
    raise OutputError(f"output {path} is a folder; give a file name")
  parent = os.path.dirname(os.path.abspath(path))
  existing = parent
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise OutputError(f"output {path}: {existing} is not a folder")
  try:  # a real write: permissions, read-only mounts and quotas all count
    with tempfile.TemporaryFile(dir=existing):
      pass
    if os.path.exists(path):
      with open(path, "ab"):
        pass
  except OSError as e:
    raise OutputError(f"output {path}: {e.filename or existing} is not writable ({e.strerror})") from None


def check_resumable(workdir: str | epath.PathLike, wanted: ModelInfo) -> ModelInfo | None:
  """The stored `ModelInfo` if `wanted` may train in `workdir`; raises `WorkdirError` naming the conflict."""
  stored = read_model_info(workdir)
  if stored is None:
    return None
  conflict = stored.conflicts(wanted)
  if conflict:
    raise WorkdirError(f"workdir {workdir} belongs to another run: {conflict}. Resume it with its own "
                       "config, or train in a new --workdir.")
  return stored


class Lock:
  """An exclusive lock on a local workdir for the life of one run (`with Lock(workdir): ...`)."""

  def __init__(self, workdir: str | epath.PathLike):
    self._path = os.path.realpath(os.path.join(os.fspath(workdir), LOCK))
    self._file = None

  def __enter__(self) -> Lock:
    file = open(self._path, "a+")
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = file.read().strip() or "another process"
      file.close()
      raise WorkdirError(f"workdir {os.path.dirname(self._path)} is in use by {holder}; wait for it to "
                         "finish or stop it first (a killed run releases it at once)") from None
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    file.flush()
    self._file = file
    return self

  def __exit__(self, *exc) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None


def _written_by_runs(name: str) -> bool:
  return name in RUN_ENTRIES or any(fnmatch.fnmatch(name, p) for p in RUN_FILE_PATTERNS)


def check_removable(workdir: str | epath.PathLike) -> None:
  """Raises `WorkdirError` unless `workdir` is absent or holds only what cvt_jax runs write."""
  path = epath.Path(workdir)
  if not path.exists():
    return
  if not path.is_dir():
    raise WorkdirError(f"refusing to delete {path}: it is not a folder, let alone a cvt_jax workdir")
  foreign = sorted(e.name for e in path.iterdir() if not _written_by_runs(e.name))
  if foreign:
    raise WorkdirError(f"refusing to delete {path}: it does not look like a cvt_jax workdir (it holds "
                       f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})")


def remove_run(workdir: str | epath.PathLike) -> None:
  """Deletes what cvt_jax runs wrote into `workdir` (`--fresh`); refuses, deleting nothing, on anything else.

  Raises:
    WorkdirError: `workdir` holds files that no cvt_jax run writes.
  """
  check_removable(workdir)
  path = epath.Path(workdir)
  if not path.exists():
    return
  for entry in path.iterdir():
    if entry.name == LOCK:  # held by the caller; a new inode would let a second run in
      continue
    if entry.is_dir():
      entry.rmtree()
    else:
      entry.unlink()
