"""The switches that trade compute or communication for memory give the plain step's numbers (4 CPU devices).

model.remat (recompute each block in the backward pass), model.scan_blocks (one loop per stage, for compile
time), optim.grad_accum_steps (micro-batches), and fsdp (parameters and optimiser state split over the
devices, restorable onto another device count).

The steps run SGD with momentum, not AdamW: AdamW divides each update by its gradient's running RMS, which
turns the rounding noise of a near-zero gradient (summed in another order by another program, or by
another instruction set: AVX2 and AVX-512 round differently) into an update as large as any other, so
AdamW's parameters agree only to within the learning rate. SGD's updates are linear in the gradients, so
the comparison below is to within the rounding of the gradients, relative to the size of the updates.
"""

import functools

import jax
import numpy as np
import pytest
from test_train import NUM_CLASSES
from test_train import colour_image
from test_train import tiny_config

from cvt_jax import checkpointing
from cvt_jax import model as model_lib
from cvt_jax import parallel
from cvt_jax import trees
from cvt_jax.train import optim
from cvt_jax.train import trainer

LR = 1e-2
# fp32 rounding of a gradient summed in another order, relative to the largest update of its array (an
# array of near-zero gradients, whose updates are rounding noise, is held to that of the largest update of
# the whole model).
ROUNDING = 2e-5


def _step_config(**overrides):
  config = tiny_config("unused", **{"model.drop_path_rate": 0.0, "optim.name": "sgd", **overrides})
  config.augment.label_smoothing = 0.1
  return config


def _initial_state(config, mesh):
  """The model, optimiser and train state of `config`; the same variables whether the blocks are scanned."""
  model = model_lib.from_config(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config.optim, lambda step: LR)
  variables = jax.device_get(model.clone(scan_blocks=False).init_variables(jax.random.key(0), 32))
  variables = _in_layout(variables, model.scan_blocks)
  return model, tx, trainer.create_train_state(variables, tx, mesh, config.fsdp)


def _in_layout(tree, scanned: bool):
  return trees.unflatten(model_lib.blocks_layout(trees.flatten(tree), scanned))


def _run(config, batch, steps: int = 2):
  """`steps` train steps of `config` on `batch` from the same initial state: (losses, grad norms, the
  parameter and BatchNorm updates)."""
  mesh = parallel.make_mesh()
  model, tx, state = _initial_state(config, mesh)
  before = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = trainer.shard_train_step(trainer.make_train_step(
      model, tx, lambda step: LR, config.augment, jax.random.key(1), shards=mesh.size,
      grad_accum_steps=config.optim.grad_accum_steps), mesh, shardings)
  batch = parallel.global_batch(batch, mesh)
  losses, norms = [], []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  after = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  return losses, norms, _in_layout(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, before),
                                   scanned=False)


def _batch(repeat_within_shards: int = 1) -> dict[str, np.ndarray]:
  """16 images over 4 devices; with `repeat_within_shards` k, each device's rows are k copies of a block."""
  per_device = 4 // repeat_within_shards
  labels = np.tile((np.arange(4 * per_device) % NUM_CLASSES).reshape(4, 1, per_device),
                   (1, repeat_within_shards, 1)).reshape(-1)
  images = np.stack([colour_image(np.random.default_rng(int(i) * 7 + 1), int(l), 32)
                     for i, l in zip(np.tile(np.arange(per_device), 4 * repeat_within_shards), labels)])
  return {"image": images, "label": labels.astype(np.int32)}


@functools.lru_cache(maxsize=None)
def _plain(repeat_within_shards: int = 1):
  """The plain step's run, shared by the tests (one compile)."""
  return _run(_step_config(), _batch(repeat_within_shards))


