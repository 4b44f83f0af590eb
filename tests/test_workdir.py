"""The workdir protects itself: model_info.json, the lock, --fresh, a full disk."""

import os
import subprocess

import jax
import pytest
from test_train import tiny_config
from test_train import write_colour_tree

from cvt_jax import checkpointing
from cvt_jax import model as model_lib
from cvt_jax import parallel
from cvt_jax import workdir as workdir_lib
from cvt_jax.train import optim
from cvt_jax.train import trainer


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
  return write_colour_tree(str(tmp_path_factory.mktemp("colours")))


def test_model_info_is_written_once_state_exists_and_guards_resumes(tree, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(tree)
  trainer.train_and_evaluate(config, workdir, interrupt_at_step=2)
  info = workdir_lib.read_model_info(workdir)
  assert info.class_names == ("blue", "green", "red") and info.image_size == 32
  assert info.variant.architecture == ((16, 32, 48), (1, 1, 2), (1, 2, 3))
  assert info.data.startswith(f"folder {tree}: 48 train / 15 eval, classes sha1 ")

  wider = tiny_config(tree, **{"model.dims": (16, 32, 64), "model.heads": (1, 2, 4)})
  with pytest.raises(workdir_lib.WorkdirError, match="belongs to another run: it holds a .* the config "
                                                     "asks for a"):
    trainer.train_and_evaluate(wider, workdir)
  renamed = tmp_path / "renamed"
  for name in ("blue", "green", "red"):  # the same count of classes, other names: a "3" would become a "d"
    os.makedirs(renamed / "train", exist_ok=True)
    os.makedirs(renamed / "val", exist_ok=True)
    os.symlink(os.path.join(tree, "train", name), renamed / "train" / f"x{name}")
    os.symlink(os.path.join(tree, "val", name), renamed / "val" / f"x{name}")
  with pytest.raises(workdir_lib.WorkdirError, match="its label 0 is 'blue', the data's is 'xblue'"):
    trainer.train_and_evaluate(tiny_config(str(renamed)), workdir)
  assert workdir_lib.read_model_info(workdir) == info
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_fresh_removes_only_what_runs_write(tmp_path):
  run = tmp_path / "run"
  for name in ("checkpoints/2", "tensorboard", "profile"):
    os.makedirs(run / name)
  for name in ("model_info.json", "train.log", "train.process1.log", "eval_val_32_step2.json", ".lock"):
    (run / name).write_text("x")
  workdir_lib.remove_run(run)
  assert os.listdir(run) == [".lock"]  # the caller holds it

  (run / "thesis.tex").write_text("years of work")
  (run / "model_info.json").write_text("{}")
  with pytest.raises(workdir_lib.WorkdirError, match="it holds thesis.tex"):
    workdir_lib.remove_run(run)
  assert sorted(os.listdir(run)) == [".lock", "model_info.json", "thesis.tex"]
  with pytest.raises(workdir_lib.WorkdirError, match="not a folder"):
    workdir_lib.remove_run(run / "thesis.tex")
  workdir_lib.remove_run(tmp_path / "absent")  # nothing to do


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB filesystem of its own, so that filling it fills nothing else."""
  folder = tmp_path / "small_disk"
  os.makedirs(folder)
  if os.geteuid() != 0:
    pytest.fail("the full-disk test mounts a small tmpfs: run the suite as root (as CI does)")
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], check=True)
  yield str(folder)
  subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_ends_with_one_line_and_keeps_the_previous_checkpoint(tree, small_disk, monkeypatch):
  workdir = os.path.join(small_disk, "run")
  config = tiny_config(tree, keep_checkpoints=3)
  save = checkpointing.Checkpointer.save

  def save_onto_a_filling_disk(self, step, state):
    if step == 4:  # the first checkpoint (2.9 MB) is written; leave half a MiB for the next one
      self._manager.wait_until_finished()  # pylint: disable=protected-access
      free = os.statvfs(small_disk)
      with open(os.path.join(small_disk, "filler"), "wb") as filler:
        filler.write(bytes(free.f_bavail * free.f_frsize - 2**19))
    save(self, step, state)

  monkeypatch.setattr(checkpointing.Checkpointer, "save", save_onto_a_filling_disk)
  with pytest.raises(checkpointing.CheckpointWriteError) as error:
    trainer.train_and_evaluate(config, workdir)
  message = str(error.value)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert message.startswith(f"cannot write a checkpoint to {checkpoints}: No space left on device (")
  assert " MiB free there); the previous checkpoint is intact" in message and "\n" not in message
  assert os.listdir(checkpoints) == ["2"]  # no half-written step left
  model = model_lib.from_config(config.model, 3)
  tx = optim.make_optimizer(config.optim, lambda step: 1e-3)
  ckpt = checkpointing.Checkpointer(workdir, 2, 3)
  try:
    step, restored = ckpt.restore_latest(trainer.create_train_state(
        model.init_variables(jax.random.key(0), 32), tx, parallel.make_mesh()))
  finally:
    ckpt.close()
  assert step == 2 and int(restored.step) == 2  # the previous checkpoint reads
