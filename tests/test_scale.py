"""The switches that trade compute or communication for memory give the plain step's numbers (4 CPU devices).

model.remat (recompute each block in the backward pass), optim.grad_accum_steps (micro-batches), and fsdp
(parameters and AdamW moments split over the devices, restorable onto another device count).
"""

import jax
import numpy as np
import pytest
from test_train import NUM_CLASSES
from test_train import colour_image
from test_train import tiny_config

from cvt_jax import checkpointing
from cvt_jax import model as model_lib
from cvt_jax import optim
from cvt_jax import parallel
from cvt_jax import train_lib

# Summed in another order (per micro-batch, reduce-scattered), a near-zero gradient's rounding differs, and
# AdamW's normalisation makes that a difference of up to a few percent of one update (lr 1e-3).
UPDATE_ROUNDING = 3e-5


def _step_config(**overrides):
  config = tiny_config("unused", **{"model.drop_path_rate": 0.0, **overrides})
  config.augment.label_smoothing = 0.1
  return config


def _run(config, batch, steps: int = 2, mesh=None):
  """`steps` train steps of `config` on `batch` from the same initial state: (losses, final state)."""
  mesh = mesh or parallel.make_mesh()
  model = model_lib.from_config(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config.optim, lambda step: 1e-3)
  state = train_lib.create_train_state(model.init_variables(jax.random.key(0), 32), tx, mesh, config.fsdp)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = train_lib.shard_train_step(train_lib.make_train_step(
      model, tx, lambda step: 1e-3, NUM_CLASSES, config.augment, jax.random.key(1), mesh.size,
      config.optim.grad_accum_steps), mesh, shardings)
  batch = parallel.global_batch(batch, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state)


def _batch(repeat_within_shards: int = 1) -> dict[str, np.ndarray]:
  """16 images over 4 devices; with `repeat_within_shards` k, each device's rows are k copies of a block."""
  per_device = 4 // repeat_within_shards
  labels = np.tile((np.arange(4 * per_device) % NUM_CLASSES).reshape(4, 1, per_device),
                   (1, repeat_within_shards, 1)).reshape(-1)
  images = np.stack([colour_image(np.random.default_rng(int(i) * 7 + 1), int(l), 32)
                     for i, l in zip(np.tile(np.arange(per_device), 4 * repeat_within_shards), labels)])
  return {"image": images, "label": labels.astype(np.int32)}


def _assert_close(a, b, rtol=2e-5, atol=1e-6):
  """Equal up to fp32 rounding, relative to each array's scale. The key projections' biases are left out:
  softmax ignores a shift shared by all keys, so their gradient is zero in exact arithmetic and only
  rounding noise, which AdamW's normalisation then blows up to the size of an update."""
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    if "proj_k" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=max(rtol * float(np.abs(np.asarray(y)).max()), atol),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_plain_step(remat):
  plain_losses, plain = _run(_step_config(), _batch())
  losses, state = _run(_step_config(**{"model.remat": remat}), _batch())
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
  _assert_close(state, plain)


def test_gradient_accumulation_gives_the_plain_step_for_micro_batches_of_equal_statistics():
  """Each micro-batch is normalised with its own BatchNorm statistics: identical micro-batches (every
  device's rows repeat twice) make those the whole batch's, and the step equals the plain one."""
  batch = _batch(repeat_within_shards=2)
  plain_losses, plain = _run(_step_config(), batch)
  losses, state = _run(_step_config(**{"optim.grad_accum_steps": 2}), batch)
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  _assert_close(state, plain, rtol=1e-4, atol=UPDATE_ROUNDING)
  # On ordinary batches it is a different step (per-micro-batch statistics), but a close one.
  other_losses, _ = _run(_step_config(**{"optim.grad_accum_steps": 2}), _batch(), steps=1)
  assert other_losses[0] == pytest.approx(_run(_step_config(), _batch(), steps=1)[0][0], rel=0.05)


def test_fsdp_gives_the_replicated_step_and_restores_onto_fewer_devices(tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, "FSDP_MIN_SIZE", 256)  # the tiny model's arrays are all small
  plain_losses, plain = _run(_step_config(), _batch())
  config = _step_config(fsdp=True)
  losses, state = _run(config, _batch())
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
  _assert_close(state, plain, atol=UPDATE_ROUNDING)

  mesh4 = parallel.make_mesh()
  model = model_lib.from_config(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config.optim, lambda step: 1e-3)
  sharded = train_lib.create_train_state(model.init_variables(jax.random.key(0), 32), tx, mesh4, fsdp=True)
  big = [x for x in jax.tree.leaves(sharded) if x.size >= parallel.FSDP_MIN_SIZE]
  assert big and all(not x.sharding.is_fully_replicated for x in big)
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 1)
  ckpt.save(1, sharded)
  ckpt.close()
  mesh2 = parallel.make_mesh(jax.devices()[:2])
  target = train_lib.create_train_state(model.init_variables(jax.random.key(5), 32), tx, mesh2, fsdp=True)
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