def _assert_same_updates(got, want, rounding=ROUNDING):
  largest = max(float(np.abs(u).max()) for u in jax.tree.leaves(want))
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    scale = max(float(np.abs(y).max()), largest * 1e-2)
    np.testing.assert_allclose(x, y, rtol=0, atol=rounding * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_plain_step(remat):
  plain_losses, plain_norms, plain = _plain()
  losses, norms, updates = _run(_step_config(**{"model.remat": remat}), _batch())
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
  np.testing.assert_allclose(norms, plain_norms, rtol=1e-5)
  _assert_same_updates(updates, plain)


@pytest.mark.parametrize("remat", ["none", "block"])
def test_scanned_blocks_give_the_plain_step(remat):
  """One nn.scan loop per stage (its variables stacked) computes the unrolled blocks' step."""
  plain_losses, plain_norms, plain = _plain()
  losses, norms, updates = _run(_step_config(**{"model.scan_blocks": True, "model.remat": remat}), _batch())
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
  np.testing.assert_allclose(norms, plain_norms, rtol=1e-5)
  _assert_same_updates(updates, plain)


def test_gradient_accumulation_gives_the_plain_step_for_micro_batches_of_equal_statistics():
  """Each micro-batch is normalised with its own BatchNorm statistics: identical micro-batches (every
  device's rows repeat twice) make those the whole batch's, and the step equals the plain one."""
  plain_losses, plain_norms, plain = _plain(repeat_within_shards=2)
  losses, norms, updates = _run(_step_config(**{"optim.grad_accum_steps": 2}), _batch(repeat_within_shards=2))
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, plain_norms, rtol=1e-4)
  # Each micro-batch summed apart, then added. The running variances take each micro-batch's unbiased
  # variance, n / (n - 1) times the biased one with a micro-batch's n (8 on the 1 x 1 grids of the last
  # stage) where the plain step's n is the whole batch's (16): over 2 steps at momentum 0.1 they differ by
  # up to 2 x 0.1 x (8/7 - 16/15) = 1.5 % of the variance, some 8 % of the largest update.
  part = lambda tree, variances: {k: v for k, v in trees.flatten(tree).items() if k.endswith("/var") == variances}
  _assert_same_updates(part(updates, False), part(plain, False), rounding=5 * ROUNDING)
  _assert_same_updates(part(updates, True), part(plain, True), rounding=0.15)
  # On ordinary batches it is a different step (per-micro-batch statistics), but a close one.
  other_losses, _, _ = _run(_step_config(**{"optim.grad_accum_steps": 2}), _batch(), steps=1)
  assert other_losses[0] == pytest.approx(_plain()[0][0], rel=0.05)


def test_fsdp_gives_the_replicated_step_and_restores_onto_fewer_devices(tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, "FSDP_MIN_SIZE", 256)  # the tiny model's arrays are all small
  plain_losses, plain_norms, plain = _plain()
  config = _step_config(fsdp=True)
  losses, norms, updates = _run(config, _batch())
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
  np.testing.assert_allclose(norms, plain_norms, rtol=1e-5)
  _assert_same_updates(updates, plain)

  _, _, sharded = _initial_state(config, parallel.make_mesh())
  big = [x for x in jax.tree.leaves(sharded) if x.size >= parallel.FSDP_MIN_SIZE]
  assert big and all(not x.sharding.is_fully_replicated for x in big)
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 1)
  ckpt.save(1, sharded)
  ckpt.close()
  _, _, target = _initial_state(config, parallel.make_mesh(jax.devices()[:2]))
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 1)
  step, restored = ckpt.restore_latest(target)
  ckpt.close()
  assert step == 1
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(sharded)):
    assert x.sharding.mesh.size == 2
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fsdp_splits_a_divisible_axis_and_keeps_small_arrays_whole():
  mesh = parallel.make_mesh()
  spec = jax.sharding.PartitionSpec
  assert parallel.fsdp_sharding((3, 3, 1, 2048), mesh).spec == spec(None, None, None, "data")
  assert parallel.fsdp_sharding((1536, 384), mesh).spec == spec("data")
  assert parallel.fsdp_sharding((384,), mesh).is_fully_replicated  # small
  assert parallel.fsdp_sharding((7, 9999), mesh).is_fully_replicated  # no axis divides
