"""cvt_jax.evaluate end to end: workdir / .npz / PyTorch checkpoints, counts, class checks, CLI."""

import json
import os
import re
import shutil
import subprocess
import sys

import finetuned_tiny
import numpy as np
import pytest

from cvt_jax import evaluate
from cvt_jax import weights
from cvt_jax.cli import main as cli
from cvt_jax.data import input_pipeline
from cvt_jax.data import labels
from cvt_jax.data import prepare
from cvt_jax.model import get_variant

ROOT = os.path.dirname(finetuned_tiny.HERE)


def _val_size(tree: str) -> int:
  val = os.path.join(tree, "val")
  return sum(len(os.listdir(os.path.join(val, c))) for c in os.listdir(val))


def test_workdir_counts_every_image_and_matches_the_training_eval(finetuned):
  config = finetuned_tiny.config(finetuned.tree)
  summary = evaluate.evaluate_checkpoint(config, finetuned.workdir)
  assert summary["count"] == _val_size(finetuned.tree) == finetuned.train_eval["count"]
  assert summary["top1"] == pytest.approx(finetuned.train_eval["top1"], abs=1e-6)
  assert summary["loss"] == pytest.approx(finetuned.train_eval["loss"], rel=1e-4)
  assert summary["top1"] <= summary["top5"] <= 100.0
  with open(summary["output"]) as f:  # default: inside the workdir, named after split, size and step
    written = json.load(f)
  assert os.path.dirname(summary["output"]) == finetuned.workdir and "_step" in summary["output"]
  assert written["count"] == summary["count"] and written["images_per_second"] > 0


def test_each_dataset_gets_its_own_default_output_and_none_is_overwritten_by_another(finetuned, tmp_path):
  workdir = str(shutil.copytree(finetuned.workdir, tmp_path / "run"))
  config = finetuned_tiny.config(finetuned.tree)
  config.eval_batch_size = 1024  # 179 images on 4 devices: one batch of 180, not 1024 padded rows
  on_tree = evaluate.evaluate_checkpoint(config, workdir)
  step = on_tree["step"]
  assert on_tree["output"] == f"{workdir}/eval_digits_5-9_val_32_step{step}.json"
  assert on_tree["batch_size"] == 180
  written = open(on_tree["output"], "rb").read()

  shards = str(tmp_path / "digits_shards")
  prepare.prepare(finetuned.tree, shards, log=lambda _: None)
  config.data.source, config.data.data_dir = "array_record", shards
  on_shards = evaluate.evaluate_checkpoint(config, workdir)
  assert on_shards["output"] == f"{workdir}/eval_digits_shards_val_32_step{step}.json"
  assert on_shards["top1"] == on_tree["top1"]

  os.makedirs(tmp_path / "elsewhere")
  os.symlink(finetuned.tree, tmp_path / "elsewhere" / "digits_5-9")  # another dataset of the same name
  config.data.source, config.data.data_dir = "folder", str(tmp_path / "elsewhere" / "digits_5-9")
  with pytest.raises(ValueError, match=f"{on_tree['output']} holds the evaluation of folder tree "
                                       f"{finetuned.tree}/val, not of folder tree {tmp_path}/elsewhere/"
                                       "digits_5-9/val: give --output <file.json> to keep both"):
    evaluate.evaluate_checkpoint(config, workdir)
  assert open(on_tree["output"], "rb").read() == written


def test_a_checkpoint_is_evaluated_at_its_own_resolution_unless_asked_for_another(finetuned, tmp_path, caplog):
  """The fine-tuned workdir was trained at 32 px; finetune's config says 224."""
  config = finetuned_tiny.config(finetuned.tree)
  config.data.image_size = 224
  own = evaluate.evaluate_checkpoint(config, finetuned.workdir, str(tmp_path / "own.json"))
  assert own["image_size"] == 32 and own["top1"] == pytest.approx(finetuned.train_eval["top1"], abs=1e-6)
  asked = evaluate.evaluate_checkpoint(config, finetuned.workdir, str(tmp_path / "asked.json"), image_size=48)
  assert asked["image_size"] == 48
  assert "Evaluating at 48 px as asked; " in caplog.text and "was trained at 32 px" in caplog.text


def test_exported_npz_gives_the_same_numbers_at_any_batch_size(finetuned, tmp_path):
  config = finetuned_tiny.config(finetuned.tree)
  config.eval_batch_size = 28  # does not divide the split: the last batch is padded and masked
  summary = evaluate.evaluate_checkpoint(config, finetuned.npz, str(tmp_path / "npz.json"))
  assert summary["count"] == finetuned.train_eval["count"]
  assert summary["top1"] == pytest.approx(finetuned.train_eval["top1"], abs=1e-6)
  assert os.path.isfile(tmp_path / "npz.json")


def test_pytorch_file_is_converted_on_the_fly_and_its_head_is_checked(finetuned, tmp_path):
  config = finetuned_tiny.config(finetuned.tree)
  with pytest.raises(evaluate.ClassMismatchError, match=r"has 5 classes .* has 10"):
    evaluate.evaluate_checkpoint(config, finetuned_tiny.PTH_FIXTURE)
  config.data.data_dir = finetuned.digits  # all ten digits: fits the fixture's 10-class head
  summary = evaluate.evaluate_checkpoint(config, finetuned_tiny.PTH_FIXTURE, str(tmp_path / "pth.json"))
  assert summary["count"] == _val_size(finetuned.digits)


