"""CvT (Convolutional vision Transformer) in Flax linen, numerically faithful to microsoft/CvT.

The module names mirror the official PyTorch model (`stage{s}.blocks.{b}.attn.conv_proj_q.bn`, ...), so
that the weight converter is a renaming plus layout transposes. Images are NHWC, normalised with the
ImageNet mean/std (`normalize`); every stage works on tokens in row-major order (h outer, w inner) like the
original.
The layers' arithmetic comes from `cvt_jax.ops` in the formulation named by `kernels`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Any, Callable, Literal, Mapping, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvt_jax import ops
from cvt_jax import trees

Dtype = Any
Remat = Literal["none", "block", "dots"]
REMAT_CHOICES: tuple[str, ...] = get_args(Remat)

# The model's input contract: RGB in [0, 255] normalised with the ImageNet mean and std.
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


def normalize(images: jax.Array, channel_axis: int = -1) -> jax.Array:
  """uint8 images -> float32 with the ImageNet mean/std (channels on `channel_axis`)."""
  shape = [1] * images.ndim
  shape[channel_axis] = 3
  mean = jnp.asarray(MEAN_RGB, jnp.float32).reshape(shape) * 255
  inv_std = 1 / (jnp.asarray(STD_RGB, jnp.float32).reshape(shape) * 255)
  return (images.astype(jnp.float32) - mean) * inv_std


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

  @property
  def architecture(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(dims, depths, heads) per stage."""
    return tuple(tuple(getattr(s, a) for s in self.stages) for a in ("dim", "depth", "heads"))

  def describe(self) -> str:
    """'cvt-13 (dims (64, 192, 384), depths (1, 2, 10), heads (1, 3, 6))'."""
    dims, depths, heads = self.architecture
    return f"{self.name} (dims {dims}, depths {depths}, heads {heads})"

  def to_json(self) -> dict[str, Any]:
    """The description stored with converted weights and in a workdir's model_info.json."""
    dims, depths, heads = self.architecture
    return {"variant": self.name, "dims": list(dims), "depths": list(depths), "heads": list(heads),
            "drop_path_rate": self.stages[-1].drop_path_rate}

  @classmethod
  def from_json(cls, info: dict[str, Any]) -> Variant:
    """Inverse of `to_json`: the named variant when the architecture is one, else a custom one."""
    return variant_from_architecture(info["variant"], info["dims"], info["depths"], info["heads"],
                                     info.get("drop_path_rate", 0.1))


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


def variant_from_architecture(name: str, dims, depths, heads, drop_path_rate: float = 0.1) -> Variant:
  """The named variant with this architecture if there is one, else a custom `make_variant`."""
  arch = (tuple(dims), tuple(depths), tuple(heads))
  for variant in VARIANTS.values():
    if variant.architecture == arch:
      return variant
  return make_variant(name, *arch, drop_path_rate)


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


def _layer_norm(name: str, kernels: ops.Kernels) -> nn.Module:
  """LayerNorm with PyTorch's eps 1e-5 (Flax defaults to 1e-6), computed in fp32.

  Two-pass variance like PyTorch: Flax's fast E[x^2] - E[x]^2 loses precision when |mean| >> std. The
  'onnx' kernels ask for the fast one because jax2onnx then writes the layer as one ONNX LayerNormalization
  (whose runtime computes the variance itself), and only then: otherwise as a dozen elementwise nodes that
  ONNX Runtime does not fuse (docs/serving.md).
  """
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                      use_fast_variance=kernels == "onnx", name=name)


def _dense(features: int, kernels: ops.Kernels, dtype: Dtype, name: str, **kwargs: Any) -> nn.Dense:
  """Linear layer with the official trunc-normal(0.02) weight init and zero bias."""
  return nn.Dense(features, dtype=dtype, kernel_init=_trunc_normal_002,
                  dot_general=ops.dense_dot_general(kernels), name=name, **kwargs)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (timm's DropPath).

  The rate is a call argument: a Python float, or a traced scalar in blocks under `nn.scan`.
  """

  @nn.compact
  def __call__(self, x: jax.Array, rate: float | jax.Array, train: bool) -> jax.Array:
    if not train or (isinstance(rate, float) and rate == 0.0):
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng("drop_path"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class DepthwiseConv(nn.Module):
  """Bias-free 3x3 depthwise conv (official `conv_proj_*.conv`) in x's dtype, `kernel` (3, 3, 1, C)."""

  stride: int
  kernels: ops.Kernels

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _torch_default_uniform(9), (3, 3, 1, x.shape[-1]), jnp.float32)
    return ops.depthwise_conv3x3(x, kernel.astype(x.dtype), self.stride, self.kernels)


