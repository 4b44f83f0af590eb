"""Any checkpoint the project holds, for inference: an orbax workdir, a converted `.npz`, a PyTorch file.

  ckpt = pretrained.load("out/cvt13")                      # latest step of a training workdir
  ckpt = pretrained.load("cvt13_224.npz")                  # converted weights
  ckpt = pretrained.load("CvT-13-224x224-IN-1k.pth")       # PyTorch, converted on the fly
  logits = ckpt.model().apply(ckpt.variables, images)

A workdir carries `model_info.json` (architecture, class names and resolution; `train_lib` writes it when a
run starts), so it is self-describing. `export` turns its latest step into a converted `.npz` (the format
`init_from` and every command read), with the class names beside it in `<name>.classes.txt`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from cvt_jax import model as model_lib
from cvt_jax import weights

MODEL_INFO = "model_info.json"
_CLASSES_SUFFIX = ".classes.txt"
_IMAGENET_TSV = os.path.join(os.path.dirname(__file__), "imagenet_classes.tsv")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Inference variables with what is known about them.

  Attributes:
    variables: {'params', 'batch_stats'} as numpy arrays in the tree layout of `CvT`.
    variant: the architecture.
    num_classes: rows of the head (0: no head).
    class_names: label order of the head when the checkpoint stores it (fine-tuned runs), else None.
    image_size: the training resolution when known (workdirs), else None.
    source: the path it was loaded from.
    step: the training step of a workdir checkpoint, else None.
  """

  variables: dict[str, Any]
  variant: model_lib.Variant
  num_classes: int
  class_names: tuple[str, ...] | None
  image_size: int | None
  source: str
  step: int | None = None

  def model(self, **kwargs: Any) -> model_lib.CvT:
    """The `CvT` these variables belong to; kwargs (dtype, depthwise_impl) go to the model."""
    return model_lib.CvT.from_variant(self.variant, num_classes=self.num_classes, **kwargs)


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """The 1000 ImageNet-1k classes in label order: (WNID, human-readable name)."""
  with open(_IMAGENET_TSV) as f:
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
  return tuple((wnid, name) for wnid, name in rows)


def write_model_info(workdir: str | os.PathLike, variant: str | model_lib.Variant, num_classes: int,
                     class_names: Sequence[str], image_size: int) -> None:
  """Records the architecture, label order and resolution of a training run in `<workdir>/model_info.json`."""
  variant = model_lib.get_variant(variant)
  dims, depths, heads = weights.architecture(variant)
  info = {"variant": variant.name, "dims": dims, "depths": depths, "heads": heads,
          "drop_path_rate": variant.stages[-1].drop_path_rate, "num_classes": num_classes,
          "class_names": list(class_names), "image_size": image_size}
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MODEL_INFO)
  with open(path + ".tmp", "w") as f:
    json.dump(info, f, indent=1)
  os.replace(path + ".tmp", path)


def load(path: str | os.PathLike, variant: str | model_lib.Variant | None = None,
         heads: tuple[int, int, int] | None = None) -> Checkpoint:
  """Loads a workdir (latest step), a converted `.npz` or a PyTorch `.pth`/`.bin`/`.safetensors` file.

  Args:
    path: the checkpoint.
    variant: architecture of a workdir without `model_info.json` (e.g. the config's `model.variant`).
    heads: attention heads per stage of a custom-width PyTorch checkpoint (see `weights.load_weights`).

  Raises:
    FileNotFoundError: no such path, or a workdir without a committed checkpoint.
    ValueError: a file that is not a CvT checkpoint, or variables that do not fit the architecture.
  """
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    return _load_workdir(path, variant)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist (expected a training workdir, a converted "
                            f".npz or a PyTorch {'/'.join(weights.CHECKPOINT_SUFFIXES)} file)")
  loaded = weights.load_weights(path, heads=heads)
  return Checkpoint(loaded.variables, loaded.variant, loaded.num_classes, _read_classes(path),
                    None, path)


def export(checkpoint: Checkpoint, path: str | os.PathLike, include_head: bool = True) -> None:
  """Writes `checkpoint` as a converted `.npz` (and its class names to `<name>.classes.txt`).

  Without the head (`include_head=False`), fine-tuning from the file always starts from a fresh head, even
  on a dataset with as many classes as the checkpoint's (`init_from` keeps a head of the right size).
  """
  path = os.fspath(path)
  if not path.endswith(".npz"):
    raise ValueError(f"export path {path!r} must end in .npz")
  variables, num_classes = checkpoint.variables, checkpoint.num_classes
  if not include_head:
    variables = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "head"}}
    num_classes = 0
  weights.save_variables(path, variables, checkpoint.variant, num_classes, source=checkpoint.source)
  if checkpoint.class_names and include_head:
    with open(_classes_path(path), "w") as f:
      f.write("".join(f"{name}\n" for name in checkpoint.class_names))


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
  """Class names, one per line in label order (blank lines and '#' comments ignored)."""
  with open(path) as f:
    return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))


def _classes_path(weights_path: str) -> str:
  return os.path.splitext(weights_path)[0] + _CLASSES_SUFFIX


def _read_classes(weights_path: str) -> tuple[str, ...] | None:
  sidecar = _classes_path(weights_path)
  return read_labels(sidecar) if os.path.isfile(sidecar) else None


def _load_workdir(workdir: str, variant: str | model_lib.Variant | None) -> Checkpoint:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir!r} is a directory without checkpoints/: not a training workdir")
  info_path = os.path.join(workdir, MODEL_INFO)
  info = None
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
    variant = weights.variant_from(info["variant"], info["dims"], info["depths"], info["heads"],
                                   info["drop_path_rate"])
  elif variant is None:
    raise ValueError(f"workdir {workdir!r} has no {MODEL_INFO}; pass its architecture (--config)")
  variant = model_lib.get_variant(variant)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"workdir {workdir!r} holds no committed checkpoint in {directory}")
    # Untargeted: restores the saved tree (TrainState fields as dict keys) onto the default device.
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  variables = jax.device_get({"params": restored["params"], "batch_stats": restored["batch_stats"]})
  variables = jax.tree.map(np.asarray, variables)
  num_classes = int(variables["params"]["head"]["kernel"].shape[-1]) if "head" in variables["params"] else 0
  weights.check_shapes(weights.flatten(variables), variant, num_classes,
                       where=f"{directory} step {step}")
  class_names = tuple(info["class_names"]) if info else None
  image_size = int(info["image_size"]) if info else None
  return Checkpoint(variables, variant, num_classes, class_names, image_size, workdir, step)
