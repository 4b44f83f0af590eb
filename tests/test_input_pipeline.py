"""The host pipeline over every source (folder tree, ArrayRecord shards, TFDS array_record): labels,
determinism and resumption, processes, padded evaluation, bad input, worker processes."""

import logging
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from cvt_jax.configs import common
from cvt_jax.data import input_pipeline as ip
from cvt_jax.data import prepare

SIZE = 16
CLASSES = ["n03", "n01", "b", "n02"]  # created in this order; sorted, they are b, n01, n02, n03
SOURCES = ["folder", "array_record", "tfds"]


def _solid(path, rgb, mode="RGB", fmt=None, size=(20, 14)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, rgb).convert(mode).save(path, format=fmt)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """Solid-colour PNGs whose red channel is a unique id and green channel encodes the class (44 train, 20
  val)."""
  root = str(tmp_path_factory.mktemp("tree"))
  uid = 0
  for split, per_class in (("train", 11), ("val", 5)):
    for name in CLASSES:
      for k in range(per_class):
        _solid(os.path.join(root, split, name, f"{k}.png"), (uid, 40 * sorted(CLASSES).index(name), 7))
        uid += 1
  return root


@pytest.fixture(scope="module")
def records_dir(tree, tmp_path_factory):
  """The tree as ArrayRecord shards of 8 records (so a process's part spans several shards)."""
  root = str(tmp_path_factory.mktemp("records"))
  prepare.prepare(tree, root, records_per_shard=8, jobs=2, log=lambda _: None)
  return root


@pytest.fixture(scope="module")
def spec_of(tree, records_dir, tiny_ids_tfds_dir):
  """source -> a spec of the same 44 + 20 images (decoded in this process unless workers are asked)."""
  roots = {"folder": tree, "array_record": records_dir, "tfds": tiny_ids_tfds_dir}
  splits = {"folder": "val", "array_record": "val", "tfds": "validation"}

  def spec(source, size=SIZE, workers=0, **kwargs):
    return ip.DataSpec(source, "cvt_id_squares" if source == "tfds" else "", roots[source], "train",
                       splits[source], size, workers, **kwargs)
  return spec


