"""The benchmark's own plumbing (timing, peaks, report, flags, contender processes, input side) and the
prepared GPU run (bench/gpu.sh, bench/train_steps.py)."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from bench import host_input
from bench import run
from cvt_jax import model
from cvt_jax.aot import hardware


def test_interleaved_timing_rotates_the_order():
  calls = []
  contenders = {name: run.Contender(0.0, lambda name=name: calls.append(name)) for name in "abc"}
  times = run.time_interleaved(contenders, warmup=1, rounds=3)
  assert calls == list("abc") + list("abc") + list("bca") + list("cab")
  assert all(len(t) == 3 for t in times.values())


def test_cpu_peak_is_cores_times_clock_times_fma_width():
  cpu = {"cores": 2, "mhz": 2500.0, "simd": "avx2+fma", "fp32_flops_per_cycle": 32}
  peak, source = hardware.peak_flops("cpu", "float32", cpu)
  assert peak == 2 * 2500e6 * 32 and "2 cores" in source
  assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16", {})[0] == 989e12
  assert hardware.peak_flops("mystery accelerator", "bfloat16", {})[0] is None


def test_fma_width_knows_that_zen4_splits_avx512():
  assert hardware.fp32_flops_per_cycle("avx512", "AuthenticAMD", "25") == 32  # Zen 4: 512-bit as 2 x 256
  assert hardware.fp32_flops_per_cycle("avx512", "AuthenticAMD", "26") == 64  # Zen 5: full-width FMAs
  assert hardware.fp32_flops_per_cycle("avx512", "GenuineIntel", "6") == 64
  assert hardware.fp32_flops_per_cycle("avx2+fma", "AuthenticAMD", "25") == 32
  assert hardware.fp32_flops_per_cycle("unknown", "", "") is None


def test_markdown_names_the_machine_and_the_winner():
  report = {
      "date": "now", "peak_source": "test", "gemm_ceiling": 2e11, "gemm_ceiling_runs": [1.5e11, 2e11],
      "machine": {"cpu": {"model": "Test CPU", "cores": 2, "simd": "avx2+fma"}, "device_kind": "cpu",
                  "device_count": 1, "torch_device": "cpu", "torch_threads": 2, "versions": {"jax": "x"},
                  "xla_flags": "", "glibc_tunables": ""},
      "args": {"dtype": "float32", "kernels": "auto", "rounds": 3},
      "cases": [{"model": "cvt-13", "res": 224, "batch": 8, "mode": "infer", "macs_per_image": 4_566_089_216,
                 "flops_per_image": 2e11 / 24,
                 "torch_best": "torch-compile", "ratio_vs_torch-eager": 1.5, "ratio_vs_torch-compile": 1.2,
                 "results": {n: {"img_per_s": v, "compile_s": 1.0, "tflops": 0.1, "mfu": 0.3}
                             for n, v in (("jax", 12.0), ("torch-eager", 8.0), ("torch-compile", 10.0))}}],
  }
  report["input_pipeline"] = {
      "what": "decode", "images": 64, "cores": 2, "batch": 32, "model": "cvt-13", "res": 224,
      "sources": {"array_record": {"scaling": [{"workers": 1, "img_per_s": 300.0, "img_per_s_per_core": 300.0},
                                               {"workers": 2, "img_per_s": 550.0, "img_per_s_per_core": 275.0}],
                                   "scaling_efficiency": 550 / 600}},
      "img_per_s_device_augment": 90.0, "img_per_s_bare_step": 4.0, "img_per_s_loop": 3.0, "loop_steps": 2}
  report["failed_cases"] = [{"model": "cvt-13", "res": 384, "batch": 32, "mode": "infer",
                             "error": "torch-eager failed in its bench process:\nTraceback\nMemoryError: big"}]
  text = run.markdown(report)
  assert "**Failed:** cvt-13 @384 infer batch 32: torch-eager failed in its bench process: MemoryError" in text
  assert "Test CPU" in text and "torch-compile (best torch)" in text and "| 1.20x |" in text
  assert "4.566" in text and "0.200 TFLOP/s" in text and "best of 0.150, 0.200" in text
  assert "| 50% |  |" in text and "| 42% | 1.20x |" in text  # 12 and 10 img/s of a 24 img/s roofline
  assert "alone 90 img/s" in text and "3.00 img/s vs 4.00 img/s" in text and "= 0.75x" in text
  assert "array_record: 1 worker(s) 300 img/s (300 per core), 2 worker(s) 550 img/s (275 per core) (92% of " \
         "linear)" in text


def test_help_describes_the_options(capsys):
  with pytest.raises(SystemExit) as exit_:
    run.run(["bench", "--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--quick", "--models", "--res", "--infer_batches", "--train_batches", "--max_batch",
               "--xla_flags", "--frameworks", "--loop_steps", "--pipeline_images", "--kernels"):
    assert flag in out


@pytest.mark.parametrize("argv,message", [
    (["--rounds", "0"], "flag --rounds=0: 0 is not a positive integer"),
    (["--loop_steps", "-1"], "flag --loop_steps=-1: -1 is not a non-negative integer"),
    (["--train_batches", "8,x"], "--train_batches=8,x: expected integers"),
    (["--frameworks", "tf"], "--frameworks"),
])
def test_bad_flags_are_one_line_usage_errors(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_:
    run.run(["bench", *argv])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_batches_parse_to_int_lists():
  args = run.parse_args(["bench", "--train_batches", "8,16", "--infer_batches", "", "--res", "64"])
  assert args.train_batches == [8, 16] and args.infer_batches == [] and args.res == [64]


def test_input_pipeline_bench_times_the_loop_between_two_bare_blocks():
  tiny = model.make_variant("tiny", dims=(8, 16, 24), depths=(1, 1, 1), heads=(1, 1, 2), drop_path_rate=0.0)
  result = host_input.bench_input_pipeline(num_images=16, batch=4, model=tiny, res=64, dtype="float32",
                                            loop_steps=2)
  assert all(len(times) == 2 and min(times) > 0 for times in result["step_s"].values())
  assert set(result["step_s"]) == {"bare_before", "loop", "bare_after"}
  assert result["img_per_s_loop"] == pytest.approx(4 / np.median(result["step_s"]["loop"]))
  bare = (np.median(result["step_s"]["bare_before"]) + np.median(result["step_s"]["bare_after"])) / 2
  assert result["img_per_s_bare_step"] == pytest.approx(4 / bare)
  assert result["img_per_s_device_augment"] > 0 and set(result["sources"]) == {"array_record", "folder"}
  for source in result["sources"].values():
    assert [r["workers"] for r in source["scaling"]] == sorted({1, os.cpu_count()})
    assert all(r["img_per_s"] > 0 for r in source["scaling"])


def test_each_framework_is_timed_in_a_process_of_its_own():
  # Hugging Face's CvT indexes its drop-path rates by stage: stage s needs at least s + 1 blocks.
  tiny = model.make_variant("tiny", dims=(8, 16, 24), depths=(1, 2, 3), heads=(1, 1, 2), drop_path_rate=0.0)
  args = types.SimpleNamespace(frameworks=["jax", "torch-eager"], dtype="float32", kernels="auto",
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


def test_the_real_train_step_is_timed_without_tensorflow(tmp_path):
  """What bench/gpu.sh runs first, in a process where TensorFlow, TFDS and grain cannot be imported."""
  blocked = "import sys; sys.modules.update(dict.fromkeys(['tensorflow', 'tensorflow_datasets', 'grain']))"
  steps = (f"{blocked}; from bench import train_steps; train_steps.run(['train_steps', '--config', "
           "'demo:batch=4', '--config.model.dims=(8,16,24)', '--config.model.depths=(1,1,1)', "
           f"'--config.model.heads=(1,1,2)', '--steps', '2', '--warmup', '1', '--json', '{tmp_path}/steps.json'])")
  done = subprocess.run([sys.executable, "-c", steps], capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr
  result = json.loads((tmp_path / "steps.json").read_text())
  assert len(result["step_s"]) == 2 and result["img_per_s"] > 0 and np.isfinite(result["loss_last"])
  assert "median step" in done.stdout


def test_gpu_sh_runs_its_stages_within_the_deadline_and_summarises_them(tmp_path):
  """bench/gpu.sh's plumbing with a stand-in for Python (no GPU here): every stage runs, a failing one is
  recorded, the summary collects the logs and the bench's Markdown."""
  fake = tmp_path / "python"
  fake.write_text("#!/usr/bin/env bash\n"
                  "if [[ $1 == - ]]; then cat > /dev/null; echo '{\"gpu\": \"stand-in\"}'; exit 0; fi\n"
                  "echo \"ran $*\"\n"
                  "if [[ $* == *bench.run* ]]; then mkdir -p ${*: -1}; echo '| bench table |' > ${*: -1}/t.md; fi\n"
                  "[[ $* == *' compile '* ]] && exit 3; exit 0\n")
  fake.chmod(0o755)
  repo = tmp_path / "repo"
  shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "bench"), repo / "bench",
                  ignore=shutil.ignore_patterns("results"))
  done = subprocess.run(["bash", str(repo / "bench" / "gpu.sh")], env={**os.environ, "PYTHON": str(fake)},
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  summary = next((repo / "bench" / "results").glob("gpu-*/summary.md")).read_text()
  assert '{"gpu": "stand-in"}' in summary and "| compile | exit 3 |" in summary
  assert "| train-steps | exit 0 |" in summary and "--steps 50" in summary and "| bench table |" in summary
