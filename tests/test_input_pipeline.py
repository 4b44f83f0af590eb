"""Input pipeline: folder tree (PIL) and TFDS (mock_data) paths, determinism, splits, bad input."""

import logging
import os
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cvt_jax.data import input_pipeline as ip

SIZE = 16


def _solid(path, rgb, mode="RGB", fmt=None, size=(20, 14)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, rgb).convert(mode).save(path, format=fmt)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """Solid-colour PNGs whose red channel is a unique id and green channel encodes the class.

  Class folders are created in an unsorted order with names whose sorted order is not creation order.
  """
  root = str(tmp_path_factory.mktemp("tree"))
  classes = ["n03", "n01", "b", "n02"]
  uid = 0
  for split, per_class in (("train", 11), ("val", 5)):
    for name in classes:
      for k in range(per_class):
        _solid(os.path.join(root, split, name, f"{k}.png"), (uid, 40 * sorted(classes).index(name), 7))
        uid += 1
  return root


def _spec(root, size=SIZE, workers=2):
  return ip.DataSpec("folder", "", root, "train", "val", size, workers)


def _ids(batch):
  """The unique id (red channel) and the class (green / 40) of each image of a batch."""
  centre = batch["image"][:, SIZE // 2, SIZE // 2].astype(int)
  return centre[:, 0], np.round(centre[:, 1] / 40).astype(int)


@pytest.fixture
def processes(monkeypatch):
  """Pretends this is process `index` of `count`."""
  def set_process(index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
  return set_process


def test_spec_from_config():
  cfg = ml_collections.ConfigDict({"source": "folder", "name": "", "data_dir": "/data", "image_size": 224,
                                   "num_workers": 4, "interpolation": "bilinear", "repeated_augmentation": 3})
  spec = ip.DataSpec.from_config(cfg)
  assert (spec.train_split, spec.eval_split, spec.image_size, spec.num_workers) == ("train", "val", 224, 4)
  assert spec.crop == {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bilinear"}
  assert spec.repeats == 3
  cfg = ml_collections.ConfigDict({"source": "tfds", "name": "imagenet2012", "data_dir": "~/tfds",
                                   "image_size": 384})
  spec = ip.DataSpec.from_config(cfg)
  assert spec.eval_split == "validation" and spec.data_dir == os.path.expanduser("~/tfds")


def test_dataset_info_sorted_labels(tree):
  info = ip.dataset_info(_spec(tree))
  assert info.class_names == ("b", "n01", "n02", "n03")
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (4, 44, 20)


def test_train_batches_labels_and_shapes(tree):
  it = ip.train_batches(_spec(tree), 8, seed=0)
  for _ in range(3):
    batch = next(it)
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    _, classes = _ids(batch)
    np.testing.assert_array_equal(classes, batch["label"])  # label = index of the sorted folder name


def test_epoch_is_a_permutation_without_repeats(tree):
  it = ip.train_batches(_spec(tree), 8, seed=3)
  steps_per_epoch = 44 // 8
  epochs = [np.concatenate([_ids(next(it))[0] for _ in range(steps_per_epoch)]) for _ in range(2)]
  for ids in epochs:
    assert len(set(ids.tolist())) == steps_per_epoch * 8  # drop_last, nothing twice
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch


def test_deterministic_and_resumable(tree):
  spec = _spec(tree)
  run = ip.train_batches(spec, 8, seed=7)
  reference = [next(run) for _ in range(9)]  # crosses the epoch boundary at step 5
  for start in (0, 4, 5, 7):
    resumed = ip.train_batches(spec, 8, seed=7, start_step=start)
    for step in range(start, 9):
      batch = next(resumed)
      np.testing.assert_array_equal(batch["image"], reference[step]["image"])
      np.testing.assert_array_equal(batch["label"], reference[step]["label"])
  other = next(ip.train_batches(spec, 8, seed=8))
  assert not np.array_equal(other["image"], reference[0]["image"])


def test_processes_take_disjoint_parts_of_the_global_batch(tree, processes):
  spec = _spec(tree)
  whole = [next(ip.train_batches(spec, 8, seed=1, start_step=s)) for s in (0, 6)]
  parts = []
  for p in range(2):
    processes(p, 2)
    it = ip.train_batches(spec, 8, seed=1)
    parts.append([next(it) for _ in range(7)])
  for step, batch in zip((0, 6), whole):
    joined = np.concatenate([parts[0][step]["image"], parts[1][step]["image"]])
    assert parts[0][step]["image"].shape[0] == 4
    np.testing.assert_array_equal(joined, batch["image"])
  processes(0, 3)
  with pytest.raises(ValueError, match="multiple of the process count"):
    ip.train_batches(spec, 8, seed=1)


@pytest.mark.parametrize("batch_size,num_processes", [(8, 1), (6, 1), (32, 1), (6, 2), (9, 3)])
def test_eval_counts_every_example_once(tree, processes, batch_size, num_processes):
  seen, shapes, counts = [], set(), []
  for p in range(num_processes):
    processes(p, num_processes)
    batches = list(ip.eval_batches(_spec(tree), batch_size))
    counts.append(len(batches))
    for b in batches:
      shapes.add(b["image"].shape)
      ids, classes = _ids(b)
      np.testing.assert_array_equal(classes[b["mask"]], b["label"][b["mask"]])
      seen.extend(ids[b["mask"]].tolist())
  assert shapes == {(batch_size // num_processes, SIZE, SIZE, 3)}
  assert len(set(counts)) == 1
  assert sorted(seen) == list(range(44, 64))  # the 20 val ids, each exactly once


def test_odd_files_decode_and_corrupt_ones_are_skipped(tmp_path, caplog):
  root = str(tmp_path)
  for split in ("train", "val"):
    _solid(os.path.join(root, split, "a", "png_named.jpg"), (10, 0, 0), fmt="PNG")
    _solid(os.path.join(root, split, "a", "cmyk.jpg"), (20, 0, 0), mode="CMYK")
    _solid(os.path.join(root, split, "b", "grey.jpg"), (40, 40, 40), mode="L")
    _solid(os.path.join(root, split, "b", "palette.png"), (60, 0, 0), mode="P")
  bad = os.path.join(root, "train", "b", "broken.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff not a jpeg")
  with open(os.path.join(root, "val", "a", "broken.jpeg"), "wb") as f:
    f.write(b"garbage")
  spec = _spec(root)
  with caplog.at_level(logging.WARNING):
    it = ip.train_batches(spec, 4, seed=0)
    batches = [next(it) for _ in range(3)]
  assert all(b["image"].shape == (4, SIZE, SIZE, 3) for b in batches)
  assert bad in caplog.text
  assert sum(bad in r.getMessage() for r in caplog.records) == 1  # warned once
  evals = list(ip.eval_batches(spec, 4))
  mask = np.concatenate([b["mask"] for b in evals])
  assert mask.size == 8 and mask.sum() == 4  # 5 files, the broken one not counted, 3 padding rows


@pytest.mark.parametrize("layout,message", [
    ({}, "does not exist"),
    ({"train/a/x.png": True}, "val"),
    ({"train/a/x.png": True, "train/b/": False, "val/a/x.png": True}, "holds no images"),
    ({"train/a/x.png": True, "val/c/x.png": True}, "absent from the train split"),
])
def test_bad_trees_fail_with_the_path(tmp_path, layout, message):
  root = str(tmp_path / "data")
  for rel, is_file in layout.items():
    if is_file:
      _solid(os.path.join(root, rel), (1, 2, 3))
    else:
      os.makedirs(os.path.join(root, rel), exist_ok=True)
  with pytest.raises((FileNotFoundError, ValueError), match=message) as err:
    ip.dataset_info(_spec(root))
  assert root in str(err.value)


def test_folder_path_and_train_step_import_no_tensorflow(tree):
  # The GPU hosts we benchmark on have no TensorFlow, tfds, clu or ml_collections.
  code = ("import sys; from cvt_jax import input_pipeline as ip, augment, demo_data, train_lib; "
          f"b = next(ip.train_batches(ip.DataSpec('folder', '', {tree!r}, 'train', 'val', 16, 1), 4, 0)); "
          "assert b['image'].shape == (4, 16, 16, 3); "
          "loaded = [m for m in ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections') "
          "if m in sys.modules]; assert not loaded, f'imported {loaded}'")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})



def test_decode_workers_leave_when_their_process_is_killed():
  """A run killed outright (SIGKILL, a dead peer's abort) must not leave its decode workers behind."""
  code = ("import os, sys; from cvt_jax import host_decode; pool = host_decode._workers(2); "
          "print(' '.join(map(str, pool._processes)), flush=True); sys.stdin.read()")
  parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  workers = [int(pid) for pid in parent.stdout.readline().split()]
  assert len(workers) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in workers)
  parent.kill()
  parent.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(_alive(pid) for pid in workers):
    time.sleep(0.2)
  assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as stat:
      return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
  except FileNotFoundError:
    return False


# ------------------------------------------------------------------------------------------- TFDS --


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """imagenet2012 metadata with mock split sizes (mock_data then generates the examples)."""
  import tensorflow_datasets as tfds
  root = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds.builder("imagenet2012", data_dir=root)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[20], num_bytes=0) for name in ("train", "validation")]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return root