@pytest.fixture(scope="module")
def tiny_ids_tfds_dir(tmp_path_factory):
  """The tree's images as a TFDS dataset prepared in the array_record format (PNG-encoded, as in the tree)."""
  import tensorflow_datasets as tfds

  class CvtIdSquares(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=sorted(CLASSES))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 11), "validation": self._generate_examples(44, 5)}

    def _generate_examples(self, first, per_class):
      uid = first
      for name in CLASSES:
        for _ in range(per_class):
          label = sorted(CLASSES).index(name)
          yield uid, {"image": np.full((14, 20, 3), (uid, 40 * label, 7), np.uint8), "label": label}
          uid += 1

  root = str(tmp_path_factory.mktemp("tfds_ids"))
  CvtIdSquares(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def _ids(batch):
  """The unique id (red channel) and the class (green / 40) of each image of a batch."""
  centre = batch["image"][:, SIZE // 2, SIZE // 2].astype(int)
  return centre[:, 0], np.round(centre[:, 1] / 40).astype(int)


def _take(batches, count):
  out = [next(batches) for _ in range(count)]
  batches.close()
  return out


@pytest.fixture
def processes(monkeypatch):
  """Pretends this is process `index` of `count`."""
  def set_process(index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
  return set_process


def test_spec_from_config():
  config = common.get_config()
  config.data.update(source="folder", data_dir="~/imagenet", num_workers=4, interpolation="bilinear",
                     repeated_augmentation=3)
  spec = ip.DataSpec.from_config(config.data)
  assert (spec.train_split, spec.eval_split, spec.image_size, spec.num_workers) == ("train", "val", 224, 4)
  assert spec.data_dir == os.path.expanduser("~/imagenet")
  assert spec.crop == {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bilinear"}
  assert spec.repeats == 3
  config.data.update(source="tfds", data_dir=None, num_workers=None)
  spec = ip.DataSpec.from_config(config.data)
  assert spec.eval_split == "validation" and spec.num_workers is None


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_has_the_sorted_labels_and_its_batches_carry_them(spec_of, source):
  info = ip.dataset_info(spec_of(source))
  assert info.class_names == ("b", "n01", "n02", "n03")
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (4, 44, 20)
  for batch in _take(ip.train_batches(spec_of(source), 8, seed=0), 2):
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(_ids(batch)[1], batch["label"])  # label = index of the sorted class name


@pytest.mark.parametrize("source", SOURCES)
def test_an_epoch_is_a_permutation_and_the_next_epoch_another(spec_of, source):
  steps_per_epoch = 44 // 8
  batches = _take(ip.train_batches(spec_of(source), 8, seed=3), 2 * steps_per_epoch)
  epochs = [np.concatenate([_ids(b)[0] for b in batches[e * steps_per_epoch:(e + 1) * steps_per_epoch]])
            for e in range(2)]
  for ids in epochs:
    assert len(set(ids.tolist())) == steps_per_epoch * 8  # drop_last, nothing twice
  assert not np.array_equal(epochs[0], epochs[1])


def test_batches_are_a_function_of_seed_and_step_whatever_the_workers(spec_of):
  """A resumed run (start_step=k) sees the batches of an uninterrupted one, with or without worker
  processes; a tree and its ArrayRecord shards give the same batches (the same images, the same crops)."""
  spec = spec_of("array_record", crop={"scale": (0.2, 1.0)})
  reference = _take(ip.train_batches(spec, 8, seed=7), 8)  # crosses the epoch boundary at step 5
  for start, workers in ((0, 2), (4, 0), (5, 1), (7, 2)):
    resumed = _take(ip.train_batches(spec_of("array_record", workers=workers, crop={"scale": (0.2, 1.0)}),
                                     8, seed=7, start_step=start), 8 - start)
    for step, batch in zip(range(start, 8), resumed):
      np.testing.assert_array_equal(batch["image"], reference[step]["image"])
      np.testing.assert_array_equal(batch["label"], reference[step]["label"])
  assert not np.array_equal(_take(ip.train_batches(spec, 8, seed=8), 1)[0]["image"], reference[0]["image"])
  from_tree = _take(ip.train_batches(spec_of("folder", crop={"scale": (0.2, 1.0)}), 8, seed=7), 1)[0]
  np.testing.assert_array_equal(from_tree["image"], reference[0]["image"])


@pytest.mark.parametrize("source", SOURCES)
def test_two_processes_read_disjoint_halves(spec_of, processes, source):
  seen = []
  for p in range(2):
    processes(p, 2)
    batches = _take(ip.train_batches(spec_of(source), 8, seed=1), 5)  # 22 examples each: 5 steps of 4
    assert all(b["image"].shape[0] == 4 for b in batches)
    ids = np.concatenate([_ids(b)[0] for b in batches])
    assert len(set(ids.tolist())) == 20
    seen.append(set(ids.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] <= set(range(44))
  processes(0, 3)
  with pytest.raises(ValueError, match="multiple of the process count"):
    ip.train_batches(spec_of(source), 8, seed=1)


@pytest.mark.parametrize("source,batch_size,num_processes",
                         [("folder", 8, 1), ("folder", 6, 2), ("array_record", 9, 3), ("tfds", 32, 1),
                          ("tfds", 6, 2)])
def test_eval_counts_every_example_once(spec_of, processes, source, batch_size, num_processes):
  seen, shapes, counts = [], set(), []
  for p in range(num_processes):
    processes(p, num_processes)
    batches = list(ip.eval_batches(spec_of(source), batch_size))
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
  spec = ip.DataSpec("folder", "", root, "train", "val", SIZE, 0)
  skips = ip.SkipLog(logging.warning)
  with caplog.at_level(logging.WARNING):
    for batch in _take(ip.train_batches(spec, 4, seed=0), 3):
      assert batch["image"].shape == (4, SIZE, SIZE, 3)
      skips(ip.skipped(batch))
  assert bad in caplog.text and sum(bad in r.getMessage() for r in caplog.records) == 1  # warned once
  evals = list(ip.eval_batches(spec, 4))
  mask = np.concatenate([b["mask"] for b in evals])
  assert mask.size == 8 and mask.sum() == 4  # 5 files, the broken one not counted, 3 padding rows
  assert [key for b in evals for key, _ in ip.skipped(b)] == [os.path.join(root, "val", "a", "broken.jpeg")]


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
    ip.dataset_info(ip.DataSpec("folder", "", root, "train", "val", SIZE))
  assert root in str(err.value)


def test_a_tfrecord_tfds_dataset_is_refused_with_the_command_that_converts_it(tiny_tfds_dir):
  with pytest.raises(ValueError, match="cvt-jax prepare tfds:cvt_tiny_shapes"):
    ip.dataset_info(ip.DataSpec("tfds", "cvt_tiny_shapes", tiny_tfds_dir, "train", "validation", SIZE))


def test_the_array_record_path_and_the_train_step_import_no_tensorflow(records_dir):
  # The GPU hosts we benchmark on have no TensorFlow, tfds, clu or ml_collections.
  code = ("import sys; from cvt_jax.train import trainer; from cvt_jax.data import input_pipeline as ip; "
          f"b = next(ip.train_batches(ip.DataSpec('array_record', '', {records_dir!r}, 'train', 'val', 16, 1), "
          "4, 0)); assert b['image'].shape == (4, 16, 16, 3); "
          "loaded = [m for m in ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections') "
          "if m in sys.modules]; assert not loaded, f'imported {loaded}'")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_workers_leave_when_their_process_is_killed(tree):
  """A run killed outright (SIGKILL, a dead peer's abort) must not leave its decode workers behind."""
  code = ("import multiprocessing, sys, time; from cvt_jax.data import input_pipeline as ip\n"
          "if __name__ == '__main__':\n"
          f"  it = ip.train_batches(ip.DataSpec('folder', '', {tree!r}, 'train', 'val', 16, 2), 4, 0); next(it)\n"
          "  print(' '.join(str(p.pid) for p in multiprocessing.active_children() if 'grain' in p.name), "
          "flush=True); sys.stdin.read()")
  parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  workers = [int(pid) for pid in parent.stdout.readline().split()]
  assert len(workers) == 2 and all(_alive(pid) for pid in workers)
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


def test_repeated_augmentation_shows_each_image_three_times_on_different_devices(spec_of):
  """DeiT's repeated-augmentation sampler: an epoch is n positions holding n / 3 images 3 times each (each
  copy cropped with the seed of its own position), spread over the devices (4 here)."""
  batch = _take(ip.train_batches(spec_of("folder", crop={"scale": (0.1, 0.3)}, repeats=3), 12, seed=0), 1)[0]
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
