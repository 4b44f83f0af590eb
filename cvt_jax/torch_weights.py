"""PyTorch CvT checkpoints (official microsoft/CvT or Hugging Face layout) -> Flax variables, without torch.

Reading needs neither PyTorch nor transformers (`.pth`/`.bin` via `cvt_jax.pth`, safetensors via its numpy
API). Conversion is a renaming to the official key names, then a strict mapping onto the Flax tree of
`model.py`: every source tensor is used exactly once, every model variable is filled, every shape checked.
`cvt_jax.weights.load` calls this for PyTorch files; `cvt-jax convert` writes the result as `.npz`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from cvt_jax import pth
from cvt_jax import trees
from cvt_jax.model import VARIANTS
from cvt_jax.model import Variant
from cvt_jax.model import variable_shapes
from cvt_jax.model import variant_from_architecture

# Suffixes of the PyTorch files this module reads (torch.save archives and safetensors).
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = TORCH_SUFFIXES + (".safetensors",)


class ConversionError(ValueError):
  """A checkpoint that cannot be read, or does not map one-to-one onto a CvT."""


class Converted(NamedTuple):
  """Flax variables ({'params', 'batch_stats'} of float32 numpy arrays) with their architecture."""

  variables: dict[str, Any]
  variant: Variant
  num_classes: int


_QKV = {"query": "q", "key": "k", "value": "v"}
_HF_CONV_PROJ = "attention.attention.convolution_projection_{}.convolution_projection"
# Hugging Face module paths (inside `encoder.stages.{s}.layers.{b}.`) -> official ones.
_HF_BLOCK_MODULES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    **{_HF_CONV_PROJ.format(hf) + ".convolution": f"attn.conv_proj_{x}.conv" for hf, x in _QKV.items()},
    **{_HF_CONV_PROJ.format(hf) + ".normalization": f"attn.conv_proj_{x}.bn" for hf, x in _QKV.items()},
    **{f"attention.attention.projection_{hf}": f"attn.proj_{x}" for hf, x in _QKV.items()},
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# ... inside `encoder.stages.{s}.`, and at the top level.
_HF_STAGE_MODULES = {
    "embedding.convolution_embeddings.projection": "patch_embed.proj",
    "embedding.convolution_embeddings.normalization": "patch_embed.norm",
}
_HF_TOP_MODULES = {"layernorm": "norm", "classifier": "head"}

_NORMS = ("norm", "norm1", "norm2", "bn")
_DROPPED = "num_batches_tracked"  # BatchNorm's step counter: no Flax counterpart, used by nobody in eval


def is_hf_layout(state_dict: Mapping[str, np.ndarray]) -> bool:
  """Whether the keys follow transformers' `CvtForImageClassification` / `CvtModel` naming."""
  return any(k.startswith(("cvt.encoder.", "encoder.stages.")) for k in state_dict)


def _hf_to_official(key: str) -> str:
  """One Hugging Face key -> its official name; an unknown key comes back unchanged (reported unused)."""
  name = key[len("cvt."):] if key.startswith("cvt.") else key
  module, _, leaf = name.rpartition(".")
  if m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", module):
    if m[3] in _HF_BLOCK_MODULES:
      return f"stage{m[1]}.blocks.{m[2]}.{_HF_BLOCK_MODULES[m[3]]}.{leaf}"
  elif m := re.fullmatch(r"encoder\.stages\.(\d+)(?:\.(.+))?", module):
    if m[2] is None and leaf == "cls_token":
      return f"stage{m[1]}.cls_token"
    if m[2] in _HF_STAGE_MODULES:
      return f"stage{m[1]}.{_HF_STAGE_MODULES[m[2]]}.{leaf}"
  elif module in _HF_TOP_MODULES:
    return f"{_HF_TOP_MODULES[module]}.{leaf}"
  return key


def to_official_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
  """official key -> (source key, tensor). Official-layout dicts map onto themselves.

  Raises:
    ConversionError: if two source keys land on the same name (e.g. with and without the `cvt.` prefix).
  """
  rename = _hf_to_official if is_hf_layout(state_dict) else (lambda k: k)
  out: dict[str, tuple[str, np.ndarray]] = {}
  clashes = []
  for key, value in state_dict.items():
    name = rename(key)
    if name in out:
      clashes.append(f"{out[name][0]} and {key} both give {name}")
    out[name] = (key, value)
  if clashes:
    raise ConversionError(f"source tensors used more than once: {'; '.join(clashes)}")
  return out


