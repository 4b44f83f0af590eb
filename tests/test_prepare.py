"""`cvt-jax prepare`: folder trees and TFDS datasets to ArrayRecord shards, resumable and verifiable.

A resume continues the same job or is refused (never a dataset of two listings' labels), Ctrl-C and kill -9
are followed by a clean resume, and bad input gets one line with every user file left as it was.
"""

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from etils import epath
from PIL import Image
from test_bad_inputs import assert_nothing_lost
from test_bad_inputs import snapshot

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
  assert "train/dog/notes.jpg is not a readable image (UnidentifiedImageError: cannot identify image file)" in out
  assert "<_io.BytesIO" not in out  # the file is named, not the stream PIL read it from
  assert "train: 3/3 shards, 11/11 files, 1 not an image," in out  # the counts agree with the summary's
  assert "train 10 images in 3 shards (of 11 files, 1 not an image); val 4 images in 1 shard" in out
  info = records.read_info(dst)
  assert info.class_names == ("cat", "dog") and set(info.splits) == {"train", "val"}
  assert info.splits["train"].num_examples == 10 and len(info.splits["train"].shards) == 3  # 11 files
  assert info.splits["train"].unreadable == ("train/dog/notes.jpg",)
  assert _run("--verify", dst) == 0
  assert "train: 3 shards, 10 records, checksums, labels and order match" in capsys.readouterr().out
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
  assert "was prepared with other options: records_per_shard 8, was 4" in capsys.readouterr().err
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
  logged = []  # the same builder (class names, split sizes, version): the same job, finished
  prepare.prepare("tfds:cvt_tiny_shapes", dst, data_dir=tiny_tfds_dir, records_per_shard=8, log=logged.append)
  assert logged[-1].startswith(f"{dst} is complete already, nothing to do: 4 classes")


