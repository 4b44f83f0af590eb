"""`cvt_jax.aot.hlo`: kernels, their modelled bytes and FLOPs, and the parts of the model they belong to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_jax.aot import hlo

# A hand-written optimised module in the format of `compiled.as_text()`: a cuBLAS call with its workspace,
# a fusion that reads a slice of its operand, a TPU-tiled array, a loop of known trip count.
TEXT = "\n".join([
    'HloModule jit_step, is_scheduled=true',
    '',
    '%fused_slice (param_0: f32[64,128]) -> f32[8,128] {',
    '  %param_0 = f32[64,128]{1,0} parameter(0)',
    '  ROOT %slice.1 = f32[8,128]{1,0} slice(%param_0), slice={[0:8], [0:128]}',
    '}',
    '',
    '%fused_transpose (param_0.1: bf16[16,32]) -> bf16[32,16] {',
    '  %param_0.1 = bf16[16,32]{1,0} parameter(0)',
    '  ROOT %transpose.1 = bf16[32,16]{1,0} transpose(%param_0.1), dimensions={1,0}',
    '}',
    '',
    '%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {',
    '  %p = (s32[], f32[8,128]{1,0}) parameter(0)',
    '  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1',
    '  %i = s32[] get-tuple-element(%p), index=0',
    '  %neg = f32[8,128]{1,0} negate(%x)'
    ', metadata={op_name="jit(step)/transpose(jvp(CvT))/stages_0/blocks_0/mlp/fc1/neg"}',
    '  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %neg)',
    '}',
    '',
    '%cond (p.1: (s32[], f32[8,128])) -> pred[] {',
    '  %p.1 = (s32[], f32[8,128]{1,0}) parameter(0)',
    '  ROOT %c = pred[] constant(true)',
    '}',
    '',
    'ENTRY %main (a: bf16[256,384], b: bf16[384,1536], c: f32[64,128], d: bf16[16,32]) -> f32[8,128] {',
    '  %a = bf16[256,384]{1,0} parameter(0)',
    '  %b = bf16[384,1536]{1,0} parameter(1)',
    '  %c = f32[64,128]{1,0} parameter(2)',
    '  %d = bf16[16,32]{1,0} parameter(3)',
    '  %gemm = (bf16[256,1536]{1,0}, s8[33554432]{0}) custom-call(%a, %b)'
    ', custom_call_target="__cublas$lt$matmul"'
    ', metadata={op_name="jit(step)/jvp(CvT)/stages_2/blocks_3/attn/proj_q/dot_general"}'
    ', backend_config={"gemm_backend_config":{"dot_dimension_numbers":'
    '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}',
    '  %sliced = f32[8,128]{1,0} fusion(%c), kind=kLoop, calls=%fused_slice'
    ', metadata={op_name="jit(step)/augment/slice"}',
    '  %moved = bf16[32,16]{1,0} fusion(%d), kind=kLoop, calls=%fused_transpose'
    ', metadata={op_name="jit(step)/jvp(CvT)/stages_0/blocks_0/attn/transpose"}',
    '  %tiled = f32[4,3]{1,0:T(8,128)} negate(%sliced), metadata={op_name="jit(step)/optimizer/neg"}',
    '  %init = (s32[], f32[8,128]{1,0}) tuple(%sliced, %sliced)',
    '  %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body'
    ', backend_config={"known_trip_count":{"n":"4"}}',
    '  ROOT %out = f32[8,128]{1,0} get-tuple-element(%loop), index=1',
    '}',
    '',
])


# libtpu's idioms: a scan loop with no trip count annotated (only its condition says it), whose body writes its
# slice of a stacked buffer in place, and a GEMM fused into a fusion nested in its consumer's fusion.
TPU_TEXT = "\n".join([
    'HloModule jit_step, is_scheduled=true',
    '',
    '%fused_update (param_0: f32[20,64,128], param_1: bf16[1,64,128], param_2: s32[]) -> f32[20,64,128] {',
    '  %param_0 = f32[20,64,128]{2,1,0} parameter(0)',
    '  %param_1 = bf16[1,64,128]{2,1,0} parameter(1)',
    '  %param_2 = s32[] parameter(2)',
    '  %converted = f32[1,64,128]{2,1,0} convert(%param_1)',
    '  %zero = s32[] constant(0)',
    '  ROOT %dus = f32[20,64,128]{2,1,0} dynamic-update-slice(%param_0, %converted, %param_2, %zero, %zero)',
    '}',
    '',
    '%fused_dot (param_0.2: bf16[64,128], param_1.2: bf16[128,256]) -> bf16[64,256] {',
    '  %param_0.2 = bf16[64,128]{1,0} parameter(0)',
    '  %param_1.2 = bf16[128,256]{1,0} parameter(1)',
    '  ROOT %dot.1 = bf16[64,256]{1,0} dot(%param_0.2, %param_1.2), lhs_contracting_dims={1}, '
    'rhs_contracting_dims={0}',
    '}',
    '',
    '%fused_outer (param_0.3: bf16[64,128], param_1.3: bf16[128,256]) -> bf16[64,256] {',
    '  %param_0.3 = bf16[64,128]{1,0} parameter(0)',
    '  %param_1.3 = bf16[128,256]{1,0} parameter(1)',
    '  %inner = bf16[64,256]{1,0} fusion(%param_0.3, %param_1.3), kind=kOutput, calls=%fused_dot',
    '  ROOT %gelu = bf16[64,256]{1,0} tanh(%inner)',
    '}',
    '',
    '%body (p: (s32[], f32[20,64,128], bf16[1,64,128])) -> (s32[], f32[20,64,128], bf16[1,64,128]) {',
    '  %p = (s32[], f32[20,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) parameter(0)',
    '  %i = s32[] get-tuple-element(%p), index=0',
    '  %stack = f32[20,64,128]{2,1,0} get-tuple-element(%p), index=1',
    '  %g = bf16[1,64,128]{2,1,0} get-tuple-element(%p), index=2',
    '  %written = f32[20,64,128]{2,1,0} fusion(%stack, %g, %i), kind=kLoop, calls=%fused_update'
    ', metadata={op_name="jit(step)/transpose(jvp(CvT))/stages_2/while/body/dynamic_update_slice"}',
    '  ROOT %t = (s32[], f32[20,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) tuple(%i, %written, %g)',
    '}',
    '',
    '%cond (p.1: (s32[], f32[20,64,128], bf16[1,64,128])) -> pred[] {',
    '  %p.1 = (s32[], f32[20,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) parameter(0)',
    '  %limit = s32[] constant(20)',
    '  %i.1 = s32[] get-tuple-element(%p.1), index=0',
    '  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT',
    '}',
    '',
    'ENTRY %main (a: bf16[64,128], b: bf16[128,256], s: f32[20,64,128], g: bf16[1,64,128]) -> bf16[64,256] {',
    '  %a = bf16[64,128]{1,0} parameter(0)',
    '  %b = bf16[128,256]{1,0} parameter(1)',
    '  %s = f32[20,64,128]{2,1,0} parameter(2)',
    '  %g = bf16[1,64,128]{2,1,0} parameter(3)',
    '  %zero = s32[] constant(0)',
    '  %init = (s32[], f32[20,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) tuple(%zero, %s, %g)',
    '  %loop = (s32[], f32[20,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) while(%init), condition=%cond, body=%body',
    '  ROOT %mlp = bf16[64,256]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_outer'
    ', metadata={op_name="jit(step)/jvp(CvT)/stages_2/blocks/mlp/fc1/dot_general"}',
    '}',
    '',
])


def test_tpu_loops_count_their_condition_s_trips_write_slices_in_place_and_nested_gemms_count():
  found = {k.name: k for k in hlo.kernels(hlo.parse(TPU_TEXT))}
  assert set(found) == {"written", "lt", "mlp"}
  assert found["written"].count == found["lt"].count == 20
  # Reads the bf16 update and the index, writes the f32 slice; the stacked buffer is neither read nor copied.
  assert found["written"].bytes == 2 * 64 * 128 + 4 + 4 * 64 * 128
  assert found["mlp"].flops == 2 * 64 * 128 * 256 and hlo.part(found["mlp"]) == "MLP"


@pytest.fixture(scope="module")
def found():
  return {k.name: k for k in hlo.kernels(hlo.parse(TEXT))}


def test_free_instructions_are_no_kernels_and_loop_bodies_count_their_trips(found):
  assert set(found) == {"gemm", "sliced", "moved", "tiled", "neg"}
  assert found["neg"].count == 4 and found["gemm"].count == 1


def test_bytes_skip_the_workspace_read_only_the_slices_and_pad_tpu_tiles(found):
  assert found["gemm"].bytes == 2 * (256 * 384 + 384 * 1536 + 256 * 1536)
  assert found["sliced"].bytes == 2 * 8 * 128 * 4
  assert found["tiled"].bytes == 8 * 128 * 4 + 8 * 128 * 4  # f32[4,3] stored as one (8, 128) tile


def test_gemm_flops_and_parts(found):
  assert found["gemm"].flops == 2 * 256 * 1536 * 384 and found["gemm"].kind == "cuBLAS GEMM"
  assert hlo.part(found["gemm"]) == "q/k/v GEMMs" and not hlo.is_backward(found["gemm"])
  assert hlo.part(found["sliced"]) == "augmentation"
  assert hlo.part(found["tiled"]) == "optimiser update"
  assert hlo.part(found["moved"]) == hlo.LAYOUT and found["moved"].kind == "copy/transpose"
  assert hlo.part(found["neg"]) == "MLP" and hlo.is_backward(found["neg"])


def test_analysis_totals_are_the_sum_of_the_parts():
  analysis = hlo.analyse(TEXT)
  by_part = sum(t.bytes for d in analysis.parts.values() for t in d.values())
  assert analysis.total.bytes == pytest.approx(by_part)
  assert analysis.total.count == 8 and analysis.census["cuBLAS GEMM"].count == 1


def test_a_compiled_program_models_its_matmul_and_conv_flops():
  def f(x, w, k):
    y = jnp.dot(x, w)
    return jax.lax.conv_general_dilated(y.reshape(4, 8, 8, 32), k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=32)

  args = (jnp.zeros((256, 64)), jnp.zeros((64, 32)), jnp.zeros((3, 3, 1, 32)))
  analysis = hlo.analyse(jax.jit(f).lower(*args).compile().as_text())
  taps = (8 * 3 - 2) ** 2  # per 8x8 plane: nine taps at each pixel, less those that fall on the padding
  assert analysis.total.flops == pytest.approx(2 * 256 * 64 * 32 + 2 * 4 * 32 * taps)
  assert analysis.total.bytes >= 4 * (256 * 64 + 64 * 32 + 4 * 8 * 8 * 32)


def test_convolution_taps_count_what_meets_input_however_long_the_window():
  """The closed form against the (outputs x taps) table it replaces; then a batch-long window (a batched
  matmul written as a convolution) that the table could not hold."""
  rng = np.random.default_rng(0)
  for _ in range(3000):
    axis = {"size": int(rng.integers(1, 9)), "stride": int(rng.integers(1, 5)), "pad": int(rng.integers(-3, 7)),
            "lhs_dilate": int(rng.integers(1, 5)), "rhs_dilate": int(rng.integers(1, 4))}
    n, out = int(rng.integers(1, 13)), int(rng.integers(1, 16))
    position = (np.arange(out)[:, None] * axis["stride"] + np.arange(axis["size"])[None, :] * axis["rhs_dilate"]
                - axis["pad"])
    table = (position >= 0) & (position <= (n - 1) * axis["lhs_dilate"]) & (position % axis["lhs_dilate"] == 0)
    assert hlo._taps(n, out, axis) == table.sum(), (n, out, axis)
  long = {"size": 262144, "stride": 1, "pad": 262143, "lhs_dilate": 1, "rhs_dilate": 1}
  assert hlo._taps(262144, 1, dict(long, pad=0)) == 262144 and hlo._taps(262144, 262144 * 2 - 1, long) == 262144 ** 2
