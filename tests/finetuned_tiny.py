"""A checkpoint made the way users make one, shared by test_evaluate, test_predict and test_finetune.

The converted PyTorch fixture `fixtures/tiny/hf/model.safetensors` (dims 8/16/24, depths 1/2/3, heads 1/2/3,
a 10-class head) is fine-tuned with `configs/finetune.py` through `trainer.train_and_evaluate` on digits
5-9 at 32 px with the AdamW option (3 epochs): its head is replaced by a 5-class one. Built once per run of
the suite, by the first test that asks (the other pytest-xdist workers wait for it), and copied into each
worker's own temporary folder: the tests may write beside it (e.g. an evaluation summary in the workdir).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import pathlib
import shutil

import numpy as np

from cvt_jax import weights
from cvt_jax.configs import finetune
from cvt_jax.data import digits as demo_data
from cvt_jax.train import trainer

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_FIXTURE = os.path.join(HERE, "fixtures", "tiny", "hf", "model.safetensors")
ARCHITECTURE = dict(dims=(8, 16, 24), depths=(1, 2, 3), heads=(1, 2, 3))
CLASSES = ("5", "6", "7", "8", "9")
IMAGE_SIZE = 32
TRAIN_EVAL = "train_eval.json"  # the final evaluation, written last: the build is complete


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


def shared(tmp_path_factory) -> Finetuned:
  """The fixture in this worker's temporary folder (see the module docstring)."""
  base = tmp_path_factory.getbasetemp()
  run_base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by the run's workers
  built = str(run_base / "finetuned_tiny_built")
  with open(run_base / "finetuned_tiny.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(built, TRAIN_EVAL)):
      _build(built)
  return _copy(built, str(base / "finetuned_tiny"))


def _paths(root: str) -> Finetuned:
  train_eval = os.path.join(root, TRAIN_EVAL)
  return Finetuned(os.path.join(root, "finetuned"), os.path.join(root, "exported", "finetuned.npz"),
                   os.path.join(root, "digits"), os.path.join(root, "digits_5-9"),
                   json.loads(pathlib.Path(train_eval).read_text()) if os.path.exists(train_eval) else {})


def _build(root: str) -> None:
  shutil.rmtree(root, ignore_errors=True)  # what a failed build left
  paths = _paths(root)
  demo_data.build_digits_tree(paths.digits, image_size=IMAGE_SIZE)
  demo_data.subset_tree(paths.digits, paths.tree, CLASSES)
  _, result = trainer.train_and_evaluate(config(paths.tree, PTH_FIXTURE), paths.workdir)
  weights.save(weights.load(paths.workdir), paths.npz)
  with open(os.path.join(root, TRAIN_EVAL), "w") as f:
    json.dump(result, f, default=float)


@functools.cache
def _copy(built: str, root: str) -> Finetuned:
  shutil.copytree(built, root)  # links (the 5-9 subset's) become files of the copy
  return _paths(root)


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