def _one_line(capsys) -> str:
  """The command's one error line (and that there is no other, nor a traceback)."""
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("cvt-jax prepare: error: ")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def _labels_match_folders(dst) -> int:
  """Asserts that every record's label names its file's class folder; returns the number of records."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  info = records.read_info(dst)
  count = 0
  for split in info.splits.values():
    for shard in split.shards:
      reader = array_record_module.ArrayRecordReader(os.path.join(dst, shard.file))
      stored = [records.Record.parse(raw) for raw in reader.read_all()]
      reader.close()
      assert [info.class_names[r.label] for r in stored] == [r.key.split("/")[1] for r in stored]
      count += len(stored)
  return count


# --------------------------------------------------------------------- a resume continues the same job --


def test_a_rerun_after_a_class_was_added_is_refused_and_restart_labels_every_record_by_its_folder(
    tree, tmp_path, capsys):
  dst = str(tmp_path / "records")
  assert _run(tree, dst, "--records_per_shard", "4") == 0
  _image(os.path.join(tree, "train", "ant", "0.jpg"), (90, 90, 90))
  before = snapshot(tree, dst)
  capsys.readouterr()
  assert _run(tree, dst, "--records_per_shard", "4") == 1
  line = _one_line(capsys)
  assert (f"{dst} was prepared from another listing of {tree}: classes added: ant (3 classes, was 2); "
          "train: 12 files, was 11; val: other files or labels (4, as before); rerun with --restart to start "
          "over, or choose another folder") in line  # val's labels moved up by one
  assert_nothing_lost(before, snapshot(tree, dst))
  assert _run(tree, dst, "--records_per_shard", "4", "--restart") == 0
  assert records.read_info(dst).class_names == ("ant", "cat", "dog")
  assert _labels_match_folders(dst) == 11 + 4


@pytest.mark.parametrize("change,difference", [
    (lambda tree: _image(f"{tree}/val/cat/9.jpg", (1, 2, 3)), "val: 5 files, was 4"),
    (lambda tree: os.remove(f"{tree}/train/cat/0.jpg"), "train: 10 files, was 11"),
    (lambda tree: os.rename(f"{tree}/val/cat/1.jpg", f"{tree}/val/cat/7.jpg"),
     "val: other files or labels (4, as before)"),
    (lambda tree: [shutil.rmtree(f"{tree}/{split}/cat") for split in ("train", "val")],
     "classes removed: cat (1 class, was 2)"),
    (lambda tree: _image(f"{tree}/test/cat/0.jpg", (1, 2, 3)), "splits train, val, test, was train, val"),
], ids=["file added", "file removed", "file renamed", "class removed", "split added"])
def test_a_rerun_after_the_source_changed_names_the_change(tree, tmp_path, change, difference):
  dst = str(tmp_path / "records")
  prepare.prepare(tree, dst, records_per_shard=4, log=lambda _: None)
  change(tree)
  before = snapshot(dst)
  with pytest.raises(prepare.PrepareError, match="was prepared from another listing") as error:
    prepare.prepare(tree, dst, records_per_shard=4, log=lambda _: None)
  assert difference in str(error.value)
  assert_nothing_lost(before, snapshot(dst))


def test_restart_replaces_another_shard_size_and_removes_only_what_prepare_wrote(tree, tmp_path):
  dst = tmp_path / "records"
  prepare.prepare(tree, str(dst), records_per_shard=4, log=lambda _: None)
  (dst / "NOTES.txt").write_text("a user's notes beside the shards")
  with pytest.raises(prepare.PrepareError, match="other options: records_per_shard 3, was 4; rerun with --rest"):
    prepare.prepare(tree, str(dst), records_per_shard=3, log=lambda _: None)
  logged = []
  prepare.prepare(tree, str(dst), records_per_shard=3, restart=True, log=logged.append)
  assert f"--restart: removed the earlier preparation in {dst} (4 shards)" in logged
  assert sorted(os.listdir(dst / "train")) == [".done", *(f"train-0000{i}-of-00004.array_record" for i in range(4))]
  assert (dst / "NOTES.txt").read_text() == "a user's notes beside the shards"
  records.verify(dst, log=lambda _: None)


def test_a_rerun_of_a_complete_preparation_says_there_is_nothing_to_do(tree, tmp_path, capsys):
  dst = tmp_path / "records"
  assert _run(tree, dst, "--records_per_shard", "4") == 0
  capsys.readouterr()
  assert _run(tree, dst, "--records_per_shard", "4") == 0
  out = capsys.readouterr().out
  assert f"{dst} is complete already, nothing to do: 2 classes; train 10 images in 3 shards" in out
  assert "written before" not in out and "resum" not in out


def test_a_rerun_removes_the_partial_shard_a_killed_run_left(tree, tmp_path):
  dst = tmp_path / "records"
  prepare.prepare(tree, str(dst), records_per_shard=4, log=lambda _: None)
  # What kill -9 leaves mid-shard: the shard in its temporary folder, no marker, no info file.
  partial = dst / "train" / "tmpk1ll3d9x"
  partial.mkdir()
  shard = dst / "train" / "train-00001-of-00003.array_record"
  shard.rename(partial / shard.name)
  (dst / "train" / ".done" / "00001.json").unlink()
  (dst / records.INFO_FILE).unlink()
  logged = []
  prepare.prepare(tree, str(dst), records_per_shard=4, log=logged.append)
  assert "train: 2 of 3 shards were written before; writing the other 1" in logged
  assert not partial.exists() and shard.exists()
  records.verify(dst, log=lambda _: None)


# ------------------------------------------------------------------------------ verify reads the records --


def _edit_info(dst, **changes) -> None:
  path = os.path.join(dst, records.INFO_FILE)
  with open(path) as f:
    info = json.load(f)
  with open(path, "w") as f:
    json.dump({**info, **changes}, f)


@pytest.mark.parametrize("edit,message", [
    (lambda dst, info: _edit_info(dst, class_names=["dog", "cat"]),
     "train-00000-of-00003.array_record: the record of train/cat/0.jpg has label 0 ('dog'), not its class "
     "folder 'cat': the records disagree with the class names of dataset_info.json"),
    (lambda dst, info: _edit_info(dst, class_names=["cat"]),
     "the record of train/dog/0.jpg has label 1, not one of the 1 classes of dataset_info.json"),
    (lambda dst, info: _edit_info(dst, splits={**info["splits"], "train": {
        **info["splits"]["train"], "num_examples": 14,
        "shards": info["splits"]["train"]["shards"][:1] * 2 + info["splits"]["train"]["shards"][1:]}}),
     "the record of train/cat/0.jpg comes after that of cat/3.jpg (out of order"),
    (lambda dst, info: os.makedirs(f"{dst}/train/tmpabcdefgh"),
     "train/tmpabcdefgh is not listed in dataset_info.json: left by an interrupted or earlier preparation"),
    (lambda dst, info: shutil.copy(f"{dst}/train/train-00000-of-00003.array_record",
                                   f"{dst}/train/train-00000-of-00002.array_record"),
     "train/train-00000-of-00002.array_record is not listed in dataset_info.json"),
], ids=["class folders", "label range", "stored twice", "partial shard", "older shard set"])
def test_verify_finds_records_or_files_that_disagree_with_the_info(tree, tmp_path, capsys, edit, message):
  dst = str(tmp_path / "records")
  prepare.prepare(tree, dst, records_per_shard=4, log=lambda _: None)
  with open(os.path.join(dst, records.INFO_FILE)) as f:
    edit(dst, json.load(f))
  assert _run("--verify", dst) == 1
  assert message in _one_line(capsys)


def test_a_bucket_preparation_refuses_a_changed_tree_restarts_and_verifies(tree, tmp_path):
  """gs:// destinations: the same job checks, and --verify reads each shard through a local copy (it hung
  on ArrayRecord's reader of a gs:// path)."""
  from gcs_emulator import GcsEmulator  # pylint: disable=g-import-not-at-top

  emulator = GcsEmulator().start()
  try:
    dst = str(epath.Path(emulator.create_bucket()) / "records")
    prepare.prepare(tree, dst, records_per_shard=4, log=lambda _: None)
    _image(os.path.join(tree, "train", "ant", "0.jpg"), (90, 90, 90))
    with pytest.raises(prepare.PrepareError, match="classes added: ant"):
      prepare.prepare(tree, dst, records_per_shard=4, log=lambda _: None)
    prepare.prepare(tree, dst, records_per_shard=8, restart=True, log=lambda _: None)
    assert sorted(p.name for p in (epath.Path(dst) / "train").iterdir()) == [
        ".done", "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    logged = []
    assert records.verify(dst, log=logged.append).class_names == ("ant", "cat", "dog")
    assert logged == ["train: 2 shards, 11 records, checksums, labels and order match",
                      "val: 1 shard, 4 records, checksums, labels and order match"]
  finally:
    emulator.stop()


# ------------------------------------------------------------------------- Ctrl-C and kill -9, for real --


def _many(root: str, counts: dict[str, int]) -> str:
  """`root`/tree with `counts` train images per class: hard links to one file (cheap to make), so that
  only its folder tells a record's label."""
  one = os.path.join(root, "one.jpg")
  _image(one, (10, 20, 30))
  for name, count in counts.items():
    folder = os.path.join(root, "tree", "train", name)
    os.makedirs(folder)
    for i in range(count):
      os.link(one, os.path.join(folder, f"{i:04d}.jpg"))
  return os.path.join(root, "tree")


def _start(src: str, dst: str, jobs: int) -> subprocess.Popen:
  """`cvt-jax prepare SRC DST` in another process, one image per shard (many small steps)."""
  argv = ["cvt-jax", "prepare", src, dst, "--records_per_shard", "1", "--jobs", str(jobs)]
  # SIGINT raises KeyboardInterrupt (as at a terminal) even where the test runner was started ignoring it.
  code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
          f"from cvt_jax.cli import main; main.main({argv!r})")
  return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(dst: str) -> list[str]:
  done = os.path.join(dst, "train", ".done")
  return fnmatch.filter(os.listdir(done), "0*.json") if os.path.isdir(done) else []


