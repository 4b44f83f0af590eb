"""The speed formulations in model.py (custom VJPs, conv as matmul) and the benchmark's own plumbing."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bench import run, torch_reference
from cvt_jax import model


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
                      lambda a, b: model.depthwise_conv3x3(a, b, stride, "shift"), (x, kernel), 1e-5)


def test_attention_custom_vjp_matches_autodiff():
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (2, 11, 3, 4))
  k, v = (jax.random.normal(key, (2, 6, 3, 4)) for key in keys[1:])
  _assert_grads_close(lambda *a: _plain_attention(*a, 0.3), lambda *a: model.attention(*a, 0.3), (q, k, v),
                      1e-5)


@pytest.mark.parametrize("in_features,out_features", [(4, 6), (6, 4)])  # both kernel-gradient forms
def test_matmul_custom_vjp_matches_autodiff(in_features, out_features):
  x = jax.random.normal(jax.random.key(5), (2, 7, in_features))
  kernel = jax.random.normal(jax.random.key(6), (in_features, out_features))
  _assert_grads_close(jnp.dot, model.matmul, (x, kernel), 1e-5)


def test_dense_rejects_contractions_matmul_does_not_implement():
  with pytest.raises(ValueError, match="nn.Dense's contraction"):
    model.Dense(3, precision=jax.lax.Precision.HIGHEST).init(jax.random.key(0), jnp.ones((2, 4)))


@pytest.mark.parametrize("kernel_size,stride,padding", [(7, 4, 2), (3, 2, 1)])
def test_conv_as_matmul_matches_lax_conv(kernel_size, stride, padding):
  x = jax.random.normal(jax.random.key(3), (2, 17, 15, 3))
  kernel = jax.random.normal(jax.random.key(4), (kernel_size, kernel_size, 3, 8))
  pads = ((padding, padding),) * 2

  def lax_conv(a, b):
    return jax.lax.conv_general_dilated(a, b, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  _assert_grads_close(lax_conv, lambda a, b: model.conv_as_matmul(a, b, (stride, stride), pads), (x, kernel),
                      1e-4)


def test_conv_as_matmul_rejects_grouped_convs():
  with pytest.raises(ValueError, match="grouped"):
    model.conv_as_matmul(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2)), (1, 1), ((1, 1), (1, 1)),
                         feature_group_count=2)


def test_torch_reference_is_cvt13_with_quickgelu():
  net = torch_reference.build_torch_cvt("cvt-13")
  assert sum(p.numel() for p in net.parameters()) == 19_997_480
  activations = [m.activation for m in net.modules() if hasattr(m, "activation")]
  assert len(activations) == 13 and all(isinstance(a, torch_reference.QuickGELU) for a in activations)
  x = torch.linspace(-3, 3, 7)
  torch.testing.assert_close(activations[0](x), x * torch.sigmoid(1.702 * x))


def test_interleaved_timing_rotates_the_order():
  calls = []
  contenders = {name: run.Contender(0.0, lambda name=name: calls.append(name)) for name in "abc"}
  times = run.time_interleaved(contenders, warmup=1, rounds=3)
  assert calls == list("abc") + list("abc") + list("bca") + list("cab")
  assert all(len(t) == 3 for t in times.values())


def test_cpu_peak_is_cores_times_clock_times_fma_width():
  cpu = {"cores": 2, "mhz": 2500.0, "simd": "avx2+fma", "fp32_flops_per_cycle": 32}
  peak, source = run.peak_flops("cpu", "float32", cpu)
  assert peak == 2 * 2500e6 * 32 and "2 cores" in source
  assert run.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16", {})[0] == 989e12
  assert run.peak_flops("mystery accelerator", "bfloat16", {})[0] is None


def test_fma_width_knows_that_zen4_splits_avx512():
  assert run.fp32_flops_per_cycle("avx512", "AuthenticAMD", "25") == 32  # Zen 4: 512-bit as 2 x 256
  assert run.fp32_flops_per_cycle("avx512", "AuthenticAMD", "26") == 64  # Zen 5: full-width FMAs
  assert run.fp32_flops_per_cycle("avx512", "GenuineIntel", "6") == 64
  assert run.fp32_flops_per_cycle("avx2+fma", "AuthenticAMD", "25") == 32
  assert run.fp32_flops_per_cycle("unknown", "", "") is None


def test_markdown_names_the_machine_and_the_winner():
  report = {
      "date": "now", "peak_source": "test", "gemm_ceiling": 2e11, "gemm_ceiling_runs": [1.5e11, 2e11],
      "machine": {"cpu": {"model": "Test CPU", "cores": 2, "simd": "avx2+fma"}, "device_kind": "cpu",
                  "device_count": 1, "torch_device": "cpu", "torch_threads": 2, "versions": {"jax": "x"},
                  "xla_flags": "", "glibc_tunables": ""},
      "args": {"dtype": "float32", "depthwise_impl": "auto", "rounds": 3},
      "cases": [{"model": "cvt-13", "res": 224, "batch": 8, "mode": "infer", "macs_per_image": 4_566_089_216,
                 "flops_per_image": 2e11 / 24,
                 "torch_best": "torch-compile", "ratio_vs_torch-eager": 1.5, "ratio_vs_torch-compile": 1.2,
                 "results": {n: {"img_per_s": v, "compile_s": 1.0, "tflops": 0.1, "mfu": 0.3}
                             for n, v in (("jax", 12.0), ("torch-eager", 8.0), ("torch-compile", 10.0))}}],
  }
  report["input_pipeline"] = {
      "what": "decode", "images": 64, "cores": 2, "batch": 32, "model": "cvt-13", "res": 224,
      "img_per_s_one_process": 300.0, "img_per_s_all_cores": 550.0, "img_per_s_train_batches": 500.0,
      "img_per_s_device_augment": 90.0, "img_per_s_bare_step": 4.0, "img_per_s_loop": 3.0, "loop_steps": 2}
  report["failed_cases"] = [{"model": "cvt-13", "res": 384, "batch": 32, "mode": "infer",
                             "error": "torch-eager failed in its bench process:\nTraceback\nMemoryError: big"}]
  text = run.markdown(report)
  assert "**Failed:** cvt-13 @384 infer batch 32: torch-eager failed in its bench process: MemoryError" in text
  assert "Test CPU" in text and "torch-compile (best torch)" in text and "| 1.20x |" in text
  assert "4.566" in text and "0.200 TFLOP/s" in text and "best of 0.150, 0.200" in text
  assert "| 50% |  |" in text and "| 42% | 1.20x |" in text  # 12 and 10 img/s of a 24 img/s roofline
  assert "alone 90 img/s" in text and "3.00 img/s vs 4.00 img/s" in text and "= 0.75x" in text


def test_help_describes_the_options(capsys):
  with pytest.raises(SystemExit):
    run.parse_args(["--help"])
  out = capsys.readouterr().out
  for flag in ("--quick", "--models", "--res", "--infer-batches", "--train-batches", "--max-batch",
               "--xla-flags", "--frameworks", "--loop-steps", "--pipeline-images"):
    assert flag in out


def test_zero_rounds_is_a_usage_error(capsys):
  with pytest.raises(SystemExit):
    run.parse_args(["--rounds", "0"])
  assert "--rounds must be >= 1" in capsys.readouterr().err


def test_negative_loop_steps_is_a_usage_error(capsys):
  with pytest.raises(SystemExit):
    run.parse_args(["--loop-steps", "-1"])
  assert "--loop-steps must be >= 0" in capsys.readouterr().err


def test_input_pipeline_bench_times_the_loop_between_two_bare_blocks():
  tiny = model.make_variant("tiny", dims=(8, 16, 24), depths=(1, 1, 1), heads=(1, 1, 2), drop_path_rate=0.0)
  result = run.bench_input_pipeline(num_images=16, batch=4, model=tiny, res=64, dtype="float32", loop_steps=2)
  assert all(len(times) == 2 and min(times) > 0 for times in result["step_s"].values())
  assert set(result["step_s"]) == {"bare_before", "loop", "bare_after"}
  assert result["img_per_s_loop"] == pytest.approx(4 / np.median(result["step_s"]["loop"]))
  bare = (np.median(result["step_s"]["bare_before"]) + np.median(result["step_s"]["bare_after"])) / 2
  assert result["img_per_s_bare_step"] == pytest.approx(4 / bare)
  assert result["img_per_s_all_cores"] > 0 and result["img_per_s_device_augment"] > 0


def test_each_framework_is_timed_in_a_process_of_its_own():
  # Hugging Face's CvT indexes its drop-path rates by stage: stage s needs at least s + 1 blocks.
  tiny = model.make_variant("tiny", dims=(8, 16, 24), depths=(1, 2, 3), heads=(1, 1, 2), drop_path_rate=0.0)
  args = argparse.Namespace(frameworks=["jax", "torch-eager"], dtype="float32", depthwise_impl="auto",
                            warmup=1, rounds=2)
  result = run.run_case(run.Case(tiny, 64, 2, "train"), args, macs=10**6, peak=None)
  assert set(result["results"]) == {"jax", "torch-eager"} and result["torch_best"] == "torch-eager"
  for row in result["results"].values():
    assert len(row["step_s"]) == 2 and min(row["step_s"]) > 0 and row["compile_s"] > 0
  assert result["ratio_vs_torch-eager"] == pytest.approx(
      result["results"]["jax"]["img_per_s"] / result["results"]["torch-eager"]["img_per_s"])


def test_a_failing_contender_process_names_its_framework():
  with pytest.raises(RuntimeError, match="(?s)torch-eager failed in its bench process.*cvt-99"):
    run.ContenderProcess("torch-eager", run.Case("cvt-99", 224, 1, "infer"), "float32", "auto")


def test_a_killed_contender_process_is_reported_with_its_exit_code():
  tiny = model.make_variant("tiny", dims=(8, 16, 24), depths=(1, 1, 1), heads=(1, 1, 2), drop_path_rate=0.0)
  contender = run.ContenderProcess("jax", run.Case(tiny, 32, 1, "infer"), "float32", "auto")
  assert contender.step() > 0
  contender._process.kill()  # what the kernel's out-of-memory killer does
  with pytest.raises(RuntimeError, match=r"jax bench process died, exit code -9 \(killed: out of memory\?\)"):
    contender.step()
  contender.close()
