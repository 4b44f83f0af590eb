"""The digits demo tree: real sklearn digits, stratified deterministic split, idempotent build."""

import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from cvt_jax.data import digits as demo_data
from cvt_jax.data import input_pipeline


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                if f.endswith(".jpg"))


def test_tree_layout_split_and_content(tmp_path):
  root = demo_data.build_digits_tree(tmp_path / "digits", image_size=16)
  digits = load_digits()
  files = _files(root)
  assert len(files) == len(digits.images)
  for label in range(10):
    total = int(np.sum(digits.target == label))
    val = [f for f in files if f.startswith(os.path.join("val", str(label), ""))]
    assert len(val) == round(0.2 * total)  # stratified
  for rel in files[::97]:  # each file is the sklearn digit named by its file name, in its class folder
    split, label, name = rel.split(os.sep)
    index = int(name[:-4])
    assert digits.target[index] == int(label)
    with Image.open(os.path.join(root, rel)) as img:
      assert img.size == (16, 16)
      small = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), np.float64)
    expected = digits.images[index] * 255 / 16
    assert np.corrcoef(small.ravel(), expected.ravel())[0, 1] > 0.9
  info = input_pipeline.dataset_info(input_pipeline.DataSpec("folder", "", root, "train", "val", 16, 1))
  assert info.class_names == tuple(str(d) for d in range(10))
  assert info.num_train_examples + info.num_eval_examples == len(digits.images)


def test_deterministic_and_idempotent(tmp_path):
  a = demo_data.build_digits_tree(tmp_path / "a", image_size=12, seed=3)
  b = demo_data.build_digits_tree(tmp_path / "b", image_size=12, seed=3)
  assert _files(a) == _files(b)
  probe = os.path.join(a, _files(a)[0])
  before = os.stat(probe).st_mtime_ns
  assert demo_data.build_digits_tree(a, image_size=12, seed=3) == a
  assert os.stat(probe).st_mtime_ns == before  # reused, not rewritten
  other = demo_data.build_digits_tree(a, image_size=12, seed=4)  # other split: rebuilt in place
  assert _files(other) != _files(b) and len(_files(other)) == len(_files(b))
