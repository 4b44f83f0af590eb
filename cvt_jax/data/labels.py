"""Class names: the ImageNet-1k label order (`imagenet_classes.tsv`) and label files."""

from __future__ import annotations

import functools

from etils import epath

_IMAGENET_TSV = epath.resource_path("cvt_jax.data") / "imagenet_classes.tsv"


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """The 1000 ImageNet-1k classes in label order (the sorted WNIDs): (WNID, human-readable name)."""
  rows = [line.split("\t") for line in _IMAGENET_TSV.read_text().splitlines()
          if line.strip() and not line.startswith("#")]
  return tuple((wnid, name) for wnid, name in rows)


def read_labels(path: str | epath.PathLike) -> tuple[str, ...]:
  """Class names, one per line in label order (blank lines and '#' comments ignored)."""
  lines = epath.Path(path).read_text().splitlines()
  return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
