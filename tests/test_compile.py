"""`cvt-jax compile`: the real train and eval steps of a tiny CvT compiled for TPU v5e (compile-only devices
from libtpu, unpacked by ./run.sh test), for an H100 (XLA's CUDA plugin, likewise) and for this host, with
the fit verdict and its advice."""

import json
import os
import subprocess
import sys
import types

import pytest

from cvt_jax.aot import devices
from cvt_jax.aot import steps
from cvt_jax.cli import main as cli

LIBTPU = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
TINY = ["--config", "demo:batch=32", "--config.data.data_dir=/unused", "--config.model.dims=(16,32,48)",
        "--config.model.depths=(1,1,2)", "--config.model.heads=(1,2,3)"]
# The official augmentation, RandAugment included: its gather-free TPU formulation is what is compiled.
RECIPE = ["--config.augment.randaugment=True", "--config.augment.erasing_prob=0.25",
          "--config.augment.mixup_alpha=0.8", "--config.augment.cutmix_alpha=1.0"]


@pytest.fixture(scope="module", autouse=True)
def libtpu():
  """The suite relies on aot finding the libtpu ./run.sh unpacked beside the venv, as a user's checkout does."""
  if not os.path.isfile(LIBTPU):
    pytest.fail(f"libtpu is missing at {LIBTPU}: run ./run.sh test, which unpacks the libtpu that the "
                "installed jax pins (pip install --no-deps --target ...)")
  if "TPU_LIBRARY_PATH" in os.environ:
    pytest.fail("TPU_LIBRARY_PATH is set: unset it, the suite tests that compile finds libtpu by itself")


def compile_cli(capsys, *args: str) -> tuple[int, str, str]:
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", "compile", *args])
  captured = capsys.readouterr()
  return exit_.value.code, captured.out, captured.err


def test_train_and_eval_steps_compile_for_a_tpu_slice(capsys, tmp_path):
  """The eval step at the batch evaluation runs at (the demo's eval_batch_size 128 over 4 chips), the report
  into a folder that does not exist yet."""
  status, out, err = compile_cli(capsys, *TINY, *RECIPE, "--topology", "v5e:2x2", "--json",
                                 str(tmp_path / "new" / "report.json"))
  assert status == 0, err
  assert "for v5e:2x2: 4 x TPU v5 lite (16.00 GiB each)" in out
  assert "train step, 8 images per chip: arguments" in out and "of 16.00 GiB: fits" in out
  assert "eval step, 32 images per chip" in out and "modelled, not measured (XLA cost analysis" in out
  report = json.loads((tmp_path / "new" / "report.json").read_text())
  train, evaluation = report["reports"]
  assert train["fits"] and 0 < train["temporaries"] < 2**30 and train["flops"] > 0
  assert train["total"] == train["arguments"] + train["outputs"] - train["aliased"] + train["temporaries"]
  assert evaluation["per_chip_batch"] == 32 and evaluation["flops"] / 32 < train["flops"] / 8