def _wait_for_shards(dst: str, count: int, process: subprocess.Popen) -> None:
  deadline = time.time() + 120
  while len(_finished(dst)) < count:
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline, "no shard written in 120 s"
    time.sleep(0.005)


def test_ctrl_c_stops_within_seconds_and_a_rerun_resumes_from_the_finished_shards(tmp_path):
  tree = _many(str(tmp_path), {"cat": 200, "dog": 200})
  dst = str(tmp_path / "records")
  process = _start(tree, dst, jobs=1)
  try:
    _wait_for_shards(dst, 1, process)
    process.send_signal(signal.SIGINT)
    interrupted = time.time()
    out, err = process.communicate(timeout=60)
  finally:
    process.kill()
  assert time.time() - interrupted < 5, out
  assert process.returncode == 130 and err.strip().splitlines()[-1] == "cvt-jax prepare: error: interrupted"
  assert f"interrupted: the finished shards stay in {dst}; rerun the same command to resume" in out
  kept = len(_finished(dst))
  assert 1 <= kept < 200  # not on to the end of the split (400 shards)
  assert not records.partial_shards(epath.Path(dst) / "train")  # the shard being written is dropped
  assert not os.path.exists(os.path.join(dst, records.INFO_FILE))
  logged = []
  prepare.prepare(tree, dst, records_per_shard=1, jobs=1, log=logged.append)
  assert f"train: {kept} of 400 shards were written before; writing the other {400 - kept}" in logged
  assert _labels_match_folders(dst) == 400