def test_tfds_train_and_eval(tfds_dir):
  import tensorflow_datasets as tfds
  spec = ip.DataSpec("tfds", "imagenet2012", tfds_dir, "train", "validation", 32, 0)
  with tfds.testing.mock_data(num_examples=20, data_dir=tfds_dir):
    info = ip.dataset_info(spec)
    assert info.num_classes == 1000 and info.class_names[:2] == ("n01440764", "n01443537")
    assert list(info.class_names) == sorted(info.class_names)  # sorted WNIDs = folder order
    run = ip.train_batches(spec, 8, seed=0)
    reference = [next(run) for _ in range(5)]  # 2 steps per epoch
    assert reference[0]["image"].shape == (8, 32, 32, 3) and reference[0]["image"].dtype == np.uint8
    assert reference[0]["label"].dtype == np.int32
    epoch0 = np.concatenate([reference[0]["label"], reference[1]["label"]])
    epoch1 = np.concatenate([reference[2]["label"], reference[3]["label"]])
    assert not np.array_equal(epoch0, epoch1)
    resumed = ip.train_batches(spec, 8, seed=0, start_step=3)
    for step in (3, 4):
      batch = next(resumed)
      np.testing.assert_array_equal(batch["image"], reference[step]["image"])
      np.testing.assert_array_equal(batch["label"], reference[step]["label"])
    evals = list(ip.eval_batches(spec, 8))
    assert [b["image"].shape for b in evals] == [(8, 32, 32, 3)] * 3
    assert sum(int(b["mask"].sum()) for b in evals) == 20
    assert not evals[-1]["mask"][4:].any()