def test_the_fused_attention_compiles_for_a_tpu_slice():
  """Mosaic lowers both Pallas kernels, sharded over the slice (tests/test_ops.py checks their numbers):
  a query count the blocks divide (448) and one that is padded (200)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cvt_jax import ops_pallas  # pylint: disable=g-import-not-at-top
  from cvt_jax.aot import hlo  # pylint: disable=g-import-not-at-top

  mesh = jax.sharding.Mesh(np.asarray(devices.Target("v5e:2x2").devices), ("data",))
  on_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def loss(q, k, v, q2):
    outs = [ops_pallas.attention(x, k, v, 0.125) for x in (q, q2)]
    return sum(o.astype(jnp.float32).sum() for o in outs)

  args = [jax.ShapeDtypeStruct((8, n, 2, 64), jnp.bfloat16, sharding=on_batch) for n in (448, 196, 196, 200)]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args)
  analysis = hlo.analyse(lowered.compile().as_text())
  assert analysis.census["Pallas kernel"].count == 4 and analysis.census["Pallas kernel"].flops > 0


def test_an_impossible_batch_fails_naming_the_consumer_and_the_switches(capsys):
  # At 224 px libtpu gives up early in the compile (at 32 px the same overflow needs 262144 images per chip
  # and a whole compile: 4x as long).
  status, out, err = compile_cli(capsys, *TINY, "--config.data.image_size=224", "--topology", "v5e:2x2",
                                 "--per_chip_batch", "8192")
  assert status == 1
  assert "train step, 8192 images per chip: does NOT fit (temporaries" in out
  message = err.strip().splitlines()[-1]
  assert message.startswith("cvt-jax compile: error: train step does not fit v5e:2x2: 4 x TPU v5 lite")
  assert "the biggest consumer is the temporaries" in message
  assert "--config.model.remat=block" in message and "--config.fsdp=True" in message


def test_libtpu_s_other_out_of_memory_message_is_a_verdict_too():
  """libtpu also reports an overflow found late in the compile as the memory used, not the temporaries."""
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory "
             "in memory space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 3.19M. Total hbm usage "
             ">= 16.00G: reserved 258.03M program 15.38G arguments 378.73M Output size 365.23M; shares 365.22M "
             "with arguments. Program hbm requirement 15.38G: global 449.0K scoped 448.0K HLO temp 15.32G (92.2%")

  class Overflowing:
    def lower(self, *args):
      return self

    def compile(self, **kwargs):
      raise RuntimeError(message)

  report = steps._compile("train step", Overflowing(), (), 32, types.SimpleNamespace(compiler_options={}))
  assert not report.fits and report.temporaries == int(15.32 * 2**30)
  assert report.error == "16.00G in all (15.32G of temporaries) exceed the HBM (15.75G)"


def test_without_a_topology_this_host_is_compiled_for(capsys):
  status, out, err = compile_cli(capsys, *TINY, "--per_chip_batch", "2")
  assert status == 0, err
  assert "for this host: 4 x cpu" in out and "train step, 2 images per chip: arguments" in out


@pytest.mark.parametrize("topology", ["v9x:2x2", "gpu", "cpu", "v5e", "h100:3x", "h100:0", "v5e:3x7x9", "v4:2x2"])
def test_a_bad_topology_is_a_one_line_usage_error_listing_the_accepted_forms(capsys, topology):
  status, out, err = compile_cli(capsys, *TINY, "--topology", topology)
  assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, err
  assert f"--topology {topology}: expected a TPU slice v5e:AxB" in err and "h100:8" in err


def test_an_empty_tpu_library_path_counts_as_unset(monkeypatch):
  monkeypatch.setenv("TPU_LIBRARY_PATH", "")
  devices._prepare_libtpu()  # pylint: disable=protected-access
  assert os.environ["TPU_LIBRARY_PATH"] == LIBTPU


def test_a_users_own_sharded_step_compiles_for_a_tpu_slice_with_the_default_kernels():
  """big_vision's pattern: `jax.jit` with NamedSharding in and out, no mesh context. XLA cannot partition the
  fused Pallas attention, so there the model uses XLA's; traced under the mesh, the fused kernel."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cvt_jax import model  # pylint: disable=g-import-not-at-top
  from cvt_jax import ops  # pylint: disable=g-import-not-at-top
  from cvt_jax.aot import hlo  # pylint: disable=g-import-not-at-top

  target = devices.Target("v5e:2x2")
  mesh = jax.sharding.Mesh(np.asarray(target.devices), ("data",))
  on_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variant = model.make_variant("tiny", (8, 16, 24), (1, 1, 1), (1, 1, 1), 0.0)
  cvt = model.CvT.from_variant(variant, num_classes=5, kernels=ops.resolve_kernels("auto", "tpu"))
  variables = jax.eval_shape(lambda key: cvt.init_variables(key, 96), jax.random.key(0))
  variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), variables)
  images = jax.ShapeDtypeStruct((8, 96, 96, 3), np.float32, sharding=on_batch)
  step = jax.jit(cvt.apply, in_shardings=(replicated, on_batch), out_shardings=on_batch)

  kernels = lambda lowered: hlo.analyse(lowered.compile().as_text()).census.get("Pallas kernel")
  assert kernels(step.lower(variables, images)) is None
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert kernels(step.lower(variables, images)).count > 0


