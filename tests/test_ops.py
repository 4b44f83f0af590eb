"""cvt_jax.ops: the 'cpu' kernels (custom VJPs, conv as matmul) and the 'tpu' one (fused attention) against
the 'plain' formulations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from cvt_jax import model
from cvt_jax import ops
from cvt_jax import ops_pallas


def _plain_depthwise(x, kernel, stride):
  """The slice formulation left to autodiff: the reference for the custom VJP."""
  _, h, w, _ = x.shape
  out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
             * kernel[i, j, 0] for i in range(3) for j in range(3))


def _plain_attention(q, k, v, scale):
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def _assert_grads_close(f_ref, f_new, args, atol):
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # non-linear, so every output element matters
  np.testing.assert_allclose(f_new(*args), f_ref(*args), atol=atol, rtol=0)
  argnums = tuple(range(len(args)))
  for ref, new in zip(jax.grad(loss(f_ref), argnums)(*args), jax.grad(loss(f_new), argnums)(*args)):
    np.testing.assert_allclose(new, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_depthwise_custom_vjp_matches_autodiff(stride, hw):
  x = jax.random.normal(jax.random.key(0), (2, *hw, 5))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 5))
  _assert_grads_close(lambda a, b: _plain_depthwise(a, b, stride),
                      lambda a, b: ops.depthwise_conv3x3(a, b, stride, "cpu"), (x, kernel), 1e-5)


def test_attention_custom_vjp_matches_autodiff():
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (2, 11, 3, 4))
  k, v = (jax.random.normal(key, (2, 6, 3, 4)) for key in keys[1:])
  _assert_grads_close(lambda *a: _plain_attention(*a, 0.3), lambda *a: ops.attention(*a, 0.3, "cpu"), (q, k, v),
                      1e-5)


@pytest.mark.parametrize("in_features,out_features", [(4, 6), (6, 4)])  # both kernel-gradient forms
def test_matmul_custom_vjp_matches_autodiff(in_features, out_features):
  x = jax.random.normal(jax.random.key(5), (2, 7, in_features))
  kernel = jax.random.normal(jax.random.key(6), (in_features, out_features))
  _assert_grads_close(jnp.dot, ops.matmul, (x, kernel), 1e-5)


def test_dense_rejects_contractions_matmul_does_not_implement():
  dense = nn.Dense(3, precision=jax.lax.Precision.HIGHEST, dot_general=ops.dense_dot_general("cpu"))
  with pytest.raises(ValueError, match="nn.Dense's contraction"):
    dense.init(jax.random.key(0), jnp.ones((2, 4)))


@pytest.mark.parametrize("kernel_size,stride,padding", [(7, 4, 2), (3, 2, 1)])
def test_conv_as_matmul_matches_lax_conv(kernel_size, stride, padding):
  x = jax.random.normal(jax.random.key(3), (2, 17, 15, 3))
  kernel = jax.random.normal(jax.random.key(4), (kernel_size, kernel_size, 3, 8))
  pads = ((padding, padding),) * 2

  def lax_conv(a, b):
    return jax.lax.conv_general_dilated(a, b, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  _assert_grads_close(lax_conv, lambda a, b: ops.conv_as_matmul(a, b, (stride, stride), pads), (x, kernel),
                      1e-4)


def test_conv_as_matmul_rejects_grouped_convs():
  with pytest.raises(ValueError, match="grouped"):
    ops.conv_as_matmul(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2)), (1, 1), ((1, 1), (1, 1)),
                         feature_group_count=2)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_depthwise_plain_and_cpu_agree(stride, size):
  x = jax.random.normal(jax.random.key(1), (2, size, size + 1, 5))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 1, 5))
  plain = ops.depthwise_conv3x3(x, kernel, stride, "plain")
  assert plain.shape == (2, (size - 1) // stride + 1, size // stride + 1, 5)
  _assert_grads_close(lambda a, b: ops.depthwise_conv3x3(a, b, stride, "plain"),
                      lambda a, b: ops.depthwise_conv3x3(a, b, stride, "cpu"), (x, kernel), 1e-5)


def test_attention_plain_and_cpu_agree():
  keys = jax.random.split(jax.random.key(7), 2)
  q = jax.random.normal(keys[0], (2, 11, 3, 4))
  k, v = jax.random.normal(keys[1], (2, 2, 6, 3, 4))
  _assert_grads_close(lambda *a: ops.attention(*a, 0.3, "plain"), lambda *a: ops.attention(*a, 0.3, "cpu"),
                      (q, k, v), 1e-5)


@pytest.mark.parametrize("shapes", [((2, 11, 3, 4), (2, 6, 3, 4)), ((2, 224, 1, 8), (2, 56, 1, 8))])
def test_fused_attention_matches_plain(shapes):
  """The Pallas kernels in Pallas's TPU interpret mode: padded query blocks (11 rows) and exact ones
  (224 = 2 x 112)."""
  keys = jax.random.split(jax.random.key(8), 3)
  q = jax.random.normal(keys[0], shapes[0])
  k, v = (jax.random.normal(key, shapes[1]) for key in keys[1:])
  with pltpu.force_tpu_interpret_mode():
    _assert_grads_close(lambda *a: ops.attention(*a, 0.3, "plain"),
                        lambda *a: ops_pallas.attention(*a, 0.3), (q, k, v), 1e-5)


@pytest.mark.parametrize("kernels", ["cpu", "tpu"])
def test_a_cvt_computes_the_same_with_every_kernel_formulation(kernels, monkeypatch):
  """The whole model, logits and every parameter gradient, against 'plain' (GPUs); 'tpu' in Pallas's TPU
  interpret mode, with the fused kernel in every stage (the cls token's too), however few its keys."""
  monkeypatch.setattr(ops_pallas, "MIN_KEYS", 1)
  variant = model.make_variant("tiny", (8, 16, 24), (1, 1, 2), (1, 2, 3), 0.0)
  images = jax.random.normal(jax.random.key(3), (2, 40, 40, 3))
  models = {k: model.CvT.from_variant(variant, num_classes=5, kernels=k) for k in ("plain", kernels)}
  variables = models["plain"].init_variables(jax.random.key(4), 40)

  def loss(m):
    return lambda params: jnp.sum(jnp.sin(m.apply({**variables, "params": params}, images)))

  one_device = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  with pltpu.force_tpu_interpret_mode(), jax.set_mesh(one_device):
    values = {k: jax.jit(jax.value_and_grad(loss(m)))(variables["params"]) for k, m in models.items()}
  np.testing.assert_allclose(values[kernels][0], values["plain"][0], rtol=1e-5)
  for path, plain in jax.tree_util.tree_flatten_with_path(values["plain"][1])[0]:
    other = jax.tree_util.tree_flatten_with_path(values[kernels][1])[0]
    got = dict((jax.tree_util.keystr(p), x) for p, x in other)[jax.tree_util.keystr(path)]
    np.testing.assert_allclose(got, plain, atol=2e-5 * float(np.abs(plain).max()) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_auto_picks_each_platforms_kernels():
  assert ops.resolve_kernels("auto", "cpu") == "cpu"
  assert ops.resolve_kernels("auto", "tpu") == "tpu" and ops.resolve_kernels("auto", "gpu") == "plain"
  assert ops.resolve_kernels("plain", "cpu") == "plain"
  with pytest.raises(ValueError, match="kernels='fast'"):
    ops.resolve_kernels("fast")
