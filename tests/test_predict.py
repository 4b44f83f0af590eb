"""cvt_jax.predict end to end: image formats, folders, class names, bad files, agreement with the model."""

import json
import os
import shutil
import subprocess
import sys

import finetuned_tiny
import jax
import numpy as np
import pytest
from PIL import Image

from cvt_jax import model as model_lib
from cvt_jax import predict
from cvt_jax import weights
from cvt_jax.cli import predict as predict_cli
from cvt_jax.data import preprocess
from cvt_jax.model import get_variant

ROOT = os.path.dirname(finetuned_tiny.HERE)


@pytest.fixture()
def images(finetuned, tmp_path):
  """One digit scan saved in every format and mode predict must read, plus two files that are not images."""
  digit = Image.open(finetuned_tiny.val_images(finetuned.tree, 1)[0]).convert("RGB")
  folder = tmp_path / "images"
  (folder / "nested").mkdir(parents=True)
  digit.save(folder / "rgb.jpg")
  digit.convert("L").save(folder / "grey.jpg")
  digit.convert("CMYK").save(folder / "cmyk.jpg")
  digit.resize((37, 91)).save(folder / "odd_size.png")
  digit.convert("RGBA").save(folder / "nested" / "alpha.png")
  digit.convert("P").save(folder / "nested" / "palette.png")
  (folder / "README.txt").write_text("not an image, not an image extension: folders skip it")
  broken = tmp_path / "broken.jpg"
  broken.write_text("a text file with an image extension")
  return folder, broken


def test_every_format_is_read_and_bad_files_are_reported(finetuned, images, capsys):
  folder, broken = images
  with pytest.raises(SystemExit) as exit_:
    predict_cli.run(["cvt-jax predict", "--checkpoint", finetuned.workdir, "--json", str(folder), str(broken)])
  captured = capsys.readouterr()
  assert exit_.value.code == 1  # one file failed, the others were still classified
  assert f"skipped {broken}: not a readable image" in captured.err
  rows = [json.loads(line) for line in captured.out.splitlines()]
  assert sorted(os.path.basename(r["path"]) for r in rows) == [
      "alpha.png", "cmyk.jpg", "grey.jpg", "odd_size.png", "palette.png", "rgb.jpg"]
  for row in rows:
    probs = [t["probability"] for t in row["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    # The workdir's class names (digits 5-9), not label indices.
    assert sorted(t["name"] for t in row["top"]) == list(finetuned_tiny.CLASSES)


def test_top1_agrees_with_the_model_and_the_labels(finetuned):
  paths = finetuned_tiny.val_images(finetuned.tree, 3)
  ckpt = weights.load(finetuned.npz)
  predictor = predict.Predictor(ckpt, finetuned_tiny.IMAGE_SIZE, batch_size=4)  # 15 images: padded batches
  predictions, failed = predict.predict(predictor, paths, predict.class_names(ckpt))
  assert not failed and [p.path for p in predictions] == paths
  batch = np.stack([preprocess.eval_image(p, finetuned_tiny.IMAGE_SIZE) for p in paths])
  logits = jax.jit(ckpt.model().apply)(ckpt.variables, model_lib.normalize(batch))
  np.testing.assert_array_equal([p.labels[0] for p in predictions], np.argmax(logits, -1))
  np.testing.assert_allclose([p.probabilities[0] for p in predictions],
                             np.max(jax.nn.softmax(logits), -1), rtol=1e-5)
  assert all(p.names[0] == finetuned_tiny.CLASSES[p.labels[0]] for p in predictions)


def test_class_names_sources(finetuned, tmp_path):
  imagenet = weights.Checkpoint({}, get_variant("cvt-13"), 1000, None, None, "in1k.pth")
  names = predict.class_names(imagenet)
  assert names[0] == "tench, Tinca tinca" and len(names) == 1000
  ckpt = weights.load(finetuned.npz)  # the export keeps the class names beside the .npz
  assert predict.class_names(ckpt) == finetuned_tiny.CLASSES
  labels = tmp_path / "labels.txt"
  labels.write_text("five\nsix\nseven\neight\nnine\n")
  assert predict.class_names(ckpt, str(labels))[0] == "five"
  labels.write_text("five\nsix\n")
  with pytest.raises(ValueError, match="2 class names for a 5-class head"):
    predict.class_names(ckpt, str(labels))


def test_pytorch_file_and_errors_on_the_command_line(finetuned, tmp_path):
  image = tmp_path / "digit.png"
  shutil.copy(finetuned_tiny.val_images(finetuned.tree, 1)[0], tmp_path / "digit.jpg")
  Image.open(tmp_path / "digit.jpg").save(image)
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  run = lambda *args: subprocess.run([sys.executable, "-m", "cvt_jax.cli.main", "predict", *args], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=600)
  ok = run("--checkpoint", finetuned_tiny.PTH_FIXTURE, "--image_size", "40", str(image))
  assert ok.returncode == 0, ok.stderr[-3000:]
  lines = ok.stdout.splitlines()
  assert lines[0] == str(image) and len(lines) == 6 and all("%  " in line for line in lines[1:])
  assert "class " in lines[1]  # a 10-class head without stored names: label indices

  missing = run("--checkpoint", str(tmp_path / "nope.npz"), str(image))
  assert missing.returncode == 1 and "nope.npz" in missing.stderr and "Traceback" not in missing.stderr
  empty = tmp_path / "empty"
  empty.mkdir()
  none = run("--checkpoint", finetuned.npz, str(empty))
  assert none.returncode == 2 and "no image files" in none.stderr


def test_a_reader_that_stops_early_ends_predict_cleanly_and_the_output_is_written(finetuned, tmp_path):
  paths = finetuned_tiny.val_images(finetuned.tree, 3)
  output = tmp_path / "predictions.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  # `cvt-jax predict ... | head -2` at its worst: the reader (`true`) is gone before predict prints a line.
  script = (f"{sys.executable} -m cvt_jax.cli.main predict --checkpoint {finetuned.npz} --output {output} "
            f"{' '.join(paths)} | true; exit ${{PIPESTATUS[0]}}")
  done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0 and "rror" not in done.stderr, done.stderr[-3000:]
  assert len(json.loads(output.read_text())) == len(paths)