class BatchNorm(nn.Module):
  """PyTorch's `BatchNorm2d` (eps 1e-5, momentum 0.1) over the last axis, in fp32, with Flax's variable names.

  Training normalises with the batch's biased variance, but the running variance averages the unbiased
  one (times n / (n - 1), n values per channel), as PyTorch's does; Flax's `nn.BatchNorm` averages the
  biased one, which on a small grid (2 x 2 at the last stage of a 32 px CvT) is a few percent lower.
  """

  momentum: float = 0.1  # PyTorch's convention: the weight of the new batch

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    x = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)  # two-pass, as PyTorch
      if not self.is_initializing():
        n = x.size // features
        m = self.momentum
        running_mean.value = m * mean + (1 - m) * running_mean.value
        running_var.value = m * (var * (n / max(n - 1, 1))) + (1 - m) * running_var.value
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias


class ConvProjection(nn.Module):
  """The 'dw_bn' projection: depthwise conv, then BatchNorm (fp32), no activation."""

  stride: int
  kernels: ops.Kernels
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid: jax.Array, train: bool) -> jax.Array:
    y = DepthwiseConv(self.stride, self.kernels, name="conv")(grid.astype(self.dtype))
    return BatchNorm(name="bn")(y, train).astype(self.dtype)


class Attention(nn.Module):
  """Multi-head attention whose q/k/v come from convolutional projections of the token grid."""

  spec: StageSpec
  kernels: ops.Kernels
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: tuple[int, int], train: bool) -> jax.Array:
    b, _, c = x.shape
    h, w = grid_hw
    dim, heads = self.spec.dim, self.spec.heads
    # The cls token bypasses the convolutional projection and is prepended to q, k and v afterwards.
    cls, tokens = (x[:, :1], x[:, 1:]) if self.spec.cls_token else (None, x)
    grid = tokens.reshape(b, h, w, c)

    def project(name: str, stride: int) -> jax.Array:
      y = ConvProjection(stride, self.kernels, self.dtype, name=f"conv_proj_{name}")(grid, train)
      y = y.reshape(b, -1, c)
      if cls is not None:
        y = jnp.concatenate([cls.astype(y.dtype), y], axis=1)
      y = _dense(dim, self.kernels, self.dtype, f"proj_{name}")(y)
      return y.reshape(b, -1, heads, dim // heads)

    q, k, v = project("q", 1), project("k", 2), project("v", 2)
    # Official scale is dim_out ** -0.5 with the full stage width, not head_dim ** -0.5.
    out = ops.attention(q, k, v, dim**-0.5, self.kernels).reshape(b, -1, dim)
    return _dense(dim, self.kernels, self.dtype, "proj")(out)


class Mlp(nn.Module):
  """fc1 (C -> 4C), QuickGELU, fc2 (4C -> C)."""

  dim: int
  kernels: ops.Kernels
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _dense(4 * self.dim, self.kernels, self.dtype, "fc1")(x)
    return _dense(self.dim, self.kernels, self.dtype, "fc2")(quick_gelu(x))


class Block(nn.Module):
  """Pre-norm transformer block of a stage; one drop-path rate for both residual branches."""

  spec: StageSpec
  kernels: ops.Kernels
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: tuple[int, int], train: bool,
               drop_path_rate: float | jax.Array) -> jax.Array:
    drop_path = DropPath(name="drop_path")
    y = _layer_norm("norm1", self.kernels)(x).astype(self.dtype)
    y = Attention(self.spec, self.kernels, self.dtype, name="attn")(y, grid_hw, train)
    x = x + drop_path(y, drop_path_rate, train)
    y = _layer_norm("norm2", self.kernels)(x).astype(self.dtype)
    return x + drop_path(Mlp(self.spec.dim, self.kernels, self.dtype, name="mlp")(y), drop_path_rate, train)


class ScanStep(Block):
  """`Block` as one step of `nn.scan` over a stage's blocks: returns (tokens, None)."""

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: tuple[int, int], train: bool,
               drop_path_rate: jax.Array) -> tuple[jax.Array, None]:
    return super().__call__(x, grid_hw, train, drop_path_rate), None


_REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                   "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _block_class(remat: Remat, scan: bool) -> type[Block]:
  """`Block` (`ScanStep` for `nn.scan`), or recomputed in the backward pass (keeping what the policy names)."""
  block = ScanStep if scan else Block
  if remat == "none":
    return block
  # static_argnums count `self`: grid_hw, train and (unless scanned) the drop-path rate are Python values.
  return nn.remat(block, static_argnums=(2, 3) if scan else (2, 3, 4), policy=_REMAT_POLICIES[remat])


