"""The compute kernels of CvT's layers, in four formulations chosen once per model.

`'plain'`: the textbook formulation differentiated by JAX: a grouped (`feature_group_count`) convolution for
the depthwise q/k/v projections, `lax.dot_general` for the linear layers and the patch embeddings' convs,
softmax-then-matmul attention. This is what GPUs run, and what the cost model of TPU compiles sees as
ordinary XLA.

`'cpu'`: formulations with hand-written gradients, tuned for XLA:CPU (profiles and A/B measurements in
bench/LOG.md): the depthwise conv as nine fused shifted slices whose backward pass stores only the input,
attention that scales q and normalises the output instead of the scores, the strided patch embeddings as
patches @ kernel, and weight gradients that transpose the narrower GEMM operand. Same forward numbers as
'plain' to ~1e-7 relative; `tests/test_ops.py` checks both values and gradients against 'plain'.

`'tpu'`: 'plain' with attention over many keys as one fused Pallas kernel per pass
(`cvt_jax.ops_pallas`): the (queries x keys) scores stay in the core's memory, where XLA's
softmax-then-matmul reads and writes them several times over in HBM (otherwise the largest part of a TPU
training step's modelled traffic).

`'onnx'`: 'plain' with attention as two heads-first batched matmuls, for `cvt_jax.export_onnx`: jax2onnx
turns `jnp.einsum` into ONNX Einsum nodes, which ONNX Runtime ran at less than half the speed of the MatMul
nodes it makes of these (docs/serving.md). The model's LayerNorms change with it (`cvt_jax.model`).

`resolve_kernels` picks 'cpu' for CPU devices, 'tpu' for TPUs and 'plain' otherwise. Callers that compile
for other devices than the default backend's (a TPU topology compiled on a CPU host) pass the target
platform. The fused kernel needs the mesh it splits the batch over when a step spans several devices:
traced without one (a user's own `jax.jit` with shardings), 'tpu' attention is XLA's (docs/python_api.md
shows how to keep the kernel).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from cvt_jax import ops_pallas

Kernels = Literal["plain", "cpu", "tpu", "onnx"]
KERNEL_CHOICES = ("auto", "plain", "cpu", "tpu", "onnx")
Padding = tuple[tuple[int, int], tuple[int, int]]


def resolve_kernels(kernels: str, platform: str | None = None) -> Kernels:
  """'auto' -> 'cpu' on CPU, 'tpu' on TPU and 'plain' on GPU (platform None: the default backend's)."""
  if kernels not in KERNEL_CHOICES:
    raise ValueError(f"kernels={kernels!r}; use one of {KERNEL_CHOICES}.")
  if kernels != "auto":
    return kernels
  return {"cpu": "cpu", "tpu": "tpu"}.get(platform or jax.default_backend(), "plain")


# ---------------------------------------------------------------------------------- linear layers --


def dense_dot_general(kernels: Kernels) -> Callable[..., jax.Array] | None:
  """The `dot_general` for `nn.Dense`: None (lax's) for 'plain', `matmul`'s gradient for 'cpu'."""
  return _dense_dot_general if kernels == "cpu" else None


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel, contracting x's last axis, with `_kernel_grad` as the kernel's gradient."""
  return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g):
  x, kernel = residuals
  return jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ()))), _kernel_grad(x, g)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """sum over the leading axes of outer(x, g): the gradient of the kernel of x @ kernel.

  XLA:CPU's GEMMs contract the minor axis of their left operand, so one operand is transposed first, in a
  loop fused with whatever produced it. JAX's own rule always transposes g; the narrower of x and g moves
  less memory.
  """
  leading = tuple(range(x.ndim - 1))
  if x.shape[-1] <= g.shape[-1]:
    return jax.lax.dot_general(x, g, ((leading, leading), ((), ())))
  return jax.lax.dot_general(g, x, ((leading, leading), ((), ()))).T


def _dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                       preferred_element_type: Any = None) -> jax.Array:
  """`lax.dot_general` as `nn.Dense` calls it (last axis of lhs with the kernel's first), via `matmul`."""
  if (dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None
      or preferred_element_type is not None):
    raise ValueError(f"matmul supports only nn.Dense's contraction, got {dimension_numbers}, "
                     f"precision={precision}, preferred_element_type={preferred_element_type}.")
  return matmul(lhs, rhs)


# -------------------------------------------------------------------------- patch-embedding convs --


def patch_conv(kernels: Kernels) -> Callable[..., jax.Array] | None:
  """The `conv_general_dilated` for the patch embeddings' `nn.Conv`: None (lax's) or `conv_as_matmul`."""
  return conv_as_matmul if kernels == "cpu" else None


def conv_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides: tuple[int, int], padding: Padding,
                   **unused) -> jax.Array:
  """NHWC x HWIO convolution as patches @ kernel, with `lax.conv_general_dilated`'s signature.

  XLA:CPU computes the kernel gradient of the strided patch-embedding convs far slower than the same
  GEMM (bench/README.md), so the forward and the kernel gradient are GEMMs over the patches. Only the
  arguments `nn.Conv` passes for a plain strided conv are supported.
  """
  if unused.get("feature_group_count", 1) != 1 or unused.get("precision") is not None or any(
      d not in (None, 1, (1, 1)) for d in (unused.get("lhs_dilation"), unused.get("rhs_dilation"))):
    raise ValueError("conv_as_matmul supports neither grouped nor dilated convolutions, nor a precision.")
  return _strided_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


def _window(padded: jax.Array, i: int, j: int, strides: tuple[int, int], out_hw: tuple[int, int]) -> jax.Array:
  """padded[:, i::sh, j::sw] cropped to out_hw: the inputs of kernel tap (i, j) of a strided NHWC conv."""
  (sh, sw), (out_h, out_w) = strides, out_hw
  return padded[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]


def _patches(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int], padding: Padding) -> jax.Array:
  """(B, out_h, out_w, kh * kw * C) windows of x, in the HWI order of an HWIO kernel."""
  (kh, kw), (sh, sw), ((top, bottom), (left, right)) = kernel_hw, strides, padding
  _, h, w, _ = x.shape
  out_hw = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  return jnp.concatenate([_window(padded, i, j, strides, out_hw) for i in range(kh) for j in range(kw)],
                         axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
  return _strided_conv_fwd(x, kernel, strides, padding)[0]


def _strided_conv_fwd(x, kernel, strides, padding):
  kh, kw, cin, cout = kernel.shape
  patches = _patches(x, (kh, kw), strides, padding)
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout)), (x, patches, kernel)