def _flax_key(official: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  """Official key -> ('collection/path/leaf', layout transform); None for keys with no model variable."""
  path = re.sub(r"^stage(\d+)\.(?:blocks\.(\d+)\.)?",
                lambda m: f"stages_{m[1]}." + (f"blocks_{m[2]}." if m[2] else ""), official)
  module, _, leaf = path.rpartition(".")
  prefix = module.replace(".", "/") + "/" if module else ""
  if leaf == "running_mean":
    return f"batch_stats/{prefix}mean", np.asarray
  if leaf == "running_var":
    return f"batch_stats/{prefix}var", np.asarray
  if leaf == "bias" or (leaf == "cls_token" and not module.count(".")):
    return f"params/{prefix}{leaf}", np.asarray
  if leaf == "weight" and module.rpartition(".")[2] in _NORMS:
    return f"params/{prefix}scale", np.asarray
  if leaf == "weight":
    return f"params/{prefix}kernel", _to_flax_kernel
  return None


def _to_flax_kernel(w: np.ndarray) -> np.ndarray:
  """Conv OIHW -> HWIO (depthwise (C,1,3,3) -> (3,3,1,C) alike); Linear (out, in) -> (in, out)."""
  if w.ndim == 4:
    return w.transpose(2, 3, 1, 0)
  if w.ndim == 2:
    return w.T
  return w  # a wrong rank is reported by the shape check


def detect_architecture(shapes: Mapping[str, tuple[int, ...]], heads: Sequence[int] | None = None,
                        ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
  """(dims, depths, heads, num_classes) from the shapes of official-named tensors.

  Widths come from the patch embeddings, depths from the block indices, the class count from the head
  (0 without one). Heads are not visible in any tensor: they come from `heads`, else from the table of
  named variants, else from the official head width 64.
  """
  stage_keys = [f"stage{s}.patch_embed.proj.weight" for s in range(3)]
  missing = [k for k in stage_keys if k not in shapes]
  if missing:
    raise ConversionError(f"cannot detect the architecture: no {', '.join(missing)}; "
                          f"this does not look like a CvT checkpoint (keys: {sorted(shapes)[:6]} ...)")
  bad = {k: shapes[k] for k in stage_keys + ["head.weight"] if k in shapes and len(shapes[k]) < 2}
  if bad:
    raise ConversionError(f"cannot detect the architecture from tensors of shapes {bad}")
  dims = tuple(shapes[k][0] for k in stage_keys)
  depths = tuple(len({m[1] for k in shapes if (m := re.match(rf"stage{s}\.blocks\.(\d+)\.", k))})
                 for s in range(3))
  if heads is None:
    named = [v for v in VARIANTS.values() if v.architecture[:2] == (dims, depths)]
    if named:
      heads = named[0].architecture[2]
    elif any(d % 64 for d in dims):
      raise ConversionError(f"widths {dims} match no named variant and are not multiples of the official "
                            "head width 64: pass the heads per stage (--heads 1,2,3 / heads=(1, 2, 3))")
    else:
      heads = tuple(d // 64 for d in dims)
  num_classes = shapes["head.weight"][0] if "head.weight" in shapes else 0
  return dims, depths, tuple(heads), num_classes


def convert_state_dict(state_dict: Mapping[str, np.ndarray], heads: Sequence[int] | None = None,
                       source: str = "state dict") -> Converted:
  """Official- or Hugging-Face-layout tensors -> Flax variables of the detected architecture.

  Args:
    state_dict: name -> array, e.g. from `read_state_dict`.
    heads: attention heads per stage, for custom widths that are not multiples of 64.
    source: where the tensors came from, for messages.

  Raises:
    ConversionError: one line naming every unused, missing and mis-shaped tensor.
  """
  try:
    official = to_official_keys(state_dict)
    dims, depths, heads, num_classes = detect_architecture(
        {k: np.shape(v) for k, (_, v) in official.items()}, heads)
  except ConversionError as e:
    raise ConversionError(f"{source}: {e}") from None
  if len(heads) != 3 or any(h <= 0 or d % h for d, h in zip(dims, heads)):
    raise ConversionError(f"{source}: heads {heads} must be 3 positive numbers dividing the widths {dims}")
  variant = variant_from_architecture("custom", dims, depths, heads)
  expected = variable_shapes(variant, num_classes)
  flat = {}
  for name, (key, value) in official.items():
    # BatchNorm's step counter has no Flax counterpart; it is consumed with its BatchNorm.
    target = _flax_key(name[:-len(_DROPPED)] + "running_mean" if name.endswith(_DROPPED) else name)
    if target is None or target[0] not in expected:
      flat[key] = value  # reported as unused under its source name
      continue
    if name.endswith(_DROPPED):
      continue
    flax_key, transform = target
    flat[flax_key] = np.ascontiguousarray(transform(np.asarray(value, np.float32)))
  try:
    trees.check(expected, trees.shapes(flat), f"{source} does not map one-to-one onto {variant.describe()} "
                f"with {num_classes} classes")
  except trees.TreeMismatchError as e:
    raise ConversionError(str(e)) from None
  return Converted(trees.unflatten(flat), variant, num_classes)


def read_state_dict(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """name -> array of a `.safetensors` or torch.save (`.pth`/`.pt`/`.bin`/`.ckpt`) file, without PyTorch."""
  path = epath.Path(path)
  if path.name.endswith(".safetensors"):
    try:
      return safetensors.numpy.load(path.read_bytes())
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise ConversionError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
  if path.name.endswith(TORCH_SUFFIXES):
    try:
      return pth.load_state_dict(path)
    except pth.TorchFileError as e:
      raise ConversionError(str(e)) from None
  raise ConversionError(f"{path}: unknown checkpoint format; expected .safetensors or one of "
                        f"{', '.join(TORCH_SUFFIXES)}")


def _heads_for(path: epath.Path, state_dict: Mapping[str, np.ndarray], heads: Sequence[int] | None,
               ) -> Sequence[int] | None:
  """`heads`, else the `num_heads` of a Hugging Face `config.json` beside an HF-layout checkpoint."""
  config = path.parent / "config.json"
  if heads is not None or not is_hf_layout(state_dict) or not config.exists():
    return heads
  try:
    heads = json.loads(config.read_text()).get("num_heads")
  except (OSError, ValueError, AttributeError) as e:
    raise ConversionError(f"{config}: unreadable Hugging Face config ({e})") from None
  return tuple(heads) if heads else None


def convert_file(path: str | epath.PathLike, heads: Sequence[int] | None = None) -> Converted:
  """Reads and converts one checkpoint; a Hugging Face file takes its heads from a `config.json` beside it."""
  path = epath.Path(path)
  state_dict = read_state_dict(path)
  return convert_state_dict(state_dict, _heads_for(path, state_dict, heads), source=str(path))
