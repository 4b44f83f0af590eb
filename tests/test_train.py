"""The trainer on 4 CPU devices with a tiny CvT: steps, learning, resume, NaN stop, eval coverage."""

import logging
import os
import re
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from cvt_jax import checkpointing
from cvt_jax import model as model_lib
from cvt_jax import parallel
from cvt_jax.configs import common, demo
from cvt_jax.data import augment
from cvt_jax.data import input_pipeline
from cvt_jax.train import optim
from cvt_jax.train import trainer

NUM_CLASSES = 3
TRAIN_PER_CLASS, VAL_PER_CLASS = 16, 5  # 48 train, 15 val: no eval batch below divides 15


def colour_image(rng: np.random.Generator, label: int, size: int = 40) -> np.ndarray:
  """A noisy image whose dominant channel is the class: learnable in a few steps."""
  image = rng.integers(0, 90, (size, size, 3))
  image[..., label] += 150
  return image.astype(np.uint8)


def write_colour_tree(root: str) -> str:
  """<root>/{train,val}/{blue,green,red}/*.jpg: 16 train and 5 val images per class."""
  rng = np.random.default_rng(0)
  for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
    for label, name in enumerate(("red", "green", "blue")):  # sorted folder names give labels 2, 1, 0
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        Image.fromarray(colour_image(rng, label)).save(os.path.join(root, split, name, f"{i}.jpg"), quality=95)
  return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
  return write_colour_tree(str(tmp_path_factory.mktemp("colours")))


def tiny_config(data_dir: str, **overrides):
  """configs/demo.py at test scale: a 3-class narrow CvT at 32 px, 3 steps per epoch on 4 devices."""
  config = demo.get_config("epochs=2,batch=16,res=32")
  config.model.dims, config.model.depths, config.model.heads = (16, 32, 48), (1, 1, 2), (1, 2, 3)
  config.model.num_classes = NUM_CLASSES
  config.model.drop_path_rate = 0.1  # drop path draws from the per-step rng: covered by the resume test
  config.data.source, config.data.data_dir = "folder", data_dir
  config.data.num_workers = 0  # decoded in this process: tiny images, no worker start-up per pipeline
  config.eval_batch_size = 8
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.schedule.warmup_epochs = 1
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  return config


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_is_finite_and_decreases_on_a_learnable_set():
  config = tiny_config("unused", **{"augment.label_smoothing": 0.0})
  mesh = parallel.make_mesh()
  model = model_lib.from_config(config.model, NUM_CLASSES)
  schedule = lambda step: 1e-3
  tx = optim.make_optimizer(config.optim, schedule)
  state = trainer.create_train_state(model.init_variables(jax.random.key(0), 32), tx, mesh)
  step_fn = trainer.shard_train_step(
      trainer.make_train_step(model, tx, schedule, config.augment, jax.random.key(1), shards=4),
      mesh)
  rng = np.random.default_rng(0)
  labels = np.arange(32) % NUM_CLASSES
  batch = parallel.global_batch(
      {"image": np.stack([colour_image(rng, int(l), 32) for l in labels]), "label": labels.astype(np.int32)},
      mesh)
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  losses = []
  for _ in range(12):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
  assert int(state.step) == 12 and float(metrics["lr"]) == pytest.approx(1e-3)


def test_resume_after_a_stop_equals_an_uninterrupted_run(tree, tmp_path, caplog):
  """Stopped at step 4, the latest checkpoint damaged on disk: the run resumes from step 2, bit-identical."""
  config = tiny_config(tree, profile_steps=1)  # profiling changes nothing
  straight, straight_eval = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  assert int(straight.step) == 6  # 48 // 16 steps per epoch x 2 epochs
  traces = list((tmp_path / "straight" / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0

  stopped, _ = trainer.train_and_evaluate(config, str(tmp_path / "resumed"), interrupt_at_step=4)
  assert int(stopped.step) == 4
  checkpoints = tmp_path / "resumed" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]
  for data in (checkpoints / "4" / "default" / "d").iterdir():
    data.write_bytes(b"\0" * 64)  # a damaged disk
  with caplog.at_level(logging.WARNING):
    resumed, resumed_eval = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  assert len(warnings) == 1 and f"{checkpoints / '4'} is unreadable" in warnings[0], warnings
  assert "\n" not in warnings[0] and "using the step before it" in warnings[0]
  assert [p.name for p in checkpoints.iterdir() if p.name.startswith("4.unreadable.")]  # kept, not deleted

  assert_trees_equal(resumed, straight)  # params, batch_stats, AdamW moments and step: bit for bit
  assert resumed_eval == straight_eval
  assert straight_eval["count"] == NUM_CLASSES * VAL_PER_CLASS
  # Running the finished command again only re-evaluates the final checkpoint.
  _, again = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  assert again == straight_eval


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tree, tmp_path, monkeypatch):
  config = tiny_config(tree, **{"optim.lr": 1e30, "optim.lr_batch_size": 16, "schedule.warmup_epochs": 0,
                                "checkpoint_every_steps": 1, "eval_every_epochs": 2})
  monkeypatch.chdir(tmp_path)  # a relative workdir, as `--workdir out` gives (orbax wants absolute paths)
  with pytest.raises(FloatingPointError, match="non-finite training loss at step") as error:
    trainer.train_and_evaluate(config, "run")
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  ckpt = checkpointing.Checkpointer("run", 1, 3)
  latest = ckpt.latest_step()
  ckpt.close()
  assert latest == bad_step - 1
  assert f"last good checkpoint is step {latest}" in str(error.value)