def _strided_conv_bwd(strides, padding, residuals, g):
  # dx as XLA's transposed convolution, not as the patches' transpose (nine padded copies of the patch
  # gradient summed): XLA fused that loop with the transposed copy the next weight gradient needs; the
  # convolution's output is transposed in a plain copy.
  x, patches, kernel = residuals
  conv = lambda x_: jax.lax.conv_general_dilated(x_, kernel, strides, padding,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  dx, = jax.linear_transpose(conv, x)(g)
  return dx, _kernel_grad(patches, g).reshape(kernel.shape)


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


# ----------------------------------------------------------------------------- depthwise 3x3 conv --


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, stride: int, kernels: Kernels) -> jax.Array:
  """3x3 depthwise convolution with symmetric padding 1, NHWC input, HWIO kernel (3, 3, 1, C)."""
  if kernels == "cpu":
    return _depthwise_shift(x, kernel, stride)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _shifted_sum(padded: jax.Array, kernel: jax.Array, stride: int, out_hw: tuple[int, int]) -> jax.Array:
  """sum_ij kernel[i, j] * padded[:, i::stride, j::stride] cropped to out_hw: one fused elementwise loop."""
  out = None
  for i in range(3):
    for j in range(3):
      term = _window(padded, i, j, (stride, stride), out_hw) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _pad1(x: jax.Array) -> jax.Array:
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Nine shifted, strided slices summed: XLA:CPU fuses them into one loop, faster than its grouped conv."""
  _, h, w, _ = x.shape
  return _shifted_sum(_pad1(x), kernel, stride, ((h - 1) // stride + 1, (w - 1) // stride + 1))


def _depthwise_shift_fwd(x, kernel, stride):
  return _depthwise_shift(x, kernel, stride), (x, kernel)


def _depthwise_shift_bwd(stride, residuals, g):
  # Autodiff of the slices saves nine shifted copies of x for the backward pass and adds nine padded
  # copies of g; this keeps only x and makes each gradient one fused loop (or reduction) again.
  x, kernel = residuals
  _, h, w, _ = x.shape
  _, out_h, out_w, _ = g.shape
  # dx: g dilated by the stride, correlated with the flipped kernel (the transposed convolution).
  zero = jnp.zeros((), g.dtype)
  dilated = jax.lax.pad(g, zero, ((0, 0, 0), (1, h - stride * (out_h - 1), stride - 1),
                                  (1, w - stride * (out_w - 1), stride - 1), (0, 0, 0)))
  dx = _shifted_sum(dilated, kernel[::-1, ::-1], 1, (h, w))
  padded = _pad1(x)
  dkernel = jnp.stack([
      jnp.sum(_window(padded, i, j, (stride, stride), (out_h, out_w)) * g, axis=(0, 1, 2), dtype=jnp.float32)
      for i in range(3) for j in range(3)])
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


# -------------------------------------------------------------------------------------- attention --


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, kernels: Kernels) -> jax.Array:
  """softmax(q k^T * scale) v with q (B, Nq, H, D), k and v (B, Nk, H, D) -> (B, Nq, H, D).

  Scores and softmax in fp32 whatever the compute dtype.
  """
  if kernels == "cpu":
    return _attention_cpu(q, k, v, scale)
  if kernels == "tpu" and k.shape[1] >= ops_pallas.MIN_KEYS and ops_pallas.splits_here():
    return ops_pallas.attention(q, k, v, scale)
  if kernels == "onnx":
    q, k, v = _heads_first(q) * scale, _heads_first(k), _heads_first(v)
    scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    out = jnp.matmul(jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
    return _heads_first(out)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _heads_first(x: jax.Array) -> jax.Array:
  """(B, N, H, D) <-> (B, H, N, D)."""
  return x.transpose(0, 2, 1, 3)


def _attention_parts(scaled_q: jax.Array, k: jax.Array,
                     v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(output, unnormalised probabilities exp(s - max s), their row sums), s = scaled_q k^T, all (B, H, N, ...).

  Heads-first operands keep the (B, H, Nq, Nk) scores and their row statistics in row-major layout; with
  tokens-first operands XLA:CPU transposed the 3136 x 784 stage-0 scores before the second matmul.
  Scaling q instead of the scores and normalising the (B, H, Nq, D) output instead of the probabilities saves
  two more passes over the scores; the rounding differs from softmax-then-matmul by ~1e-7 relative.
  """
  scores = jnp.einsum("bhqd,bhkd->bhqk", scaled_q, k, preferred_element_type=jnp.float32)
  weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
  sums = weights.sum(axis=-1, keepdims=True)
  weights = weights.astype(scaled_q.dtype)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v, preferred_element_type=jnp.float32) / sums
  return out.astype(scaled_q.dtype), weights, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  return _attention_cpu_fwd(q, k, v, scale)[0]