def test_ctrl_c_stops_a_shard_midway_and_drops_it(tmp_path, monkeypatch):
  tree = _many(str(tmp_path), {"cat": 1000, "dog": 1000})
  dst = tmp_path / "records"
  checked = []
  readable = prepare._readable  # pylint: disable=protected-access

  def ctrl_c_at_the_third_image(data):
    checked.append(data)
    if len(checked) == 3:
      signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    time.sleep(0.001)  # as reading a real image would, this lets the main thread have the GIL
    return readable(data)

  monkeypatch.setattr(prepare, "_readable", ctrl_c_at_the_third_image)
  # SIGINT raises KeyboardInterrupt (as at a terminal) even where the test runner was started ignoring it
  # (a shell starts background jobs so).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      prepare.prepare(tree, str(dst), records_per_shard=2000, jobs=1, log=lambda _: None)
  finally:
    signal.signal(signal.SIGINT, previous)
  assert len(checked) < 1000  # of the shard's 2000 images: stopped within about a second
  assert os.listdir(dst / "train") == []  # no shard, no marker, no partial shard


def test_a_killed_preparation_then_a_class_added_is_refused_and_restart_labels_every_record_by_its_folder(
    tmp_path, capsys):
  """The issue's scenario: kill -9 midway, a class added, the same command again."""
  tree = _many(str(tmp_path), {"cat": 150, "dog": 150})
  dst = str(tmp_path / "records")
  process = _start(tree, dst, jobs=2)
  try:
    _wait_for_shards(dst, 3, process)
  finally:
    process.kill()
    process.communicate()
  assert not os.path.exists(os.path.join(dst, records.INFO_FILE))
  _image(os.path.join(tree, "train", "ant", "0.jpg"), (90, 90, 90))
  before = snapshot(tree, dst)
  assert _run(tree, dst, "--records_per_shard", "1") == 1
  message = _one_line(capsys)
  assert "classes added: ant (3 classes, was 2); train: 301 files, was 300; rerun with --restart" in message
  assert_nothing_lost(before, snapshot(tree, dst))
  assert _run(tree, dst, "--records_per_shard", "1", "--restart") == 0
  assert _labels_match_folders(dst) == 301
  assert sorted(os.listdir(os.path.join(dst, "train")))[:2] == [".done", "train-00000-of-00301.array_record"]
  assert len(os.listdir(os.path.join(dst, "train"))) == 1 + 301  # no partial shard, no shard of 300
  records.verify(dst, log=lambda _: None)