@pytest.fixture(scope="module")
def tiny_tfds(tiny_tfds_dir):
  return ip.DataSpec("tfds", "cvt_tiny_shapes", tiny_tfds_dir, "train", "validation", 16, 2)


def _tfds_ids(batch):
  return np.round(batch["image"][:, 8, 8, 0] / 8).astype(int)


def test_tfds_processes_read_disjoint_parts(tiny_tfds, processes):
  epoch_ids, eval_ids, eval_counts = [], [], []
  for p in range(2):
    processes(p, 2)
    it = ip.train_batches(tiny_tfds, 4, seed=0)
    batches = [next(it) for _ in range(5)]  # 11 examples per process: 5 steps of 2
    for b in batches:
      np.testing.assert_array_equal(_tfds_ids(b) % 4, b["label"])
    epoch_ids.append(np.concatenate([_tfds_ids(b) for b in batches]))
    evals = list(ip.eval_batches(tiny_tfds, 4))
    eval_counts.append(len(evals))
    eval_ids.extend(np.concatenate([_tfds_ids(b)[b["mask"]] for b in evals]).tolist())
  assert not set(epoch_ids[0]) & set(epoch_ids[1])
  assert all(len(set(ids)) == 10 for ids in epoch_ids)
  assert eval_counts[0] == eval_counts[1] and sorted(eval_ids) == list(range(22, 31))




def test_repeated_augmentation_shows_each_image_three_times_on_different_devices(tree):
  """DeiT's repeated-augmentation sampler: an epoch is n positions holding n / 3 images 3 times each (each
  copy cropped with the seed of its own position), spread over the devices (4 here)."""
  spec = ip.DataSpec("folder", "", tree, "train", "val", SIZE, 2, crop={"scale": (0.1, 0.3)}, repeats=3)
  it = ip.train_batches(spec, 12, seed=0)
  batch = next(it)
  ids, classes = _ids(batch)
  np.testing.assert_array_equal(classes, batch["label"])
  # Row r of the 12 goes to device r // 3; example j of the epoch (copies j = 3k, 3k+1, 3k+2) to row
  # (j % 4) * 3 + j // 4, so the three copies of an image land on three different devices.
  order = np.arange(12).reshape(3, 4).T.reshape(-1)
  by_position = ids[np.argsort(order)]
  for k in range(4):
    copies = by_position[3 * k:3 * k + 3]
    assert len(set(copies.tolist())) == 1
    rows = [int(np.flatnonzero(order == 3 * k + c)[0]) for c in range(3)]
    assert len({r // 3 for r in rows}) == 3
