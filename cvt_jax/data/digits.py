"""An offline demo dataset: scikit-learn's digits (1,797 real 8x8 scans, 10 classes) as a JPEG folder tree,
and subsets of such a tree (the fine-tuning demo's tasks)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image

_MARKER = ".complete.json"


def build_digits_tree(root: str | os.PathLike, image_size: int = 64, val_fraction: float = 0.2,
                      seed: int = 0) -> str:
  """Writes `<root>/{train,val}/<digit>/<index>.jpg` (greyscale JPEGs, bicubic upscaled); returns root.

  The split is stratified and deterministic in `seed`. A complete tree built with the same arguments
  is reused; one built with other arguments is replaced (written aside, then renamed into place). Anything
  else at `root` (a folder of other files) is left alone: the call fails.

  Raises:
    FileExistsError: `root` exists and is not empty, but is no digits tree built here.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
  if image_size < 8:
    raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
  root = os.fspath(root)
  params = {"image_size": image_size, "val_fraction": val_fraction, "seed": seed}
  marker = os.path.join(root, _MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == params:
        return root
  elif os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise FileExistsError(f"{root} exists and is not a digits tree built by cvt_jax: choose another "
                          "--data_dir (nothing was changed)")

  digits = load_digits()
  rng = np.random.default_rng(seed)
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".digits-", dir=parent)
  logging.info("Writing %d digit images (%dpx) to %s", len(digits.images), image_size, root)
  for label in range(10):
    indices = np.flatnonzero(digits.target == label)
    rng.shuffle(indices)
    num_val = int(round(val_fraction * len(indices)))
    for split, chosen in (("val", indices[:num_val]), ("train", indices[num_val:])):
      folder = os.path.join(staging, split, str(label))
      os.makedirs(folder)
      for i in chosen:
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # values are 0..16
        image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
  with open(os.path.join(staging, _MARKER), "w") as f:
    json.dump(params, f)
  if os.path.exists(root):
    shutil.rmtree(root)
  os.rename(staging, root)
  return root


def subset_tree(source: str, root: str, classes: Sequence[str], shots: int | None = None) -> str:
  """`root/{train,val}/<class>` linking to `source`'s images of `classes`; `shots` caps train per class."""
  for split in ("train", "val"):
    for name in classes:
      src_dir, dst_dir = os.path.join(source, split, name), os.path.join(root, split, name)
      os.makedirs(dst_dir, exist_ok=True)
      files = sorted(os.listdir(src_dir))
      if split == "train" and shots is not None:
        files = files[:shots]
      for f in files:
        link = os.path.join(dst_dir, f)
        if not os.path.lexists(link):
          os.symlink(os.path.abspath(os.path.join(src_dir, f)), link)
  return root


def prepared_shards(tree: str, root: str) -> str:
  """`tree` as ArrayRecord shards in `root` (`cvt-jax prepare`), written again when the tree is newer."""
  from cvt_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import records  # pylint: disable=g-import-not-at-top

  info = os.path.join(root, records.INFO_FILE)
  if os.path.exists(info) and os.path.getmtime(info) >= os.path.getmtime(os.path.join(tree, _MARKER)):
    return root
  if prepare.is_preparation(root):  # shards of an earlier tree
    shutil.rmtree(root)
  prepare.prepare(tree, root, log=logging.info)
  return root
