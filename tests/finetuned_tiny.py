"""A checkpoint made the way users make one, shared by test_evaluate, test_predict and test_finetune.

The converted PyTorch fixture `fixtures/tiny/hf/model.safetensors` (dims 8/16/24, depths 1/2/3, heads 1/2/3,
a 10-class head) is fine-tuned with `configs/finetune.py` through `train_lib.train_and_evaluate` on digits
5-9 at 32 px with the AdamW option (3 epochs): its head is replaced by a 5-class one. Built once per test
session, by the first test that asks.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from cvt_jax import train_lib
from cvt_jax import weights
from cvt_jax.configs import finetune
from cvt_jax.data import digits as demo_data

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_FIXTURE = os.path.join(HERE, "fixtures", "tiny", "hf", "model.safetensors")
ARCHITECTURE = dict(dims=(8, 16, 24), depths=(1, 2, 3), heads=(1, 2, 3))
CLASSES = ("5", "6", "7", "8", "9")
IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Finetuned:
  workdir: str  # the orbax training workdir
  npz: str  # its latest step exported to a converted .npz (+ .classes.txt)
  digits: str  # all 10 classes (the fixture's head size)
  tree: str  # digits 5-9: the fine-tuning data
  train_eval: dict  # the final evaluation train_and_evaluate reported


def config(tree: str, init: str = "", arg: str = "epochs=3,batch=64,opt=adamw,lr=0.04"):
  """configs/finetune.py for the fixture's architecture on `tree`."""
  cfg = finetune.get_config(f"init={init},data={tree},classes={len(os.listdir(os.path.join(tree, 'train')))},"
                            f"res={IMAGE_SIZE},{arg}")
  cfg.model.variant = "tiny"
  cfg.model.dims, cfg.model.depths, cfg.model.heads = (
      ARCHITECTURE["dims"], ARCHITECTURE["depths"], ARCHITECTURE["heads"])
  cfg.model.drop_path_rate = 0.1  # the converter's default for a custom architecture
  cfg.model.dtype = "float32"
  cfg.data.num_workers = 0
  cfg.eval_batch_size = 64
  return cfg


@functools.cache
def build(root: str) -> Finetuned:
  digits = demo_data.build_digits_tree(os.path.join(root, "digits"), image_size=IMAGE_SIZE)
  tree = demo_data.subset_tree(digits, os.path.join(root, "digits_5-9"), CLASSES)
  workdir = os.path.join(root, "finetuned")
  _, result = train_lib.train_and_evaluate(config(tree, PTH_FIXTURE), workdir)
  npz = os.path.join(root, "exported", "finetuned.npz")
  weights.save(weights.load(workdir), npz)
  return Finetuned(workdir, npz, digits, tree, result)


def val_images(tree: str, per_class: int = 2) -> list[str]:
  """The first `per_class` val images of each class of `tree`."""
  val = os.path.join(tree, "val")
  return [os.path.join(val, c, f) for c in sorted(os.listdir(val))
          for f in sorted(os.listdir(os.path.join(val, c)))[:per_class]]


def relative_distance(a: dict, b: dict) -> float:
  """||a - b|| / ||b|| over the parameters two flat variable dicts share, the head excluded."""
  keys = sorted(k for k in set(a) & set(b) if k.startswith("params/") and not k.startswith("params/head/"))
  diff = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in keys)
  return float(np.sqrt(diff / sum(float(np.sum(b[k] ** 2)) for k in keys)))
