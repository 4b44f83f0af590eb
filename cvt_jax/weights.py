"""Every checkpoint the project reads, as one type: `weights.load(source)` -> `Checkpoint`.

  ckpt = weights.load("out/cvt13")                   # a training workdir: its newest intact step
  ckpt = weights.load("cvt13_224.npz")               # converted weights (`cvt-jax convert`)
  ckpt = weights.load("CvT-13-224x224-IN-1k.pth")    # PyTorch .pth/.pt/.bin/.ckpt/.safetensors, on the fly
  ckpt = weights.load("microsoft/cvt-13")            # the Hugging Face hub (its local cache when there)
  logits = ckpt.model().apply(ckpt.variables, images)

Paths may be local or on an object store (`gs://bucket/...`). The converted format is one uncompressed
`.npz`: an array per variable under flat keys (`params/stages_0/patch_embed/proj/kernel`, the Flax tree of
`model.py` joined with '/'), plus `__meta__`, a JSON string with the architecture, the class count and the
source; the class names, when known, lie beside it in `<name>.classes.txt`. `cvt-jax convert` writes it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
import urllib.parse
import zipfile
from typing import Any, Callable, Sequence

import huggingface_hub
import numpy as np
from etils import epath
from huggingface_hub import errors as hub_errors

from cvt_jax import checkpointing
from cvt_jax import torch_weights
from cvt_jax import trees
from cvt_jax import workdir as workdir_lib
from cvt_jax.data import labels
from cvt_jax.model import CvT
from cvt_jax.model import Variant
from cvt_jax.model import blocks_layout
from cvt_jax.model import is_scanned
from cvt_jax.model import variable_shapes

FORMAT = "cvt_jax.weights/1"
_META_KEY = "__meta__"
_CLASSES_SUFFIX = ".classes.txt"
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsError(ValueError):
  """A weights file that cannot be read, or does not fit the model it describes."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Inference variables with what is known about them.

  Attributes:
    variables: {'params', 'batch_stats'} as float32 numpy arrays in the tree layout of `CvT`.
    variant: the architecture.
    num_classes: rows of the head (0: no head).
    class_names: label order of the head when the checkpoint stores it (workdirs, their exports), else None.
    image_size: the training resolution when known (workdirs and .npz files converted from them), else None.
    source: where it was loaded from.
    step: the training step of a workdir checkpoint (and of an .npz converted from one), else None.
  """

  variables: dict[str, Any]
  variant: Variant
  num_classes: int
  class_names: tuple[str, ...] | None = None
  image_size: int | None = None
  source: str = ""
  step: int | None = None

  def model(self, **kwargs: Any) -> CvT:
    """The `CvT` these variables belong to; kwargs (dtype, kernels, remat) go to the model."""
    return CvT.from_variant(self.variant, num_classes=self.num_classes, **kwargs)

  @property
  def num_params(self) -> int:
    """Trainable parameters (batch statistics excluded)."""
    return trees.size(self.variables["params"])

  def without_head(self) -> Checkpoint:
    """The backbone only: fine-tuning from it always starts from a fresh head."""
    params = {k: v for k, v in self.variables["params"].items() if k != "head"}
    return dataclasses.replace(self, variables={**self.variables, "params": params}, num_classes=0,
                               class_names=None)


def load(source: str | epath.PathLike, variant: Variant | None = None,
         heads: Sequence[int] | None = None) -> Checkpoint:
  """Loads a workdir, a converted `.npz`, a PyTorch file or a Hugging Face hub name (see the module doc).

  Args:
    source: the checkpoint.
    variant: architecture of a workdir without `model_info.json` (e.g. the config's).
    heads: attention heads per stage of a custom-width PyTorch checkpoint (widths not multiples of 64).

  Raises:
    FileNotFoundError: no such checkpoint, or a workdir without a committed step.
    ValueError (WeightsError, ConversionError, TreeMismatchError): unreadable, or not a CvT.
  """
  path = epath.Path(source)
  if path.is_dir():
    return _load_workdir(path, variant)
  if path.exists():
    return _load_file(path, heads)
  if is_hub_name(source):
    return _load_hub(str(source), heads)
  raise FileNotFoundError(f"checkpoint {source} does not exist (expected a training workdir, a converted "
                          f".npz, a PyTorch {'/'.join(torch_weights.SUFFIXES)} file or a Hugging Face hub "
                          "name)")


def is_hub_name(source: str | epath.PathLike) -> bool:
  """Whether `source` reads as a hub repository id ('microsoft/cvt-13') rather than a file name."""
  return bool(_HUB_NAME.fullmatch(str(source))) and not epath.Path(source).suffix


def _load_file(path: epath.Path, heads: Sequence[int] | None) -> Checkpoint:
  if path.name.endswith(".npz"):
    checkpoint = _load_npz(path)
  elif path.name.endswith(torch_weights.SUFFIXES):
    checkpoint = Checkpoint(*torch_weights.convert_file(path, heads=heads), source=str(path))
  else:
    raise WeightsError(f"{path}: unknown weights format; expected .npz (converted) or one of "
                       f"{', '.join(torch_weights.SUFFIXES)}")
  return dataclasses.replace(checkpoint, class_names=_read_classes(path))


def _load_npz(path: epath.Path) -> Checkpoint:
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
      flat = {k: npz[k] for k in npz.files}
  except ValueError:  # numpy took it for a pickle, and its advice is to load it unsafely: never
    raise WeightsError(f"{path}: unreadable weights file (not a NumPy .npz archive)") from None
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise WeightsError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from None
  if _META_KEY not in flat:
    raise WeightsError(f"{path}: no '{_META_KEY}' entry; not a cvt_jax weights file "
                       "(convert checkpoints with `cvt-jax convert SRC DST.npz`)")
  meta = json.loads(str(flat.pop(_META_KEY)))
  if meta.get("format") != FORMAT:
    raise WeightsError(f"{path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
  variant = Variant.from_json(meta)
  trees.check(variable_shapes(variant, meta["num_classes"]), trees.shapes(flat),
              f"{path} does not fit {variant.describe()} with {meta['num_classes']} classes")
  return Checkpoint(trees.unflatten(flat), variant, meta["num_classes"], image_size=meta.get("image_size"),
                    source=str(path), step=meta.get("step"))


def _load_workdir(path: epath.Path, variant: Variant | None) -> Checkpoint:
  info = workdir_lib.read_model_info(path)
  step, variables = checkpointing.read_variables(path)
  if info is None and variant is None:
    raise WeightsError(f"workdir {path} has no {workdir_lib.MODEL_INFO}; pass its architecture (--config)")
  variant = info.variant if info else variant
  # A run with model.scan_blocks saves stacked blocks; every Checkpoint holds them one module each.
  variables = trees.unflatten(blocks_layout(trees.flatten(variables), scanned=False))
  params = variables["params"]
  num_classes = int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 0
  trees.check(variable_shapes(variant, num_classes), trees.shapes(trees.flatten(variables)),
              f"{path} step {step} does not fit {variant.describe()} with {num_classes} classes")
  return Checkpoint(variables, variant, num_classes, info.class_names if info else None,
                    info.image_size if info else None, str(path), step)


def _load_hub(name: str, heads: Sequence[int] | None) -> Checkpoint:
  """The weights of a hub repo: from the local cache when they are there, else downloaded (unless offline)."""
  for local_only in (True, False):  # every cached file before any download
    if not local_only:
      _check_hub_reachable(name)
    for filename in _HUB_FILES:
      try:
        file = huggingface_hub.hf_hub_download(name, filename, local_files_only=local_only)
      except (hub_errors.LocalEntryNotFoundError, hub_errors.EntryNotFoundError):
        continue  # not cached / offline, or not in the repo: the next file name
      except hub_errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{name}: no such Hugging Face hub repository") from None
      checkpoint = _load_file(epath.Path(file), heads)
      return dataclasses.replace(checkpoint, source=f"{name} ({filename})")
  raise FileNotFoundError(f"{name}: no {' or '.join(_HUB_FILES)} in the Hugging Face hub cache "
                          "(and none could be downloaded)")


def _check_hub_reachable(name: str) -> None:
  """Fails at once, instead of after a minute of retries, when the hub's host does not even resolve."""
  host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname
  if huggingface_hub.constants.HF_HUB_OFFLINE:
    raise FileNotFoundError(f"{name}: not in the Hugging Face hub cache, and HF_HUB_OFFLINE is set")
  try:
    socket.getaddrinfo(host, 443)
  except OSError as e:
    raise FileNotFoundError(f"{name}: not in the Hugging Face hub cache, and {host} cannot be reached ({e}): "
                            "download its model.safetensors (or pytorch_model.bin) and pass the file") from None


def save(checkpoint: Checkpoint, path: str | epath.PathLike) -> None:
  """Writes `checkpoint` as a converted `.npz` (and its class names to `<name>.classes.txt`), atomically.

  Raises:
    WeightsError: `path` does not end in .npz, or the variables do not fit the variant (nothing written).
  """
  path = epath.Path(path)
  if not path.name.endswith(".npz"):
    raise WeightsError(f"{path}: converted weights are .npz files; name the output <something>.npz")
  flat = {k: np.asarray(v, np.float32) for k, v in trees.flatten(checkpoint.variables).items()}
  trees.check(variable_shapes(checkpoint.variant, checkpoint.num_classes), trees.shapes(flat),
              f"{path}: the variables do not fit {checkpoint.variant.describe()}")
  meta = {"format": FORMAT, **checkpoint.variant.to_json(), "num_classes": checkpoint.num_classes,
          "image_size": checkpoint.image_size, "step": checkpoint.step, "source": checkpoint.source}
  buffer = io.BytesIO()
  np.savez(buffer, **flat, **{_META_KEY: np.array(json.dumps(meta))})
  path.parent.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_atomically(path, buffer.getvalue())
  if checkpoint.class_names and checkpoint.num_classes:
    workdir_lib.write_atomically(_classes_path(path), "".join(f"{n}\n" for n in checkpoint.class_names))


def check_architecture(checkpoint: Checkpoint, variant: Variant, what: str) -> None:
  """Raises `WeightsError` unless `checkpoint` holds the architecture `variant` (`what`: for the message)."""
  if checkpoint.variant.architecture != variant.architecture:
    raise WeightsError(f"{what} {checkpoint.source} holds a {checkpoint.variant.describe()} but the "
                       f"config trains a {variant.describe()} (model.variant / dims / depths / heads)")


def init_from(checkpoint: Checkpoint, target: dict[str, Any], variant: Variant,
              num_classes: int, log: Callable[[str], None] = print) -> dict[str, Any]:
  """`target` (fresh variables of the model to train) with every array taken from `checkpoint`, strictly.

  A checkpoint with another class count (or none) keeps the target's fresh head.

  Raises:
    WeightsError: another architecture. TreeMismatchError: arrays that do not fit, each named.
  """
  check_architecture(checkpoint, variant, "init_from")
  replace_head = checkpoint.num_classes != num_classes
  if replace_head:
    log(f"init_from: the {checkpoint.num_classes}-class head of {checkpoint.source} is replaced by a fresh "
        f"{num_classes}-class head.")
  is_head = lambda key: replace_head and key.startswith("params/head/")
  loaded = blocks_layout(trees.flatten(checkpoint.variables), scanned=is_scanned(trees.flatten(target)))
  return trees.merge(target, loaded, f"init_from {checkpoint.source}", keep_target=is_head)


def _classes_path(weights_path: epath.Path) -> epath.Path:
  return weights_path.parent / (weights_path.name.rsplit(".", 1)[0] + _CLASSES_SUFFIX)


def _read_classes(weights_path: epath.Path) -> tuple[str, ...] | None:
  sidecar = _classes_path(weights_path)
  return labels.read_labels(sidecar) if sidecar.exists() else None