class ConvEmbed(nn.Module):
  """Overlapping conv token embedding (conv with bias, explicit symmetric padding) + LayerNorm."""

  dim: int
  patch_size: int
  stride: int
  padding: int
  kernels: ops.Kernels
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1] * self.patch_size**2
    # Explicit padding: XLA's 'SAME' pads strided convs asymmetrically and changes the numbers.
    x = nn.Conv(self.dim, (self.patch_size, self.patch_size), strides=self.stride,
                padding=((self.padding, self.padding),) * 2, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=_torch_default_uniform(fan_in), bias_init=_torch_default_uniform(fan_in),
                conv_general_dilated=ops.patch_conv(self.kernels), name="proj")(x)
    return _layer_norm("norm", self.kernels)(x).astype(self.dtype)


class Stage(nn.Module):
  """ConvEmbed -> tokens (+ cls token) -> blocks -> (grid NHWC, cls token or None)."""

  spec: StageSpec
  drop_path_rate: float
  kernels: ops.Kernels
  dtype: Dtype = jnp.float32
  remat: Remat = "none"
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    s = self.spec
    grid = ConvEmbed(s.dim, s.patch_size, s.patch_stride, s.patch_padding, self.kernels, self.dtype,
                     name="patch_embed")(x)
    b, h, w, c = grid.shape
    tokens = grid.reshape(b, h * w, c)
    if s.cls_token:
      cls = self.param("cls_token", _trunc_normal_002, (1, 1, c), jnp.float32)
      tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(self.dtype), tokens], axis=1)
    rates = np.linspace(0.0, self.drop_path_rate, s.depth)
    if self.scan_blocks:
      blocks = nn.scan(_block_class(self.remat, scan=True), variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True, "drop_path": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0), length=s.depth)
      tokens, _ = blocks(s, self.kernels, self.dtype, name=SCANNED_BLOCKS)(
          tokens, (h, w), train, jnp.asarray(rates, jnp.float32))
    else:
      block = _block_class(self.remat, scan=False)
      for i in range(s.depth):
        tokens = block(s, self.kernels, self.dtype, name=f"blocks_{i}")(tokens, (h, w), train, float(rates[i]))
    cls_out = tokens[:, 0] if s.cls_token else None
    grid = (tokens[:, 1:] if s.cls_token else tokens).reshape(b, h, w, c)
    return grid, cls_out


