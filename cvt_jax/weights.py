"""The project's converted-weights format, and one loader for every supported checkpoint file.

A converted file is a single uncompressed `.npz`: one array per variable under flat keys
`params/stages_0/patch_embed/proj/kernel`, `batch_stats/.../bn/mean`, ... (the Flax tree of `model.py`
joined with '/'), plus `__meta__`, a JSON string with the architecture, the class count and the source file.

  loaded = load_weights("cvt-13-224.npz")       # or a .pth / pytorch_model.bin / .safetensors directly
  model = model_for(loaded)                      # CvT with the checkpoint's variant and head size
  logits = model.apply(loaded.variables, images)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cvt_jax.model import VARIANTS, CvT, Variant, make_variant

FORMAT = "cvt_jax.weights/1"
_META_KEY = "__meta__"
# Suffixes `load_weights` converts on the fly; everything else must be a converted `.npz`.
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (".safetensors",)

Shape = tuple[int, ...]


class WeightsError(ValueError):
  """A weights file that does not fit the model it describes, or cannot be read."""


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
  """Model variables with the architecture they belong to.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...}, nested dicts of float32 numpy arrays in the tree
      layout of `CvT` (pass them straight to `model.apply`, or `jax.device_put` them with a sharding).
    variant: the architecture; a named one ('cvt-13', 'cvt-21', 'cvt-w24') when it matches the table.
    num_classes: rows of the classification head; 0 when the checkpoint has no head.
    source: the file the weights came from (for messages and provenance).
  """

  variables: dict[str, Any]
  variant: Variant
  num_classes: int
  source: str = ""

  @property
  def num_params(self) -> int:
    """Number of trainable parameters (batch statistics excluded)."""
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.variables["params"]))


def model_for(loaded: LoadedWeights, **model_kwargs: Any) -> CvT:
  """The `CvT` that `loaded.variables` belong to; kwargs (dtype, depthwise_impl, ...) go to the model."""
  return CvT.from_variant(loaded.variant, num_classes=loaded.num_classes, **model_kwargs)


@functools.lru_cache(maxsize=16)
def variable_shapes(variant: Variant, num_classes: int) -> dict[str, Shape]:
  """Flat 'collection/module/.../leaf' -> shape of every variable of the model, without allocating it."""
  model = CvT.from_variant(variant, num_classes=num_classes)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)  # shapes do not depend on the resolution
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def flatten(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'params': {'a': {'b': x}}} -> {'params/a/b': x} as numpy arrays."""
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(variables)).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_shapes(flat: Mapping[str, np.ndarray], variant: Variant, num_classes: int, where: str) -> None:
  """Raises WeightsError listing missing, unexpected and mis-shaped variables, if any."""
  expected = variable_shapes(variant, num_classes)
  problems = [f"  missing    {k} {expected[k]}" for k in sorted(expected.keys() - flat.keys())]
  problems += [f"  unexpected {k} {tuple(flat[k].shape)}" for k in sorted(flat.keys() - expected.keys())]
  problems += [f"  mis-shaped {k}: {tuple(flat[k].shape)}, model expects {expected[k]}"
               for k in sorted(flat.keys() & expected.keys()) if tuple(flat[k].shape) != expected[k]]
  if problems:
    raise WeightsError(f"{where}: variables do not fit {describe(variant)} with {num_classes} classes:\n"
                       + "\n".join(problems))


def architecture(variant: Variant) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(dims, depths, heads) per stage."""
  return tuple(tuple(getattr(s, a) for s in variant.stages) for a in ("dim", "depth", "heads"))


def describe(variant: Variant) -> str:
  """'cvt-13 (dims (64, 192, 384), depths (1, 2, 10), heads (1, 3, 6))'."""
  dims, depths, heads = architecture(variant)
  return f"{variant.name} (dims {dims}, depths {depths}, heads {heads})"


def variant_from(name: str, dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...],
                 drop_path_rate: float = 0.1) -> Variant:
  """The named variant with this architecture if there is one, else a custom `make_variant`."""
  arch = (tuple(dims), tuple(depths), tuple(heads))
  for variant in VARIANTS.values():
    if architecture(variant) == arch:
      return variant
  return make_variant(name, tuple(dims), tuple(depths), tuple(heads), drop_path_rate)


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], variant: Variant, num_classes: int,
                   source: str = "") -> None:
  """Writes variables + metadata to `path` (.npz) atomically: a temp file renamed into place.

  Raises:
    WeightsError: if the variables do not fit `variant` with `num_classes` (nothing is written).
  """
  path = os.fspath(path)
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(variables).items()}
  check_shapes(flat, variant, num_classes, where=f"save_variables({path!r})")
  dims, depths, heads = architecture(variant)
  meta = {"format": FORMAT, "variant": variant.name, "dims": dims, "depths": depths, "heads": heads,
          "drop_path_rate": variant.stages[-1].drop_path_rate, "num_classes": num_classes, "source": source}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat, **{_META_KEY: np.array(json.dumps(meta))})
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load_npz(path: str | os.PathLike) -> LoadedWeights:
  """Reads a file written by `save_variables`, checking every variable against the model's shapes."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as npz:
      flat = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise WeightsError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from None
  if _META_KEY not in flat:
    raise WeightsError(f"{path}: no '{_META_KEY}' entry; not a cvt_jax weights file "
                       "(convert checkpoints with `python -m cvt_jax.convert SRC DST`)")
  meta = json.loads(str(flat.pop(_META_KEY)))
  if meta.get("format") != FORMAT:
    raise WeightsError(f"{path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
  variant = variant_from(meta["variant"], meta["dims"], meta["depths"], meta["heads"], meta["drop_path_rate"])
  check_shapes(flat, variant, meta["num_classes"], where=path)
  return LoadedWeights(unflatten(flat), variant, meta["num_classes"], meta.get("source", ""))


def load_weights(path: str | os.PathLike, heads: tuple[int, int, int] | None = None) -> LoadedWeights:
  """Loads a converted `.npz`, or converts a PyTorch checkpoint (.pth/.pt/.bin/.ckpt/.safetensors) on the fly.

  Args:
    path: the weights file.
    heads: attention heads per stage, only needed for a checkpoint of a custom architecture whose widths
      are not multiples of 64 (heads cannot be read off the tensors; named variants are recognised).
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    return load_npz(path)
  if path.endswith(CHECKPOINT_SUFFIXES):
    from cvt_jax import convert  # convert imports this module

    return convert.convert_file(path, heads=heads)
  raise WeightsError(f"{path}: unknown weights format; expected .npz (converted) or one of "
                     f"{', '.join(CHECKPOINT_SUFFIXES)}")
