"""Fused softmax attention for TPUs (Pallas): the scores never leave the core's VMEM.

CvT's keys and values come from a stride-2 projection, so a head's whole K and V are short (784 rows for
CvT-13 @224 stage 0, 2,304 at 384) and fit VMEM next to a block of queries. Each grid step takes one
block of queries of one (image, head), computes its scores against every key, the softmax and the
output; the backward pass recomputes the scores of its block (a few FLOPs, no traffic) and accumulates the
key and value gradients in VMEM over the query blocks. Memory traffic is q, k, v and o once, against
several passes over the (queries x keys) scores in XLA's formulation (bench/README.md).

The queries are split into blocks of a size that divides their count (3136 = 14 x 224), or padded to
whole blocks and the padded rows dropped; keys and values are not padded. Numerics follow
`ops.attention`'s 'plain' formulation: scores, softmax and accumulation in fp32, the probabilities
cast to the operands' dtype for the second product. Tested against it in Pallas's TPU interpret mode on
CPU (tests/test_ops.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

# Fewer keys, and a head's scores per query take less memory than its q row padded to the TPU's 128 lanes
# (CvT-13 stage 2: 50 keys, 64 dims): XLA's own attention then moves fewer bytes than this kernel's copies.
MIN_KEYS = 128
# A block of queries is at most this many scores: each of the backward pass's five (queries x keys) fp32
# temporaries is then 1 MiB of VMEM.
BLOCK_SCORES = 2**18
PADDED_BLOCK_Q = 128


def block_q(queries: int, keys: int) -> int:
  """Query rows per block: the largest multiple of 16 (bf16's sublane tile) that divides `queries` within
  `BLOCK_SCORES`, else `PADDED_BLOCK_Q` (the queries are then padded)."""
  largest = min(512, BLOCK_SCORES // keys) // 16 * 16
  return next((b for b in range(largest, 63, -16) if queries % b == 0), PADDED_BLOCK_Q)


def _probabilities(q: jax.Array, k: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """(exp(s - max s), its row sums) for one block of scores s = q k^T * scale."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  weights = jnp.exp(s - s.max(axis=1, keepdims=True))
  return weights, weights.sum(axis=1, keepdims=True)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *, scale: float):
  weights, sums = _probabilities(q_ref[...], k_ref[...], scale)
  out = jnp.dot(weights.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32) / sums
  o_ref[...] = out.astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, dq_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                     scale: float):
  @pl.when(pl.program_id(2) == 0)
  def _():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  weights, sums = _probabilities(q, k, scale)
  p = weights / sums
  dv_acc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  rows = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1, keepdims=True)
  ds = (p * (dp - rows) * scale).astype(q.dtype)
  dq_ref[...] = jnp.dot(ds, k, preferred_element_type=jnp.float32).astype(dq_ref.dtype)
  dk_acc[...] += jnp.dot(ds.T, q, preferred_element_type=jnp.float32)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _specs(q: jax.Array, k: jax.Array) -> tuple[tuple[int, int, int], pl.BlockSpec, pl.BlockSpec]:
  """The grid over (batch, heads, query blocks) and the blocks of the (batch, heads, sequence, head_dim)
  arrays: a block of queries, and one head's whole K or V."""
  b, h, nq, d = q.shape
  rows = block_q(nq, k.shape[2])
  return ((b, h, nq // rows), pl.BlockSpec((None, None, rows, d), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, k.shape[2], d), lambda b, h, i: (b, h, 0, 0)))


def _cost(q: jax.Array, k: jax.Array, arrays: int, matmuls: int) -> pl.CostEstimate:
  """What XLA's cost analysis counts for the call: `arrays` q-sized and as many k-sized arrays read or
  written once, `matmuls` (queries x keys x head_dim) products."""
  b, h, nq, d = q.shape
  nk = k.shape[2]
  return pl.CostEstimate(flops=2 * matmuls * b * h * nq * nk * d, transcendentals=b * h * nq * nk,
                         bytes_accessed=arrays * (q.size + k.size) * q.dtype.itemsize)


def _forward(q, k, v, scale: float, interpret: bool) -> jax.Array:
  grid, q_spec, kv_spec = _specs(q, k)
  return pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=grid,
      in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
      cost_estimate=_cost(q, k, arrays=2, matmuls=2), interpret=interpret, name="cvt_attention_fwd",
  )(q, k, v)


def _backward(q, k, v, o, do, scale: float, interpret: bool):
  grid, q_spec, kv_spec = _specs(q, k)
  accumulator = pltpu.VMEM(k.shape[2:], jnp.float32)
  return pl.pallas_call(
      functools.partial(_backward_kernel, scale=scale),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=grid, in_specs=[q_spec, kv_spec, kv_spec, q_spec, q_spec], out_specs=(q_spec, kv_spec, kv_spec),
      scratch_shapes=[accumulator, accumulator],
      # The query blocks of one head accumulate its dk and dv: that grid axis runs in order.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(q, k, arrays=4, matmuls=5), interpret=interpret, name="cvt_attention_bwd",
  )(q, k, v, o, do)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, scale: float, interpret: bool) -> jax.Array:
  return _forward(q, k, v, scale, interpret)


def _attention_fwd(q, k, v, scale, interpret):
  o = _forward(q, k, v, scale, interpret)
  return o, (q, k, v, o)


def _attention_bwd(scale, interpret, residuals, do):
  return _backward(*residuals, do, scale, interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def splits_here() -> bool:
  """Whether the fused kernel can run in the program being traced. XLA cannot partition a Pallas kernel, so
  over several devices it needs the mesh to split the batch over (`jax.sharding.use_abstract_mesh`, which
  `cvt_jax.parallel.traced_on` sets); a step jitted with shardings but no such mesh gets XLA's attention."""
  return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, interpret: bool = False) -> jax.Array:
  """softmax(q k^T * scale) v for q (B, Nq, H, D), k and v (B, Nk, H, D) -> (B, Nq, H, D), fused.

  Under a mesh (`jax.sharding.use_abstract_mesh`) the batch is split over all of its axes with shard_map:
  XLA cannot partition a Pallas kernel itself. `interpret` runs the kernels on any backend (tests).
  """
  nq, block = q.shape[1], block_q(q.shape[1], k.shape[1])
  heads_first = lambda x: x.transpose(0, 2, 1, 3)

  def padded(q, k, v):
    rows = -(-nq // block) * block
    q = jnp.pad(heads_first(q), ((0, 0), (0, 0), (0, rows - nq), (0, 0)))
    return heads_first(_attention(q, heads_first(k), heads_first(v), scale, interpret)[:, :, :nq])

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return padded(q, k, v)
  batch = P(mesh.axis_names)
  return jax.shard_map(padded, mesh=mesh, in_specs=(batch, batch, batch), out_specs=batch,
                       check_vma=False)(q, k, v)
