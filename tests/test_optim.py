"""The official LR schedule and the AdamW weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cvt_jax import model as model_lib
from cvt_jax.train import optim

BASE = 2e-3


def official_lr(epoch: int) -> float:
  """timm cosine as configured by microsoft/CvT (spec section 3), per whole epoch."""
  if epoch < 5:
    return 1e-6 + epoch * (BASE - 1e-6) / 5
  return 1e-5 + 0.5 * (BASE - 1e-5) * (1 + math.cos(math.pi * epoch / 300))


def schedule_config(per_step: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, per_step=per_step))


@pytest.mark.parametrize("epoch", [0, 1, 4, 5, 150, 299])
def test_per_epoch_schedule_matches_official_formula(epoch):
  steps_per_epoch = 625  # ImageNet-1k at batch 2048
  schedule = optim.make_schedule(schedule_config(False), BASE, 300, steps_per_epoch)
  for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):
    np.testing.assert_allclose(float(schedule(step)), official_lr(epoch), rtol=1e-6)


def test_per_step_schedule_interpolates_within_epochs():
  schedule = optim.make_schedule(schedule_config(True), BASE, 300, 10)
  np.testing.assert_allclose(float(schedule(5)), 1e-6 + 0.5 * (BASE - 1e-6) / 5, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(1505)),
                             1e-5 + 0.5 * (BASE - 1e-5) * (1 + math.cos(math.pi * 150.5 / 300)), rtol=1e-6)
  assert float(schedule(3000)) == pytest.approx(1e-5)


def test_linear_lr_scaling():
  assert optim.scaled_lr(2e-3, 2048, 512) == pytest.approx(5e-4)


def test_decay_mask_matches_official_lists_for_cvt13():
  model = model_lib.CvT.from_variant("cvt-13")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  mask = optim.decay_mask(shapes)
  pairs = list(zip(jax.tree.leaves(mask), jax.tree.leaves(shapes)))
  decayed = [int(np.prod(s.shape)) for m, s in pairs if m]
  kept = [int(np.prod(s.shape)) for m, s in pairs if not m]
  assert (len(decayed), sum(decayed)) == (121, 19_911_936)
  assert (len(kept), sum(kept)) == (221, 85_544)
  flat = {"/".join(k.key for k in path): m for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["stages_0/blocks_0/attn/conv_proj_q/conv/kernel"]  # depthwise kernels are decayed
  assert not flat["stages_2/cls_token"]
  assert not flat["stages_1/blocks_0/attn/conv_proj_k/bn/scale"]
  assert not flat["norm/scale"] and not flat["head/bias"]


def test_adamw_decays_only_masked_tensors():
  config = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5))
  tx = optim.make_optimizer(config, lambda step: 0.1)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "cls_token": jnp.ones((1, 1, 2))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)  # lr * wd * param
  np.testing.assert_array_equal(new["dense"]["bias"], 1.0)
  np.testing.assert_array_equal(new["cls_token"], 1.0)