def test_train_and_eval_steps_compile_for_an_h100_without_a_gpu(tmp_path):
  """In a process of its own: JAX looks for the CUDA plugin once, when its first backend starts."""
  if not os.path.isdir(os.path.join(devices.cuda_compiler_dir(), "jax_plugins", "xla_cuda12")):
    pytest.fail(f"XLA's CUDA plugin is missing at {devices.cuda_compiler_dir()}: run ./run.sh test, which unpacks "
                "the jax-cuda12 plugin of the installed jaxlib (pip install --no-deps --target ...)")
  report = tmp_path / "report.json"
  done = subprocess.run([sys.executable, "-m", "cvt_jax.cli.main", "compile", *TINY, "--topology", "h100",
                         "--breakdown", "--json", str(report)], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "for h100: 1 x NVIDIA H100 80GB HBM3 (79.11 GiB each)" in done.stdout
  assert "train step, 32 images per GPU: arguments" in done.stdout
  assert "of 59.33 GiB (75% of 79.11 GiB: JAX's GPU allocator, XLA_CLIENT_MEM_FRACTION): fits" in done.stdout
  assert "modelled from the HLO" in done.stdout and "cuBLAS GEMM" in done.stdout
  assert "q/k/v GEMMs" in done.stdout and "optimiser update" in done.stdout
  assert done.stderr.strip() == "", done.stderr  # the plugin's native notices stay off the console
  train, evaluation = json.loads(report.read_text())["reports"]
  census = train["hlo"]["census"]
  assert census["cuBLAS GEMM"]["count"] > 0 and census["cuDNN convolution"]["count"] > 0
  assert evaluation["per_chip_batch"] == 128  # the demo's eval_batch_size on one GPU
  assert train["hlo"]["total"]["bytes"] / 32 > evaluation["hlo"]["total"]["bytes"] / 128 > 0
  assert train["flops"] == 0 and train["hlo"]["total"]["flops"] > 0  # XLA gives no GPU cost analysis


def test_a_gpu_topology_in_a_process_that_started_jax_without_the_plugin_is_one_line(capsys):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # this process's backends start without the plugin
  status, _, err = compile_cli(capsys, *TINY, "--topology", "a100:2")
  assert status == 1 and len(err.strip().splitlines()) == 1
  assert "JAX started its backends without it" in err and "jax-cuda12-plugin==" in err


def test_the_fit_table_picks_the_smallest_slice_that_fits_and_resumes(monkeypatch, tmp_path):
  """The table's bookkeeping, with a fake compile: memory = 1 GiB + 100 MiB per image (remat: 40 MiB);
  interrupted after the first row's seven compiles, then resumed."""
  from bench import fit_table  # pylint: disable=g-import-not-at-top
  from cvt_jax.aot import hardware  # pylint: disable=g-import-not-at-top

  calls = []

  def fake_compile(model, res, topology, per_chip, switch, with_eval):
    calls.append((model, res, topology, per_chip, switch, with_eval))
    total = 2**30 + per_chip * (100 if switch == "plain" else 40) * 2**20
    hbm = hardware.TPU_TOPOLOGIES[topology.split(":")[0]].hbm
    names = ["train step", "eval step"] if with_eval else ["train step"]
    return [{"name": name, "per_chip_batch": per_chip, "fits": total <= hbm, "arguments": total,
             "temporaries": 0, "total": total} for name in names]

  def interrupted_compile(*job):
    if len(calls) == 7:  # Ctrl-C during the eighth compile: the first row's probes and officials are done
      raise KeyboardInterrupt
    return fake_compile(*job)

  monkeypatch.setattr(fit_table, "_compile_job", interrupted_compile)
  fit_table.write_table(str(tmp_path / "table"))
  markdown = (tmp_path / "table.md").read_text()
  assert "| cvt-13 @224 | 100 / 40 |" in markdown and "v5e:2x4 (remat): 256/chip, train 11.00 GiB" in markdown
  assert "| cvt-13 @384 | not compiled yet |" in markdown
  monkeypatch.setattr(fit_table, "_compile_job", fake_compile)
  fit_table.write_table(str(tmp_path / "table"))
  probes = [c for c in calls if not c[5]]
  assert len(probes) == 6 * 2 * 2 and len(calls) == len(probes) + 6 * 3
  table = json.loads((tmp_path / "table.json").read_text())
  row = table["rows"][0]
  assert (row["model"], row["res"]) == ("cvt-13", 224)
  # v5e: (16 GiB - 1 GiB) / 100 MiB = 153 plain -> 152; remat 384. 2048 images need 16 chips plain (128
  # per chip) or 8 chips with remat (256): the smallest slice wins, with remat.
  assert row["largest"]["v5e"] == {"plain": 152, "remat": 384}
  assert row["official"]["v5e"]["topology"] == "v5e:2x4" and row["official"]["v5e"]["switch"] == "remat"
  assert row["official"]["v5e"]["per_chip"] == 256
  markdown = (tmp_path / "table.md").read_text()
  assert markdown.count("| cvt-") == 6 and "v5e:2x4 (remat): 256/chip, train 11.00 GiB" in markdown
  calls.clear()
  fit_table.write_table(str(tmp_path / "table"))
  assert not calls