class CvT(nn.Module):
  """Convolutional vision Transformer.

  Attributes:
    variant: a name from `VARIANTS` ('cvt-13', 'cvt-21', 'cvt-w24') or a custom `Variant`.
    num_classes: head size; 0 returns the final-normed cls embedding instead of logits.
    drop_path_rate: stochastic depth of the last stage; None takes the variant's official rate.
    kernels: the `cvt_jax.ops` formulation: 'auto' (the backend's: 'cpu', 'tpu' or, on GPUs, 'plain'), or one
      of them.
    dtype: compute dtype (e.g. bfloat16). Parameters, norms, softmax and logits stay in fp32.
    remat: recompute each block in the backward pass instead of storing its activations: 'block' keeps
      nothing but the block inputs, 'dots' also keeps the outputs of the linear layers; 'none' (default).
    scan_blocks: run each stage's blocks as one `nn.scan` loop, so that XLA compiles one block per stage
      (compile time); the blocks' variables are then stacked along a leading axis (`blocks_layout`).
  """

  variant: str | Variant = "cvt-13"
  num_classes: int = 1000
  drop_path_rate: float | None = None
  kernels: str = "auto"
  dtype: Dtype = jnp.float32
  remat: Remat = "none"
  scan_blocks: bool = False

  def setup(self):
    if self.remat not in REMAT_CHOICES:
      raise ValueError(f"remat={self.remat!r}; use one of {REMAT_CHOICES}.")
    specs = self.spec.stages
    kernels = ops.resolve_kernels(self.kernels)
    self.stages = [
        Stage(s, s.drop_path_rate if self.drop_path_rate is None or i < 2 else self.drop_path_rate,
              kernels, self.dtype, self.remat, self.scan_blocks)
        for i, s in enumerate(specs)
    ]
    self.norm = _layer_norm("norm", kernels)
    if self.num_classes:
      self.head = _dense(self.num_classes, kernels, jnp.float32, "head", param_dtype=jnp.float32,
                         bias_init=_torch_default_uniform(specs[-1].dim))

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

  @property
  def spec(self) -> Variant:
    """The architecture, whether `variant` names it or is it."""
    return get_variant(self.variant)

  @classmethod
  def from_variant(cls, name: str | Variant, num_classes: int = 1000, **kwargs) -> CvT:
    """`CvT.from_variant('cvt-21', num_classes=10, dtype=jnp.bfloat16)`; an unknown name fails here."""
    return cls(variant=get_variant(name), num_classes=num_classes, **kwargs)

  def init_variables(self, rng: jax.Array, image_size: int = 224) -> dict[str, Any]:
    """Initialises `params` and `batch_stats` without running a real forward pass."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(self.init)(rng, dummy)


@functools.lru_cache(maxsize=16)
def variable_shapes(variant: Variant, num_classes: int) -> dict[str, trees.Shape]:
  """Flat 'collection/module/.../leaf' -> shape of every variable of the model, without allocating it."""
  model = CvT.from_variant(variant, num_classes=num_classes)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)  # shapes do not depend on the resolution
  return trees.shapes(trees.flatten(jax.eval_shape(model.init, jax.random.key(0), images)))


SCANNED_BLOCKS = "blocks"  # a stage's blocks under nn.scan: one module whose arrays have a leading block axis
_UNROLLED_KEY = re.compile(r"^(.*/stages_\d+/)blocks_(\d+)/(.*)$")
_SCANNED_KEY = re.compile(rf"^(.*/stages_\d+/){SCANNED_BLOCKS}/(.*)$")


def is_scanned(flat: Mapping[str, Any]) -> bool:
  """Whether flat variables hold scanned (stacked) blocks."""
  return any(_SCANNED_KEY.match(key) for key in flat)


def blocks_layout(flat: Mapping[str, Any], scanned: bool) -> dict[str, Any]:
  """Flat variables (numpy) with every stage's blocks stacked into one scanned module (`scan_blocks`) or
  as the modules `blocks_0`, `blocks_1`, ... (the converter's layout, and that of every exported weight
  file); variables already in the asked layout pass through."""
  out: dict[str, Any] = {}
  stacked: dict[str, dict[int, Any]] = collections.defaultdict(dict)
  for key, value in flat.items():
    unrolled, scanned_key = _UNROLLED_KEY.match(key), _SCANNED_KEY.match(key)
    if scanned and unrolled:
      stacked[f"{unrolled[1]}{SCANNED_BLOCKS}/{unrolled[3]}"][int(unrolled[2])] = value
    elif not scanned and scanned_key:
      out.update({f"{scanned_key[1]}blocks_{i}/{scanned_key[2]}": block for i, block in enumerate(value)})
    else:
      out[key] = value
  out.update({key: np.stack([blocks[i] for i in sorted(blocks)]) for key, blocks in stacked.items()})
  return out


# --------------------------------------------------------------------- building from a config --

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str, platform: str | None = None) -> jnp.dtype:
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU (where bf16 matmuls are emulated and slow)."""
  if name == "auto":
    return jnp.float32 if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16
  if name not in _DTYPES:
    raise ValueError(f"model.dtype={name!r}; use 'auto' or one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


def variant_from_config(model_config: Any) -> Variant | None:
  """The official variant by name, a custom width when `dims`, `depths` and `heads` are all set, or None
  when `variant` is '' (the architecture of the checkpoint the run starts from)."""
  custom = (model_config.dims, model_config.depths, model_config.heads)
  if all(x is None for x in custom):
    return get_variant(model_config.variant) if model_config.variant else None
  if any(x is None for x in custom) or any(len(x) != 3 for x in custom):
    raise ValueError(f"model.dims/depths/heads={custom}: set all three, each with one value per stage.")
  if any(d % h for d, h in zip(model_config.dims, model_config.heads)):
    raise ValueError(f"model.dims={model_config.dims} must be divisible by model.heads={model_config.heads}.")
  return make_variant(model_config.variant, tuple(model_config.dims), tuple(model_config.depths),
                      tuple(model_config.heads), model_config.drop_path_rate or 0.0)


def from_config(model_config: Any, num_classes: int, platform: str | None = None,
                variant: Variant | None = None) -> CvT:
  """The CvT of a config's `model` block for devices of `platform` (None: the default backend's).

  `variant` overrides the config's architecture (a checkpoint that describes its own).
  """
  return CvT.from_variant(variant or variant_from_config(model_config), num_classes=num_classes,
                          dtype=compute_dtype(model_config.dtype, platform),
                          drop_path_rate=model_config.drop_path_rate,
                          kernels=ops.resolve_kernels(model_config.kernels, platform),
                          remat=model_config.get("remat", "none"),
                          scan_blocks=model_config.get("scan_blocks", False))