def test_missing_checkpoints_fail_with_the_path(finetuned, tmp_path):
  config = finetuned_tiny.config(finetuned.tree)
  with pytest.raises(FileNotFoundError, match="no_such.npz"):
    evaluate.evaluate_checkpoint(config, str(tmp_path / "no_such.npz"))
  with pytest.raises(FileNotFoundError, match="holds no checkpoints/ folder: not a training workdir"):
    evaluate.evaluate_checkpoint(config, str(tmp_path))


def _imagenet_checkpoint(class_names=None) -> weights.Checkpoint:
  return weights.Checkpoint({}, get_variant("cvt-13"), 1000, class_names, None, "in1k.pth")


def _info(names) -> input_pipeline.DatasetInfo:
  return input_pipeline.DatasetInfo(len(names), tuple(names), 0, 50_000)


def test_imagenet_heads_need_sorted_wnid_folders():
  wnids = [w for w, _ in labels.imagenet_classes()]
  assert len(wnids) == 1000 and wnids == sorted(wnids)
  evaluate.check_classes(_imagenet_checkpoint(), _info(wnids), "folder", "folder tree 'val'")
  shuffled = wnids[:10][::-1] + wnids[10:]
  with pytest.raises(evaluate.ClassMismatchError, match=r"from label 0 on: dataset 'n01518878'"):
    evaluate.check_classes(_imagenet_checkpoint(), _info(shuffled), "folder", "folder tree 'val'")
  by_name = sorted(name for _, name in labels.imagenet_classes())
  with pytest.raises(evaluate.ClassMismatchError, match="sorted ImageNet WNIDs"):
    evaluate.check_classes(_imagenet_checkpoint(), _info(by_name), "folder", "folder tree 'val'")
  # A TFDS dataset with numbered classes can only be checked by count.
  evaluate.check_classes(_imagenet_checkpoint(), _info([str(i) for i in range(1000)]), "tfds", "TFDS x")
  with pytest.raises(evaluate.ClassMismatchError, match="has 999 classes"):
    evaluate.check_classes(_imagenet_checkpoint(), _info(wnids[:999]), "tfds", "TFDS x")


def test_stored_class_names_catch_a_reordered_tree():
  names = ("cat", "dog", "fox")
  ckpt = weights.Checkpoint({}, get_variant("cvt-13"), 3, names, None, "ft")
  evaluate.check_classes(ckpt, _info(names), "folder", "tree")
  with pytest.raises(evaluate.ClassMismatchError, match="from label 0 on: dataset 'dog' vs checkpoint 'cat'"):
    evaluate.check_classes(ckpt, _info(("dog", "cat", "fox")), "folder", "tree")


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "cvt_jax.cli.main", "eval", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_command_line(finetuned, tmp_path):
  out = tmp_path / "cli.json"
  run = _cli("--config", "finetune:classes=5,res=32", "--checkpoint", finetuned.npz,
             "--data", finetuned.tree, "--config.eval_batch_size=20", "--output", str(out))
  assert run.returncode == 0, run.stderr[-3000:]
  # The progress line's rate and the summary's first say what they measure.
  progress = re.search(r"eval: 179/179 images \(100%\), ([\d.]+) img/s after the first batch", run.stderr)
  assert progress, run.stderr
  assert re.search(r"images 179  in [\d.]+ s with start-up and compile \([\d.]+ img/s; "
                   f"{re.escape(progress[1])} img/s after the first batch\\)", run.stdout), run.stdout
  # The console reads as a tool's: time and message (absl's full prefix is for log files).
  assert all(re.match(r"\d\d:\d\d:\d\d \S", line) for line in run.stderr.strip().splitlines()), run.stderr
  summary = json.loads(out.read_text())
  assert summary["count"] == finetuned.train_eval["count"]
  assert np.isclose(summary["top1"], finetuned.train_eval["top1"])

  missing = _cli("--config", "finetune:classes=5,res=32", "--checkpoint",
                 str(tmp_path / "gone.npz"), "--data", finetuned.tree)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines()[-1] == (
      f"cvt-jax eval: error: checkpoint {tmp_path / 'gone.npz'} does not exist (expected a training workdir, "
      "a converted .npz, a PyTorch .pth/.pt/.bin/.ckpt/.safetensors file or a Hugging Face hub name)")
  assert "Traceback" not in missing.stderr


def test_unreadable_images_are_skipped_and_listed_unless_strict(finetuned, tmp_path):
  tree = tmp_path / "tree"
  tree.mkdir()
  os.symlink(os.path.join(finetuned.tree, "train"), tree / "train")
  for name in finetuned_tiny.CLASSES:
    shutil.copytree(os.path.join(finetuned.tree, "val", name), tree / "val" / name)
  broken = tree / "val" / "5" / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff not a jpeg")
  config = finetuned_tiny.config(str(tree))
  summary = evaluate.evaluate_checkpoint(config, finetuned.npz, str(tmp_path / "eval.json"))
  assert summary["skipped"] == [str(broken)]
  assert summary["count"] == summary["images"] - 1 == finetuned.train_eval["count"]
  assert summary["top1"] == pytest.approx(finetuned.train_eval["top1"], abs=1e-6)
  with pytest.raises(ValueError, match=f"1 of the {summary['images']} images of .* are unreadable "
                                       rf"\(--strict\), e.g. {broken}"):
    evaluate.evaluate_checkpoint(config, finetuned.npz, str(tmp_path / "strict.json"), strict=True)
  assert not (tmp_path / "strict.json").exists()


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_exits_zero_and_describes_the_flags(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", command, "--help"])
  out = capsys.readouterr().out
  assert exit_.value.code == 0 and "flags:" in out and "--debug" in out
  if command in ("train", "eval", "compile"):
    assert "--config.optim.lr=" in out and "configs (--config NAME" in out
