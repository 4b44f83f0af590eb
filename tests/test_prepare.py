"""`cvt-jax prepare`: folder trees and TFDS datasets to ArrayRecord shards, resumable and verifiable."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from cvt_jax.cli import main as cli
from cvt_jax.data import input_pipeline as ip
from cvt_jax.data import prepare
from cvt_jax.data import records


def _image(path, rgb, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (24, 18), rgb).convert(mode).save(path, format="JPEG", quality=95)


@pytest.fixture
def tree(tmp_path):
  """2 classes x (5 train, 2 val) JPEGs, one of them CMYK, plus a file that is no image."""
  root = tmp_path / "tree"
  for split, count in (("train", 5), ("val", 2)):
    for c, name in enumerate(("cat", "dog")):
      for i in range(count):
        _image(str(root / split / name / f"{i}.jpg"), (20 * i, 100 * c, 50), mode="CMYK" if i == 3 else "RGB")
  (root / "train" / "dog" / "notes.jpg").write_text("not an image")
  return str(root)


def _run(*args) -> int:
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", "prepare", *map(str, args)])
  return exit_.value.code


def test_a_tree_becomes_shards_that_read_as_the_tree(tree, tmp_path, capsys):
  dst = tmp_path / "records"
  assert _run(tree, dst, "--records_per_shard", "4") == 0
  out = capsys.readouterr().out
  assert "train/dog/notes.jpg is not a readable image" in out and "left out" in out
  info = records.read_info(dst)
  assert info.class_names == ("cat", "dog") and set(info.splits) == {"train", "val"}
  assert info.splits["train"].num_examples == 10 and len(info.splits["train"].shards) == 3  # 11 files
  assert info.splits["train"].unreadable == ("train/dog/notes.jpg",)
  assert _run("--verify", dst) == 0 and "train: 3 shards, 10 records, checksums match" in capsys.readouterr().out
  for split in ("train", "val"):  # the same images, labels and pixels as the tree (the CMYK one included)
    folder = list(ip.eval_batches(ip.DataSpec("folder", "", tree, "train", split, 32, 0), 16))[0]
    shards = list(ip.eval_batches(ip.DataSpec("array_record", "", str(dst), "train", split, 32, 0), 16))[0]
    good = folder["mask"]
    np.testing.assert_array_equal(shards["label"][:good.sum()], folder["label"][good])
    np.testing.assert_array_equal(shards["image"][:good.sum()], folder["image"][good])


def test_an_interrupted_preparation_resumes_with_the_shards_it_had_not_written(tree, tmp_path, monkeypatch):
  dst = str(tmp_path / "records")
  written = []
  write_shard = records.write_shard

  def crash_after_two(root, split, index, count, rows):
    if len(written) == 2:
      raise KeyboardInterrupt
    written.append((split, index))
    return write_shard(root, split, index, count, rows)

  monkeypatch.setattr(records, "write_shard", crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(tree, dst, records_per_shard=2, jobs=1, log=lambda _: None)
  assert not os.path.exists(os.path.join(dst, records.INFO_FILE))  # unfinished: nothing claims otherwise
  with pytest.raises(records.RecordsError, match="rerun the same `cvt-jax prepare`"):
    ip.dataset_info(ip.DataSpec("array_record", "", dst, "train", "val", 32))
  first = list(written)
  monkeypatch.setattr(records, "write_shard", lambda *a: written.append(a[1:3]) or write_shard(*a))
  info = prepare.prepare(tree, dst, records_per_shard=2, jobs=1, log=lambda _: None)
  assert not set(first) & set(written[2:]) and len(written) == 6 + 2  # 11 train files + 4 val, 2 a shard
  assert info.splits["train"].num_examples == 10
  records.verify(dst, log=lambda _: None)


def test_damage_is_found_and_foreign_or_other_destinations_are_refused(tree, tmp_path, capsys):
  dst = tmp_path / "records"
  prepare.prepare(tree, str(dst), records_per_shard=4, log=lambda _: None)
  shard = dst / records.read_info(dst).splits["val"].shards[0].file
  shard.write_bytes(shard.read_bytes()[:-3])
  assert _run("--verify", dst) == 1
  assert "does not match its checksum" in capsys.readouterr().err
  assert _run(tree, dst, "--records_per_shard", "8") == 1  # a resume must ask for the same job
  assert "holds the preparation of another job (it differs in records_per_shard" in capsys.readouterr().err
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("x")
  assert _run(tree, mine) == 1
  err = capsys.readouterr().err
  assert "is not empty and holds no preparation to resume" in err and len(err.strip().splitlines()) == 1
  assert sorted(os.listdir(mine)) == ["thesis.tex"]


def test_a_class_folder_without_images_stops_before_anything_is_written(tree, tmp_path, capsys):
  os.makedirs(os.path.join(tree, "train", "empty"))
  assert _run(tree, tmp_path / "records") == 1
  err = capsys.readouterr().err
  assert f"class folder {os.path.join(tree, 'train', 'empty')} holds no images" in err
  assert not os.path.exists(tmp_path / "records")


def test_a_tfrecord_tfds_dataset_becomes_shards(tiny_tfds_dir, tmp_path):
  dst = str(tmp_path / "records")
  info = prepare.prepare("tfds:cvt_tiny_shapes", dst, data_dir=tiny_tfds_dir, records_per_shard=8,
                         log=lambda _: None)
  assert info.class_names == ("a", "b", "c", "d")
  assert {s: v.num_examples for s, v in info.splits.items()} == {"train": 22, "validation": 9}
  spec = ip.DataSpec("array_record", "", dst, "train", ip.default_eval_split("array_record", dst), 16, 0)
  ids = [int(round(pixel / 8)) for b in ip.eval_batches(spec, 9) for pixel in b["image"][b["mask"], 8, 8, 0]]
  assert sorted(ids) == list(range(22, 31))  # the red channel is 8 x the example's id
  with open(os.path.join(dst, records.INFO_FILE)) as f:
    assert json.load(f)["source"] == "tfds:cvt_tiny_shapes"
