"""gs:// paths against a GCS emulator on 127.0.0.1: a workdir, a TFDS data_dir and converted weights in a
bucket, as on a TPU pod. Every client is pointed at the emulator with a test token (tests/gcs_emulator.py):
nothing leaves this machine."""

import dataclasses
import json
import os
import signal
import subprocess
import tempfile
import time

import finetuned_tiny
import jax
import numpy as np
import pytest
from etils import epath
from gcs_emulator import GcsEmulator
from test_reliability import TOTAL_STEPS
from test_reliability import command
from test_reliability import make_shards
from test_reliability import make_tree

from cvt_jax import weights
from cvt_jax.cli import main as cli
from cvt_jax.data import input_pipeline
from cvt_jax.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gcs():
  emulator = GcsEmulator().start()  # points os.environ (and so the subprocesses) at it
  yield emulator
  emulator.stop()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
  return make_tree(str(tmp_path_factory.mktemp("data") / "tree"))


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> str:
  return make_shards(tree, str(tmp_path_factory.mktemp("shards")))


def _steps(workdir: epath.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def test_a_bucket_workdir_survives_a_kill_and_serves_eval_predict_and_convert(gcs, tree, shards, tmp_path,
                                                                              capsys):
  bucket = gcs.create_bucket()
  workdir = epath.Path(bucket) / "runs" / "tiny"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4", "TF_CPP_MIN_LOG_LEVEL": "2"}
  run = subprocess.Popen(command(str(workdir), shards), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "train.log", "w"))
  try:
    deadline = time.time() + 600
    while not _steps(workdir):  # the first checkpoint, committed in the bucket
      assert run.poll() is None and time.time() < deadline, (tmp_path / "train.log").read_text()[-3000:]
      time.sleep(0.5)
    run.send_signal(signal.SIGKILL)
    run.wait()
  finally:
    run.kill()
  killed_at = _steps(workdir)[-1]
  assert not os.path.exists("gs:"), "a gs:// path was written as a local folder"

  args = command(str(workdir), shards)[2:]  # after `python train.py`
  with pytest.raises(SystemExit) as exit_:  # resumes from the bucket, saving only the last step (seconds each)
    cli.main(["cvt-jax", "train", *args, f"--config.checkpoint_every_steps={TOTAL_STEPS}"])
  assert exit_.value.code == 0, capsys.readouterr().err[-3000:]
  assert killed_at < TOTAL_STEPS and _steps(workdir)[-1] == TOTAL_STEPS

  info = json.loads((workdir / "model_info.json").read_text())
  assert info["num_classes"] == 4 and info["image_size"] == 32

  config_arg = args[1]
  overrides = [a for a in args if a.startswith("--config.")]
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", "eval", "--config", config_arg, "--checkpoint", str(workdir), *overrides])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  output = f"eval_{os.path.basename(shards)}_val_32_step{TOTAL_STEPS}.json"  # named after the dataset too
  assert "top-1" in out and f"{workdir}/{output}" in out
  summary = json.loads((workdir / output).read_text())
  assert summary["count"] == 8 and summary["step"] == TOTAL_STEPS

  image = os.path.join(tree, "val", "class0", "0.jpg")
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", "predict", "--checkpoint", str(workdir), "--output", f"{bucket}/predictions.json",
              image])
  assert exit_.value.code == 0
  predictions = json.loads(epath.Path(f"{bucket}/predictions.json").read_text())
  assert predictions[0]["path"] == image and predictions[0]["top"][0]["name"].startswith("class")

  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", "convert", str(workdir), f"{bucket}/weights/tiny.npz"])
  assert exit_.value.code == 0
  converted = weights.load(f"{bucket}/weights/tiny.npz")
  from_workdir = weights.load(str(workdir))
  assert converted.class_names == from_workdir.class_names == ("class0", "class1", "class2", "class3")
  for a, b in zip(jax.tree.leaves(converted.variables), jax.tree.leaves(from_workdir.variables)):
    np.testing.assert_array_equal(a, b)


def test_shards_prepared_into_a_bucket_train_and_pytorch_files_load_from_it(gcs, tree, tmp_path, monkeypatch):
  """`cvt-jax prepare` writes ArrayRecord shards into a bucket; the pipeline copies each process's shards to
  a local cache (ArrayRecord reads local files) and gives the batches the local shards give."""
  bucket = epath.Path(gcs.create_bucket())
  prepare.prepare(tree, str(bucket / "records"), records_per_shard=16, log=lambda _: None)
  local = str(tmp_path / "records")
  prepare.prepare(tree, local, records_per_shard=16, log=lambda _: None)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "cache"))
  remote_spec = input_pipeline.DataSpec("array_record", "", str(bucket / "records"), "train", "val", 16, 0)
  info = input_pipeline.dataset_info(remote_spec)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (4, 50, 8)
  from_bucket = next(input_pipeline.train_batches(remote_spec, 4, seed=0))
  from_disk = next(input_pipeline.train_batches(dataclasses.replace(remote_spec, data_dir=local), 4, seed=0))
  np.testing.assert_array_equal(from_bucket["image"], from_disk["image"])
  assert list((tmp_path / "cache").glob("cvt_jax_records/*/train/*.array_record"))

  remote = bucket / "hf" / "model.safetensors"  # a Hugging Face file and its config.json, in a bucket
  remote.parent.mkdir(parents=True, exist_ok=True)
  local = epath.Path(finetuned_tiny.PTH_FIXTURE)
  remote.write_bytes(local.read_bytes())
  (remote.parent / "config.json").write_bytes((local.parent / "config.json").read_bytes())
  assert weights.load(str(remote)).num_classes == 10