def test_eval_counts_every_example_once(tree):
  """Batch 4 = one row per device over 15 examples (the other tests use batches of 8 and 12)."""
  config = tiny_config(tree)
  mesh = parallel.make_mesh()
  model = model_lib.from_config(config.model, NUM_CLASSES)
  variables = model.init_variables(jax.random.key(0), 32)
  eval_step = trainer.shard_eval_step(trainer.make_eval_step(model), mesh)
  spec = input_pipeline.DataSpec.from_config(config.data)
  result = trainer.evaluate_batches(eval_step, variables, input_pipeline.eval_batches(spec, 4), mesh)
  assert result["count"] == NUM_CLASSES * VAL_PER_CLASS
  assert 0.0 <= result["top1"] <= result["top5"] <= 100.0


def test_train_steps_on_a_tfds_dataset_and_evaluates_its_9_images_in_one_batch(tmp_path, monkeypatch,
                                                                               tiny_tfds_array_record_dir):
  # A real prepared TFDS dataset (array_record), with the recipe's erasing and mixup/cutmix (RandAugment,
  # slow to compile, is in test_augment).
  config = tiny_config(tiny_tfds_array_record_dir, **{"data.source": "tfds", "data.name": "cvt_tiny_shapes",
                                         "data.eval_split": "validation", "model.num_classes": 4,
                                         "num_epochs": 1, "schedule.warmup_epochs": 0,
                                         "eval_batch_size": 1024, "checkpoint_every_steps": 100})
  for key in ("erasing_prob", "mixup_alpha", "cutmix_alpha"):
    config.augment[key] = common.get_config().augment[key]
  eval_batches, batch_sizes = input_pipeline.eval_batches, []
  monkeypatch.setattr(input_pipeline, "eval_batches",
                      lambda spec, batch_size: batch_sizes.append(batch_size) or eval_batches(spec, batch_size))
  state, result = trainer.train_and_evaluate(config, str(tmp_path / "work"))
  assert int(state.step) == 22 // config.global_batch_size
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert result["count"] == 9  # every validation example
  assert batch_sizes == [12]  # 9 images on 4 devices: one batch of 12, not 1024 rows of which 1015 padding


def test_sigterm_sets_the_stop_flag_and_handlers_are_restored():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.StopFlag() as stop:
    assert not stop.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.is_set()
  assert signal.getsignal(signal.SIGTERM) is previous


def test_sharded_train_step_never_recompiles_or_transfers_to_the_host(tree):
  """Steady state of the real step on 4 devices: one trace, no implicit host<->device copies, no callbacks."""
  config = tiny_config(tree)
  config.augment.erasing_prob, config.augment.mixup_alpha, config.augment.cutmix_alpha = 0.25, 0.8, 1.0
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 4
  model = model_lib.from_config(config.model, NUM_CLASSES)
  schedule = optim.make_schedule(config.schedule, 1e-3, config.num_epochs, steps_per_epoch=3)
  tx = optim.make_optimizer(config.optim, schedule)
  state = trainer.create_train_state(model.init_variables(jax.random.key(0), 32), tx, mesh)
  step_fn = trainer.make_train_step(model, tx, schedule, config.augment, jax.random.key(1), shards=4)
  traces = []

  def counted_step(state, batch):
    traces.append(state.step)  # runs once per trace, i.e. per compilation
    return step_fn(state, batch)

  train_step = trainer.shard_train_step(counted_step, mesh)
  rng = np.random.default_rng(0)
  batches = [parallel.global_batch({"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                                    "label": rng.integers(0, NUM_CLASSES, 16).astype(np.int32)}, mesh)
             for _ in range(4)]
  assert "callback" not in train_step.lower(state, batches[0]).as_text()
  with jax.transfer_guard("disallow"):
    for batch in batches:
      state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
  assert len(traces) == 1
  assert int(jax.device_get(state.step)) == 4
  for leaf in jax.tree.leaves((state, metrics)):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4


def _image_collectives(shards: int) -> list[str]:
  """Collective ops that move image-shaped arrays (32 x 32 x 3, in whatever layout XLA gives them) in the
  train step's augmentation, compiled for 4 devices as the step runs it: the batch split over the devices on
  the way in and on the way out (into the model). The rest of the step moves no images."""
  config = tiny_config("unused")
  config.augment.mixup_alpha, config.augment.cutmix_alpha = 0.8, 1.0
  on_batch = parallel.batch_sharding(parallel.make_mesh())
  chain = jax.jit(lambda key, images, labels: augment.train_augment(
      key, images, labels, NUM_CLASSES, config.augment, shards), out_shardings=on_batch)
  batch = [jax.ShapeDtypeStruct((16, 32, 32, 3), np.uint8, sharding=on_batch),
           jax.ShapeDtypeStruct((16,), np.int32, sharding=on_batch)]
  hlo = chain.lower(jax.random.key(1), *batch).compile().as_text()
  collective = re.compile(r"= \w+\[([\d,]+)\]\S* (collective-permute|all-to-all|all-gather|all-reduce|"
                          r"reduce-scatter)(-start)?\(")
  return [line.strip() for line in hlo.splitlines()
          if (match := collective.search(line)) and _holds_images(tuple(map(int, match[1].split(","))))]


def _holds_images(shape: tuple[int, ...]) -> bool:
  return shape.count(32) >= 2 and 3 in shape


def test_mixup_and_cutmix_never_move_images_between_devices():
  """Per-device mixing (the official per-GPU behaviour); mixing the global batch would permute it."""
  assert not _image_collectives(shards=4)
  assert any("collective-permute" in line for line in _image_collectives(shards=1))
