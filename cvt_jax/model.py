"""CvT (Convolutional vision Transformer) in Flax linen, numerically faithful to microsoft/CvT.

The module names mirror the official PyTorch model (`stage{s}.blocks.{b}.attn.conv_proj_q.bn`, ...), so
that the weight converter is a renaming plus layout transposes. Images are NHWC, normalised with the
ImageNet mean/std; every stage works on tokens in row-major order (h outer, w inner) like the original.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
DepthwiseImpl = Literal["auto", "conv", "shift"]


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of the official `SPEC`: conv token embedding followed by `depth` blocks."""

  dim: int
  depth: int
  heads: int
  patch_size: int
  patch_stride: int
  patch_padding: int
  cls_token: bool
  drop_path_rate: float


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named CvT architecture (the official yaml `MODEL.SPEC`)."""

  name: str
  stages: tuple[StageSpec, StageSpec, StageSpec]


def make_variant(name: str, dims: tuple[int, int, int], depths: tuple[int, int, int],
                 heads: tuple[int, int, int], drop_path_rate: float) -> Variant:
  """A CvT with the official patch embeddings (k7s4, k3s2, k3s2) and a cls token in the last stage."""
  patches = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
  stages = tuple(
      StageSpec(dim=d, depth=n, heads=h, patch_size=k, patch_stride=s, patch_padding=p,
                cls_token=(i == 2), drop_path_rate=drop_path_rate if i == 2 else 0.0)
      for i, (d, n, h, (k, s, p)) in enumerate(zip(dims, depths, heads, patches)))
  return Variant(name, stages)


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        make_variant("cvt-13", (64, 192, 384), (1, 2, 10), (1, 3, 6), 0.1),
        make_variant("cvt-21", (64, 192, 384), (1, 4, 16), (1, 3, 6), 0.1),
        make_variant("cvt-w24", (192, 768, 1024), (2, 2, 20), (3, 12, 16), 0.3),
    )
}


def get_variant(name: str | Variant) -> Variant:
  """Looks a variant up by name ('cvt-13', 'CvT-21', 'cvt_w24', ...); a `Variant` passes through."""
  if isinstance(name, Variant):
    return name
  key = name.lower().replace("_", "-")
  if key not in VARIANTS:
    raise ValueError(f"Unknown CvT variant {name!r}; choose one of {sorted(VARIANTS)}.")
  return VARIANTS[key]


# Initialisers of the official model (PyTorch defaults where the official code keeps them).
_trunc_normal_002 = nn.initializers.normal(stddev=0.02)  # timm truncates at +-2 absolute: no-op at std 0.02.


def _torch_default_uniform(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def quick_gelu(x: jax.Array) -> jax.Array:
  # The official CvT uses CLIP's QuickGELU, not erf/tanh GELU (Hugging Face's port gets this wrong).
  return x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(name: str) -> nn.Module:
  """LayerNorm with PyTorch's eps 1e-5 (Flax defaults to 1e-6), computed in fp32.

  Two-pass variance like PyTorch: Flax's fast E[x^2] - E[x]^2 loses precision when |mean| >> std.
  """
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                      name=name)


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
  less memory (bench/README.md, fourth round).
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


class Dense(nn.Dense):
  """nn.Dense with the official trunc-normal(0.02) weight init, zero bias, and `matmul`'s gradient."""

  kernel_init: Callable[..., jax.Array] = _trunc_normal_002
  dot_general: Callable[..., jax.Array] = _dense_dot_general


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (timm's DropPath)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("drop_path"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def default_depthwise_impl() -> Literal["conv", "shift"]:
  """The faster depthwise-conv formulation on the default backend (see bench/ for the measurements)."""
  return "shift" if jax.default_backend() == "cpu" else "conv"


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, stride: int, impl: DepthwiseImpl) -> jax.Array:
  """3x3 depthwise convolution with symmetric padding 1, NHWC input, HWIO kernel (3, 3, 1, C).

  'conv' lowers to one grouped convolution; 'shift' sums nine shifted, strided slices, which XLA:CPU
  fuses into one elementwise loop and runs (and differentiates) faster than its grouped-conv kernel.
  """
  impl = default_depthwise_impl() if impl == "auto" else impl
  if impl == "conv":
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
  if impl != "shift":
    raise ValueError(f"Unknown depthwise implementation {impl!r}; use 'auto', 'conv' or 'shift'.")
  return _depthwise_shift(x, kernel, stride)


def _window(padded: jax.Array, i: int, j: int, strides: tuple[int, int], out_hw: tuple[int, int]) -> jax.Array:
  """padded[:, i::sh, j::sw] cropped to out_hw: the inputs of kernel tap (i, j) of a strided NHWC conv."""
  (sh, sw), (out_h, out_w) = strides, out_hw
  return padded[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]


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


class DepthwiseConv(nn.Module):
  """Bias-free 3x3 depthwise conv (official `conv_proj_*.conv`), parameter `kernel` (3, 3, 1, C)."""

  stride: int
  impl: DepthwiseImpl = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _torch_default_uniform(9), (3, 3, 1, x.shape[-1]), jnp.float32)
    return depthwise_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.impl)


