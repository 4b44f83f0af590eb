"""Reads `torch.save` checkpoints (`.pth`, `pytorch_model.bin`) into numpy without importing PyTorch.

Since PyTorch 1.6 a `torch.save` file is a zip archive: `<prefix>/data.pkl` pickles the object tree and
every tensor storage lies raw in `<prefix>/data/<key>`. The pickle may only name a tensor rebuild function,
the storage types and `OrderedDict`: a restricted unpickler refuses every other global, so a hostile file
cannot run code. Tensors are rebuilt from (storage, offset, size, stride), which also covers views.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np
from etils import epath

# `torch.<Name>Storage` -> numpy dtype of its elements (byte order from the archive's `byteorder` entry).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),  # widened to float32 below
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# Torch's legacy (pre-1.6, non-zip) format opens with this magic number pickled (protocol 2, LONG1).
_LEGACY_HEADER = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")


class TorchFileError(ValueError):
  """A torch.save file that cannot be read safely (corrupt, truncated, unsupported or untrusted content)."""


class _StorageType:
  """Stands in for `torch.<Name>Storage` in the pickle: only its element dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *unused: Any) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2`: a strided view into a storage, copied to a contiguous array."""
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in (*size, *stride)):
    raise TorchFileError(f"invalid tensor layout: size {size}, stride {stride}, offset {offset}")
  if 0 not in size:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise TorchFileError(
          f"tensor of size {size} (stride {stride}, offset {offset}) overruns its storage of "
          f"{storage.size} elements")
  if size:
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  else:  # as_strided cannot make a 0-d view
    view = storage[offset:offset + 1].reshape(())
  return np.array(view, order="C")


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
  """`torch._utils._rebuild_parameter`: an nn.Parameter is its data."""
  del unused
  return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles tensors, storages and dicts; every other global is refused."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix
    self._storages: dict[str, np.ndarray] = {}
    try:
      order = archive.read(f"{prefix}byteorder").decode().strip()
    except KeyError:
      order = "little"  # files from before torch recorded it are little-endian
    self._byteorder = "<" if order == "little" else ">"

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise TorchFileError(
        f"refusing to unpickle global '{module}.{name}': only tensors, storages and (Ordered)dicts are "
        "allowed in a weights file")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise TorchFileError(f"unsupported persistent id {pid!r} (expected a typed tensor storage)")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise TorchFileError(f"storage '{name}' is missing from the archive") from None
      dtype = storage_type.dtype
      if len(raw) < numel * dtype.itemsize:
        raise TorchFileError(
            f"storage '{name}' holds {len(raw)} bytes, {numel} x {storage_type.name} need "
            f"{numel * dtype.itemsize}")
      array = np.frombuffer(raw, dtype=dtype.newbyteorder(self._byteorder), count=numel).astype(dtype)
      if storage_type.name == "BFloat16Storage":
        # bfloat16 is the upper half of a float32: shift the bits into place.
        array = (array.astype(np.uint32) << 16).view(np.float32)
      self._storages[key] = array
    return self._storages[key]


def _is_legacy_format(f: BinaryIO) -> bool:
  """Whether the file opens with the pickled magic number of torch's pre-1.6 format."""
  f.seek(0)
  return f.read(len(_LEGACY_HEADER)) == _LEGACY_HEADER


def read_pickle(path: str | epath.PathLike) -> Any:
  """Loads the object tree of a zip-format torch.save file; tensors become numpy arrays.

  Raises:
    TorchFileError: naming `path`, if the file is not a readable torch.save archive, is truncated, or
      references anything but tensors, storages and dicts.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise TorchFileError(f"{path}: no such file")
  with path.open("rb") as f:
    return _read_archive(f, path)


def _read_archive(f: BinaryIO, path: epath.Path) -> Any:
  if not zipfile.is_zipfile(f):
    if _is_legacy_format(f):
      raise TorchFileError(
          f"{path}: legacy (pre-PyTorch-1.6, non-zip) torch.save format is not supported; re-save it with "
          "`torch.save(torch.load(src), dst)` on a recent PyTorch, or convert it to safetensors")
    raise TorchFileError(f"{path}: not a torch.save zip archive (truncated or corrupt?)")
  try:
    f.seek(0)
    with zipfile.ZipFile(f) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
      if len(pickles) != 1:
        raise TorchFileError(f"expected one '<prefix>/data.pkl' entry, found {pickles or 'none'}")
      prefix = pickles[0][:-len("data.pkl")]
      return _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix).load()
  except TorchFileError as e:
    raise TorchFileError(f"{path}: {e}") from None
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError, TypeError,
          IndexError, AttributeError, KeyError) as e:
    raise TorchFileError(f"{path}: corrupt or truncated torch.save file ({type(e).__name__}: {e})") from None


def unwrap_state_dict(obj: Any, where: str) -> dict[str, np.ndarray]:
  """Finds the name -> tensor mapping in a checkpoint object and strips a DataParallel `module.` prefix.

  Accepts a plain state dict or one nested under 'state_dict' / 'model' / 'model_state' / 'module'.
  """
  while isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
    if not inner:
      raise TorchFileError(
          f"{where}: holds a dict without tensors or a {'/'.join(_WRAPPER_KEYS)} entry; keys: "
          f"{sorted(map(str, obj))[:10]}")
    obj = obj[inner[0]]
  if not isinstance(obj, dict):
    raise TorchFileError(f"{where}: holds a {type(obj).__name__}, not a state dict of tensors")
  bad = {str(k): type(v).__name__ for k, v in obj.items() if not isinstance(v, np.ndarray)}
  if bad:
    raise TorchFileError(f"{where}: state dict entries that are not tensors: {bad}")
  if obj and all(str(k).startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return {str(k): v for k, v in obj.items()}


def load_state_dict(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """name -> numpy array of a torch.save'd state dict (or a checkpoint dict that wraps one)."""
  return unwrap_state_dict(read_pickle(path), str(path))
