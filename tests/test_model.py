"""Model structure, model facts (params, MACs), initialisation and train/eval behaviour."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_jax import complexity
from cvt_jax import model as model_lib
from cvt_jax import trees
from cvt_jax.model import CvT
from cvt_jax.model import _layer_norm
from cvt_jax.model import get_variant
from cvt_jax.model import make_variant

TINY = make_variant("tiny", dims=(16, 32, 48), depths=(1, 1, 2), heads=(1, 2, 3), drop_path_rate=0.5)


@pytest.fixture(scope="module")
def tiny_variables():
  return CvT.from_variant(TINY, num_classes=10).init_variables(jax.random.key(0), image_size=64)


@pytest.mark.parametrize("variant,classes,expected", [
    ("cvt-13", 1000, 19_997_480), ("cvt-21", 1000, 31_622_696), ("cvt-w24", 1000, 277_196_392),
    ("cvt-13", 21841, 28_021_265), ("cvt-21", 21841, 39_646_481), ("cvt-w24", 21841, 298_558_417),
])
def test_param_counts_equal_official(variant, classes, expected):
  assert complexity.count_params(variant, classes) == expected


def test_no_head_drops_exactly_the_head():
  assert complexity.count_params("cvt-13", 0) == 19_997_480 - (384 * 1000 + 1000)


@pytest.mark.parametrize("variant,res,gmacs", [
    ("cvt-13", 224, 4.566), ("cvt-13", 384, 16.27), ("cvt-21", 224, 7.178), ("cvt-21", 384, 24.85),
    ("cvt-w24", 224, 60.92), ("cvt-w24", 384, 194.2),
])
def test_macs_match_paper_within_half_percent(variant, res, gmacs):
  assert complexity.count_macs(variant, res) / 1e9 == pytest.approx(gmacs, rel=5e-3)


def test_variant_names_are_forgiving_and_errors_are_clear():
  assert get_variant("CvT_W24").name == "cvt-w24"
  with pytest.raises(ValueError, match="cvt-13"):
    get_variant("cvt-99")


@pytest.mark.parametrize("res,grids", [(224, (56, 28, 14)), (384, (96, 48, 24))])
def test_stage_grids_and_features(res, grids):
  model = CvT.from_variant("cvt-13")
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, res, res, 3)))
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), variables,
                         jnp.zeros((2, res, res, 3)))
  for i, (grid, dim) in enumerate(zip(grids, (64, 192, 384))):
    assert feats[f"stage{i}"].shape == (2, grid, grid, dim)
  assert feats["cls"].shape == (2, 384)


def test_init_follows_official_distributions(tiny_variables):
  flat = flax.traverse_util.flatten_dict(tiny_variables["params"], sep="/")
  linear = [k for k in flat if ("/attn/proj" in k or "/mlp/" in k)]
  dense = np.concatenate([np.ravel(flat[k]) for k in linear if k.endswith("kernel")])
  assert np.std(dense) == pytest.approx(0.02, rel=0.05)
  head_bias, bound = flat["head/bias"], 1 / np.sqrt(48)
  assert np.all(np.abs(head_bias) <= bound) and np.max(np.abs(head_bias)) > 0.5 * bound
  embed = flat["stages_0/patch_embed/proj/kernel"]  # fan_in 3 * 7 * 7
  assert np.max(np.abs(embed)) <= 1 / np.sqrt(147) and np.max(np.abs(embed)) > 0.9 / np.sqrt(147)
  dw = flat["stages_1/blocks_0/attn/conv_proj_q/conv/kernel"]
  assert dw.shape == (3, 3, 1, 32) and np.max(np.abs(dw)) <= 1 / 3
  assert np.all(flat["stages_1/blocks_0/norm1/scale"] == 1) and np.all(flat["norm/bias"] == 0)
  assert np.std(flat["stages_2/cls_token"]) == pytest.approx(0.02, rel=0.5)
  assert all(np.all(flat[k] == 0) for k in linear if k.endswith("bias"))


def test_layernorm_uses_pytorch_eps(tiny_variables):
  # With a variance of 1e-6 per token, eps 1e-5 and Flax's default 1e-6 give outputs ~3x apart.
  x = jnp.full((1, 4, 4, 16), 3.0) + 1e-3 * jax.random.normal(jax.random.key(0), (1, 4, 4, 16))
  mean, var = jnp.mean(x, -1, keepdims=True), jnp.var(x, -1, keepdims=True)
  expected = (x - mean) / jnp.sqrt(var + 1e-5)
  got = _layer_norm("n", "plain").apply({"params": {"scale": jnp.ones(16), "bias": jnp.zeros(16)}}, x)
  np.testing.assert_allclose(got, expected, atol=1e-4)


def _train_apply(model: CvT):
  """The model in training mode, jitted (op by op, a CvT compiles each of its hundreds of ops apart)."""
  return jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"drop_path": key}))


def test_eval_is_deterministic_and_train_updates_batch_stats(tiny_variables):
  model = CvT.from_variant(TINY, num_classes=10)
  x = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))
  apply = jax.jit(model.apply)
  a = apply(tiny_variables, x)
  np.testing.assert_array_equal(a, apply(tiny_variables, x))
  out, updates = _train_apply(model)(tiny_variables, x, jax.random.key(0))
  assert out.shape == (4, 10)
  moved = jax.tree_util.tree_map(lambda n, o: float(jnp.max(jnp.abs(n - o))), updates["batch_stats"],
                                 tiny_variables["batch_stats"])
  assert min(jax.tree_util.tree_leaves(moved)) > 0


def test_drop_path_is_random_per_sample_in_training(tiny_variables):
  model = CvT.from_variant(TINY, num_classes=10)
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (1, 64, 64, 3)), (8, 64, 64, 3))

  train = _train_apply(model)
  out = train(tiny_variables, x, jax.random.key(1))[0]
  assert len({tuple(np.round(row, 4)) for row in np.asarray(out)}) > 1  # same images, different masks
  assert not np.allclose(out, train(tiny_variables, x, jax.random.key(2))[0])
  no_drop = CvT.from_variant(TINY, num_classes=10, drop_path_rate=0.0)
  same = _train_apply(no_drop)(tiny_variables, x, jax.random.key(1))[0]
  np.testing.assert_allclose(same[0], same[1], atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_logits(tiny_variables):
  model = CvT.from_variant(TINY, num_classes=10, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
  logits = jax.jit(model.apply)(tiny_variables, x)
  assert logits.dtype == jnp.float32
  reference = jax.jit(CvT.from_variant(TINY, num_classes=10).apply)(tiny_variables, x)
  np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.max(jnp.abs(reference))) + 0.02)


def test_no_head_returns_normed_cls_embedding(tiny_variables):
  model = CvT.from_variant(TINY, num_classes=0)
  variables = {"params": {k: v for k, v in tiny_variables["params"].items() if k != "head"},
               "batch_stats": tiny_variables["batch_stats"]}
  emb = jax.jit(model.apply)(variables, jnp.ones((2, 64, 64, 3)))
  assert emb.shape == (2, 48)
  np.testing.assert_allclose(jnp.mean(emb, -1), 0, atol=1e-5)  # LayerNorm output, unit scale, zero bias


def test_scanned_blocks_compute_the_unrolled_model_on_stacked_variables(tiny_variables):
  flat = trees.flatten(jax.device_get(tiny_variables))
  stacked = model_lib.blocks_layout(flat, scanned=True)
  scanned = CvT.from_variant(TINY, num_classes=10, scan_blocks=True)
  images = jnp.zeros((1, 64, 64, 3))
  trees.check(trees.shapes(trees.flatten(jax.eval_shape(scanned.init, jax.random.key(0), images))),
              trees.shapes(stacked), "scanned CvT")
  assert stacked["params/stages_2/blocks/mlp/fc1/kernel"].shape == (2, 48, 192)
  assert model_lib.is_scanned(stacked) and not model_lib.is_scanned(flat)
  back = model_lib.blocks_layout(stacked, scanned=False)
  assert back.keys() == flat.keys() and all(np.array_equal(back[k], flat[k]) for k in flat)
  assert model_lib.blocks_layout(stacked, scanned=True).keys() == stacked.keys()  # already in that layout

  x = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))
  unrolled = jax.jit(CvT.from_variant(TINY, num_classes=10).apply)(tiny_variables, x)
  logits = jax.jit(scanned.apply)(trees.unflatten(stacked), x)
  np.testing.assert_allclose(logits, unrolled, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(unrolled))))
  same = jnp.broadcast_to(x[:1], (8, 64, 64, 3))  # drop path (a traced rate per block) still per sample
  out = _train_apply(scanned)(trees.unflatten(stacked), same, jax.random.key(1))[0]
  assert len({tuple(np.round(row, 4)) for row in np.asarray(out)}) > 1