def _attention_cpu_fwd(q, k, v, scale):
  scaled_q, k, v = _heads_first(q) * scale, _heads_first(k), _heads_first(v)
  out, weights, sums = _attention_parts(scaled_q, k, v)
  return _heads_first(out), (scaled_q, k, v, weights, sums, out)


def _attention_cpu_bwd(scale, residuals, g):
  # With P = weights / sums: dv = P^T g = weights^T (g / sums), and the softmax backward
  # P * (g v^T - rowsum(g * out)) = weights * (g' v^T - rowsum(g' * out)) with g' = g / sums, so the
  # probabilities are never normalised. rowsum(g * out) reduces over D instead of over the Nk keys.
  scaled_q, k, v, weights, sums, out = residuals
  g = (_heads_first(g) / sums).astype(scaled_q.dtype)
  dv = jnp.einsum("bhqk,bhqd->bhkd", weights, g)
  dweights = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=jnp.float32)
  rows = jnp.einsum("bhqd,bhqd->bhq", g, out, preferred_element_type=jnp.float32)[..., None]
  dscores = (weights * (dweights - rows)).astype(scaled_q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", dscores, k) * scale
  dk = jnp.einsum("bhqk,bhqd->bhkd", dscores, scaled_q)
  return _heads_first(dq), _heads_first(dk), _heads_first(dv)


_attention_cpu.defvjp(_attention_cpu_fwd, _attention_cpu_bwd)