# ------------------------------------------------------------------------- bad input: one line, no loss --


def _add_class(paths):
  _image(f"{paths['tree']}/train/ant/0.jpg", (90, 90, 90))


def _earlier_job_file(paths):
  """The job file of a cvt-jax before fingerprints: the options only."""
  with open(f"{paths['shards']}/.prepare.json", "w") as f:
    json.dump({"source": paths["tree"], "splits": [], "data_dir": "", "records_per_shard": 4,
               "format": records.FORMAT}, f)


def _swap_class_names(paths):
  _edit_info(paths["shards"], class_names=["dog", "cat"])


# (id, what changes before the command, argv after `cvt-jax prepare`, exit status, text of the one line)
BAD_INPUTS = [
    ("destination inside the source", None, ["{tree}", "{tree}/train/shards"], 1,
     "destination {tree}/train/shards is inside the source {tree}: its shards would become part of the tree"),
    ("destination is the source", None, ["{tree}", "{tree}"], 1, "destination {tree} is inside the source"),
    ("source inside the destination", None, ["{tree}", "{root}"], 1,
     "the source {tree} is inside the destination {root}"),
    ("a user's folder", None, ["{tree}", "{mine}"], 1, "is not empty and holds no preparation to resume"),
    ("a user's file", None, ["{tree}", "{mine}/thesis.tex"], 1, "destination {mine}/thesis.tex is a file"),
    ("missing source", None, ["{root}/none", "{root}/out"], 1, "{root}/none does not exist"),
    ("class added", _add_class, ["{tree}", "{shards}", "--records_per_shard", "4"], 1,
     "{shards} was prepared from another listing of {tree}: classes added: ant (3 classes, was 2)"),
    ("another shard size", None, ["{tree}", "{shards}", "--records_per_shard", "2"], 1,
     "{shards} was prepared with other options: records_per_shard 2, was 4; rerun with --restart"),
    ("other splits", None, ["{tree}", "{shards}", "--records_per_shard", "4", "--splits", "train"], 1,
     "splits ['train'], was []"),
    ("an earlier cvt-jax's job", _earlier_job_file, ["{tree}", "{shards}", "--records_per_shard", "4"], 1,
     "was written by an earlier cvt-jax that recorded no listing of its source"),
    ("no arguments", None, [], 2, "expected SRC and DST, got 0 arguments"),
    ("no shard size", None, ["{tree}", "{root}/out", "--records_per_shard", "0"], 2, "--records_per_shard"),
    ("verify with restart", None, ["--verify", "--restart", "{shards}"], 2, "--verify writes nothing"),
    ("verify a user's folder", None, ["--verify", "{mine}"], 1, "holds no dataset_info.json"),
    ("verify labels", _swap_class_names, ["--verify", "{shards}"], 1, "not its class folder 'cat'"),
]


@pytest.fixture
def world(tmp_path):
  """A user's files: a tree, its shards (4 images a shard), a folder of their own."""
  root = tmp_path / "world"
  for split, count in (("train", 2), ("val", 1)):
    for c, name in enumerate(("cat", "dog")):
      for i in range(count):
        _image(str(root / "tree" / split / name / f"{i}.jpg"), (20 * i, 100 * c, 50))
  (root / "mine").mkdir()
  (root / "mine" / "thesis.tex").write_text("a user's file")
  paths = {"root": str(root), "tree": str(root / "tree"), "shards": str(root / "shards"), "mine": str(root / "mine")}
  prepare.prepare(paths["tree"], paths["shards"], records_per_shard=4, log=lambda _: None)
  return paths


@pytest.mark.parametrize("change,argv,status,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_one_line_and_changes_no_file(world, capsys, change, argv, status, message):
  if change:
    change(world)
  before = snapshot(world["root"])
  assert _run(*(a.format(**world) for a in argv)) == status
  assert message.format(**world) in _one_line(capsys)
  assert_nothing_lost(before, snapshot(world["root"]))  # nothing written, changed or removed