class ConvProjection(nn.Module):
  """The 'dw_bn' projection: depthwise conv, then BatchNorm (fp32), no activation."""

  stride: int
  impl: DepthwiseImpl = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid: jax.Array, train: bool) -> jax.Array:
    y = DepthwiseConv(self.stride, self.impl, self.dtype, name="conv")(grid)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                     param_dtype=jnp.float32, use_fast_variance=False, name="bn")(y)
    return y.astype(self.dtype)


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
def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v with q (B, Nq, H, D), k and v (B, Nk, H, D) -> (B, Nq, H, D).

  Softmax statistics in fp32. The backward pass is written out (see `_attention_bwd`).
  """
  return _attention_fwd(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale):
  scaled_q, k, v = _heads_first(q) * scale, _heads_first(k), _heads_first(v)
  out, weights, sums = _attention_parts(scaled_q, k, v)
  return _heads_first(out), (scaled_q, k, v, weights, sums, out)


def _attention_bwd(scale, residuals, g):
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


attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nn.Module):
  """Multi-head attention whose q/k/v come from convolutional projections of the token grid."""

  dim: int
  heads: int
  cls_token: bool
  depthwise_impl: DepthwiseImpl = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: tuple[int, int], train: bool) -> jax.Array:
    b, _, c = x.shape
    h, w = grid_hw
    # The cls token bypasses the convolutional projection and is prepended to q, k and v afterwards.
    cls, tokens = (x[:, :1], x[:, 1:]) if self.cls_token else (None, x)
    grid = tokens.reshape(b, h, w, c)

    def project(name: str, stride: int) -> jax.Array:
      y = ConvProjection(stride, self.depthwise_impl, self.dtype, name=f"conv_proj_{name}")(grid, train)
      y = y.reshape(b, -1, c)
      if cls is not None:
        y = jnp.concatenate([cls.astype(y.dtype), y], axis=1)
      y = Dense(self.dim, dtype=self.dtype, name=f"proj_{name}")(y)
      return y.reshape(b, -1, self.heads, self.dim // self.heads)

    q, k, v = project("q", 1), project("k", 2), project("v", 2)
    # Official scale is dim_out ** -0.5 with the full stage width, not head_dim ** -0.5.
    out = attention(q, k, v, self.dim**-0.5).reshape(b, -1, self.dim)
    return Dense(self.dim, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  """fc1 (C -> 4C), QuickGELU, fc2 (4C -> C)."""

  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Dense(4 * self.dim, dtype=self.dtype, name="fc1")(x)
    return Dense(self.dim, dtype=self.dtype, name="fc2")(quick_gelu(x))


class Block(nn.Module):
  """Pre-norm transformer block; one drop-path rate for both residual branches."""

  dim: int
  heads: int
  cls_token: bool
  drop_path_rate: float
  depthwise_impl: DepthwiseImpl = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: tuple[int, int], train: bool) -> jax.Array:
    drop_path = DropPath(self.drop_path_rate, name="drop_path")
    y = _layer_norm("norm1")(x).astype(self.dtype)
    y = Attention(self.dim, self.heads, self.cls_token, self.depthwise_impl, self.dtype, name="attn")(
        y, grid_hw, train)
    x = x + drop_path(y, train)
    y = _layer_norm("norm2")(x).astype(self.dtype)
    return x + drop_path(Mlp(self.dim, self.dtype, name="mlp")(y), train)


def conv_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]], **unused) -> jax.Array:
  """NHWC x HWIO convolution as patches @ kernel, with `lax.conv_general_dilated`'s signature.

  XLA:CPU computes the kernel gradient of the strided patch-embedding convs ~10x slower than the same
  GEMM (5.8 s of a 70 s CvT-13 training step at batch 32), so the forward and the kernel gradient are
  GEMMs over the patches. Only the arguments `nn.Conv` passes for a plain strided conv are supported.
  """
  if unused.get("feature_group_count", 1) != 1 or unused.get("precision") is not None or any(
      d not in (None, 1, (1, 1)) for d in (unused.get("lhs_dilation"), unused.get("rhs_dilation"))):
    raise ValueError("conv_as_matmul supports neither grouped nor dilated convolutions, nor a precision.")
  return _strided_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


def _patches(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """(B, out_h, out_w, kh * kw * C) windows of x, in the HWI order of an HWIO kernel."""
  (kh, kw), (sh, sw), ((top, bottom), (left, right)) = kernel_hw, strides, padding
  _, h, w, _ = x.shape
  out_hw = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  return jnp.concatenate([_window(padded, i, j, strides, out_hw) for i in range(kh) for j in range(kw)],
                         axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                  padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  return _strided_conv_fwd(x, kernel, strides, padding)[0]


def _strided_conv_fwd(x, kernel, strides, padding):
  kh, kw, cin, cout = kernel.shape
  patches = _patches(x, (kh, kw), strides, padding)
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout)), (x, patches, kernel)


def _strided_conv_bwd(strides, padding, residuals, g):
  # dx as XLA's transposed convolution, not as the patches' transpose (nine padded copies of the patch
  # gradient summed): a loop XLA fused with the transposed copy the next weight gradient needs, 0.3 s
  # per training step at batch 32 on CPU; the convolution's output is transposed in a plain copy.
  x, patches, kernel = residuals
  conv = lambda x_: jax.lax.conv_general_dilated(x_, kernel, strides, padding,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  dx, = jax.linear_transpose(conv, x)(g)
  return dx, _kernel_grad(patches, g).reshape(kernel.shape)


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


class ConvEmbed(nn.Module):
  """Overlapping conv token embedding (conv with bias, explicit symmetric padding) + LayerNorm."""

  dim: int
  patch_size: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1] * self.patch_size**2
    # Explicit padding: XLA's 'SAME' pads strided convs asymmetrically and changes the numbers.
    x = nn.Conv(self.dim, (self.patch_size, self.patch_size), strides=self.stride,
                padding=((self.padding, self.padding),) * 2, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=_torch_default_uniform(fan_in), bias_init=_torch_default_uniform(fan_in),
                conv_general_dilated=conv_as_matmul if jax.default_backend() == "cpu" else None,
                name="proj")(x)
    return _layer_norm("norm")(x).astype(self.dtype)


class Stage(nn.Module):
  """ConvEmbed -> tokens (+ cls token) -> blocks -> (grid NHWC, cls token or None)."""

  spec: StageSpec
  drop_path_rate: float
  depthwise_impl: DepthwiseImpl = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    s = self.spec
    grid = ConvEmbed(s.dim, s.patch_size, s.patch_stride, s.patch_padding, self.dtype, name="patch_embed")(x)
    b, h, w, c = grid.shape
    tokens = grid.reshape(b, h * w, c)
    if s.cls_token:
      cls = self.param("cls_token", _trunc_normal_002, (1, 1, c), jnp.float32)
      tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(self.dtype), tokens], axis=1)
    rates = np.linspace(0.0, self.drop_path_rate, s.depth)
    for i in range(s.depth):
      tokens = Block(s.dim, s.heads, s.cls_token, float(rates[i]), self.depthwise_impl, self.dtype,
                     name=f"blocks_{i}")(tokens, (h, w), train)
    cls_out = tokens[:, 0] if s.cls_token else None
    grid = (tokens[:, 1:] if s.cls_token else tokens).reshape(b, h, w, c)
    return grid, cls_out


class CvT(nn.Module):
  """Convolutional vision Transformer.

  Attributes:
    variant: a name from `VARIANTS` ('cvt-13', 'cvt-21', 'cvt-w24') or a custom `Variant`.
    num_classes: head size; 0 returns the final-normed cls embedding instead of logits.
    drop_path_rate: stochastic depth of the last stage; None takes the variant's official rate.
    depthwise_impl: 'auto' picks the faster depthwise-conv formulation for the backend.
    dtype: compute dtype (e.g. bfloat16). Parameters, norms, softmax and logits stay in fp32.
  """

  variant: str | Variant = "cvt-13"
  num_classes: int = 1000
  drop_path_rate: float | None = None
  depthwise_impl: DepthwiseImpl = "auto"
  dtype: Dtype = jnp.float32

  def setup(self):
    specs = get_variant(self.variant).stages
    self.stages = [
        Stage(s, s.drop_path_rate if self.drop_path_rate is None or i < 2 else self.drop_path_rate,
              self.depthwise_impl, self.dtype)
        for i, s in enumerate(specs)
    ]
    self.norm = _layer_norm("norm")
    if self.num_classes:
      dim = specs[-1].dim
      self.head = Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                        bias_init=_torch_default_uniform(dim))

  def features(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Backbone outputs: 'stage0'..'stage2' NHWC grids (strides 4, 8, 16) and 'cls' (B, C), un-normed."""
    out = {}
    x = images.astype(self.dtype)
    cls = None
    for i, stage in enumerate(self.stages):
      x, cls = stage(x, train)
      out[f"stage{i}"] = x
    out["cls"] = cls
    return out

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits (fp32) of NHWC images; the final-normed cls embedding when num_classes == 0."""
    pre_logits = self.norm(self.features(images, train)["cls"])
    return self.head(pre_logits) if self.num_classes else pre_logits

  @classmethod
  def from_variant(cls, name: str | Variant, num_classes: int = 1000, **kwargs) -> "CvT":
    """`CvT.from_variant('cvt-21', num_classes=10, dtype=jnp.bfloat16)`."""
    get_variant(name)
    return cls(variant=name, num_classes=num_classes, **kwargs)

  def init_variables(self, rng: jax.Array, image_size: int = 224) -> dict[str, Any]:
    """Initialises `params` and `batch_stats` without running a real forward pass."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(self.init)(rng, dummy)
