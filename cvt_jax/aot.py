"""Ahead-of-time compiles of the real train and eval steps for devices that need not be here.

As MaxText's train_compile.py does: the sharded train step (on-device augmentation, forward, backward,
AdamW) and the eval step are lowered with abstract inputs and compiled for compile-only devices of a TPU
topology (libtpu, on any host) or for this host's devices. Nothing runs and no data is read. A
`StepReport` holds what the compiler says per device: the arguments (parameters, optimiser state, batch),
the temporaries, the outputs, and XLA's cost model's FLOPs and bytes. Times derived from those are
modelled, never measured. Memory is linear in the per-device batch, which `find_batch` uses.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from cvt_jax import hardware
from cvt_jax import hlo as hlo_lib
from cvt_jax import model as model_lib
from cvt_jax import native
from cvt_jax import optim
from cvt_jax import parallel
from cvt_jax import summary
from cvt_jax import train_lib

_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, deployed as one device per chip
# libtpu's two ways of saying a program does not fit: "... temporaries (17.57G) ... HBM (15.75G)", and
# "... Used 15.75G of 15.75G hbm ... Total hbm usage >= 16.00G ... HLO temp 15.32G".
_OOM = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\).*?HBM \(([\d.]+)([KMGT])\)", re.S)
_OOM_USAGE = re.compile(r"RESOURCE_EXHAUSTED.*? of ([\d.]+)([KMGT]) hbm.*?Total hbm usage >= ([\d.]+)([KMGT])"
                        r".*?HLO temp ([\d.]+)([KMGT])", re.S)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class DoesNotFit(ValueError):
  """A step that needs more memory than a chip has."""


@dataclasses.dataclass
class StepReport:
  """What one compile says about one step, per chip (bytes)."""

  name: str
  per_chip_batch: int
  fits: bool
  arguments: int = 0  # the step's inputs as it receives them (for the train step: state and batch)
  outputs: int = 0
  aliased: int = 0  # outputs written in place of donated arguments
  temporaries: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  compile_seconds: float = 0.0
  error: str = ""
  hlo: hlo_lib.Analysis | None = None  # the program's kernels, modelled (cvt_jax.hlo)

  @property
  def total(self) -> int:
    """Peak HBM of the step: arguments, the outputs not written in place, and the temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def _bundled_libtpu() -> str | None:
  """The libtpu.so that `./run.sh` unpacks beside the virtual environment (`<venv>/libtpu`), if any."""
  found = glob.glob(os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so"))
  return found[0] if found else None


def _prepare_libtpu() -> None:
  """libtpu asks the cloud metadata server and the environment about the host it runs on: a compile-only
  run answers for it (any values do), so nothing is looked up and nothing is printed. Without an
  installed libtpu, the one `./run.sh` unpacked beside the venv is used."""
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  bundled = _bundled_libtpu()
  if bundled and "TPU_LIBRARY_PATH" not in os.environ:
    os.environ["TPU_LIBRARY_PATH"] = bundled


_GPU_TOPOLOGY = re.compile(r"^(?P<chip>[a-z0-9]+)(?::(?:(?P<nodes>\d+)x)?(?P<gpus>\d+))?$")
# No GPU is there to autotune on; XLA's Triton GEMMs then fail to pick tile sizes ("Couldn't find output
# tile sizes"), so dots go to cuBLAS.
_DEVICELESS_GPU_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
_CUDA_WHEELS = ("jax-cuda12-plugin", "jax-cuda12-pjrt")


def cuda_compiler_dir() -> str:
  """Where `./run.sh` unpacks the CUDA PJRT plugin beside the venv; $CVT_JAX_CUDA_COMPILER overrides it."""
  return os.environ.get("CVT_JAX_CUDA_COMPILER") or os.path.join(sys.prefix, "cuda-compiler")


def _cuda_install_hint() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  wheels = " ".join(f"{w}=={jaxlib.__version__}" for w in _CUDA_WHEELS)
  return f"./run.sh compile installs it, or: pip install --no-deps --target {cuda_compiler_dir()} {wheels}"


def _load_cuda_plugin() -> None:
  """Makes XLA's CUDA compiler available on a host without a GPU: the plugin `./run.sh` unpacked (or an
  installed jax[cuda12]). JAX looks for plugins once, when its first backend starts, hence the checks."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if "cuda" in xla_bridge._backend_factories:  # pylint: disable=protected-access
    return
  if xla_bridge._plugins_registered:  # pylint: disable=protected-access
    raise ValueError("compiling for a GPU needs the CUDA plugin, and JAX started its backends without it; "
                     + _cuda_install_hint())
  directory = cuda_compiler_dir()
  if not os.path.isdir(os.path.join(directory, "jax_plugins", "xla_cuda12")):
    raise ValueError(f"compiling for a GPU needs XLA's CUDA plugin, not found in {directory}; "
                     + _cuda_install_hint())
  sys.path.insert(0, directory)
  # Without a GPU the plugin's version checks of the CUDA libraries would fail: only its compiler is used.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")  # local work stays on the CPU: no CUDA runtime came with it


def _gpu_devices(topology: str) -> list[Any]:
  """Compile-only devices of `NAME[:[NODESx]GPUS]` (h100, h200:8, a100:4x8)."""
  match = _GPU_TOPOLOGY.match(topology)
  chip = hardware.GPU_TOPOLOGIES[match["chip"]]
  _load_cuda_plugin()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax_cuda12_plugin import _versions  # pylint: disable=g-import-not-at-top
  cudnn = _versions.cudnn_build_version()  # e.g. 90800
  config = chip.gpu_target_config((cudnn // 10000, cudnn // 100 % 100, cudnn % 100))
  layout = f"1x{match['nodes'] or 1}x{match['gpus'] or 1}"
  with native.stderr_to():  # the plugin's load prints absl and cudart notices there
    return topologies.get_topology_desc(platform="cuda", target_config=config, topology=layout).devices


def _tpu_devices(topology: str) -> list[Any]:
  _prepare_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in _MEGACORE else {}
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise ValueError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' (any host), "
                       "or set TPU_LIBRARY_PATH to a libtpu.so") from None
    raise ValueError(f"--topology {topology}: {' '.join(str(e).split())}") from None


def is_gpu_topology(topology: str) -> bool:
  match = _GPU_TOPOLOGY.match(topology)
  return bool(match) and match["chip"] in hardware.GPU_TOPOLOGIES


class Target:
  """The devices to compile for, and the per-device figures a report compares against.

  `topology`: a TPU slice (v5e:4x4, libtpu's names), NVIDIA GPUs (h100, h200:8, a100:4x8: nodes x GPUs per
  node), or None for this host's devices. On GPUs a step must fit the share of memory JAX's allocator takes
  (XLA_CLIENT_MEM_FRACTION, 75 % by default), `budget`; elsewhere the whole memory.
  """

  def __init__(self, topology: str | None):
    self.topology = topology
    self.compiler_options: dict[str, Any] = {}
    if topology and is_gpu_topology(topology):
      self.devices = _gpu_devices(topology)
      self.compiler_options = dict(_DEVICELESS_GPU_OPTIONS)
    elif topology:
      self.devices = _tpu_devices(topology)
    else:
      self.devices = jax.devices()
    self.kind = self.devices[0].device_kind
    self.platform = self.devices[0].platform
    self.unit = "GPU" if self.platform == "gpu" else "chip"
    self.chip = hardware.chip(self.kind)
    self.hbm = self.chip.hbm if self.chip else self._local_memory()
    self.memory_fraction = _gpu_memory_fraction() if self.platform == "gpu" else 1.0
    self.budget = self.hbm * self.memory_fraction if self.hbm else None

  def _local_memory(self) -> int | None:
    try:
      return (self.devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # pylint: disable=broad-except  # CPUs report none
      return None

  @property
  def chips(self) -> int:
    return len(self.devices)

  def describe(self) -> str:
    hbm = f"{gib(self.hbm)} each" if self.hbm else "memory unknown"
    return f"{self.topology or 'this host'}: {self.chips} x {self.kind} ({hbm})"


def _gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX's allocator may use (jaxlib's plugin options read the same variables)."""
  value = os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  return float(value) if value else 0.75


def _compile(name: str, jitted: Any, args: Sequence[Any], per_chip_batch: int, target: Target) -> StepReport:
  """Compiles `jitted` for abstract `args`; a step that does not fit HBM reports the sizes libtpu gave."""
  started = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile(compiler_options=target.compiler_options or None)
  except Exception as e:  # pylint: disable=broad-except  # libtpu says RESOURCE_EXHAUSTED in several types
    if match := _OOM.search(str(e)):
      temporaries = match.group(1, 2)
      error = f"temporaries {match[1]}{match[2]} exceed the HBM ({match[3]}{match[4]})"
    elif match := _OOM_USAGE.search(str(e)):
      temporaries = match.group(5, 6)
      error = (f"{match[3]}{match[4]} in all ({match[5]}{match[6]} of temporaries) exceed the HBM "
               f"({match[1]}{match[2]})")
    else:
      raise
    return StepReport(name, per_chip_batch, fits=False, compile_seconds=time.perf_counter() - started,
                      temporaries=int(float(temporaries[0]) * _UNITS[temporaries[1]]), error=error)
  seconds = time.perf_counter() - started
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return StepReport(name, per_chip_batch, True, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                    stats.alias_size_in_bytes, stats.temp_size_in_bytes, float(cost.get("flops", 0.0)),
                    float(cost.get("bytes accessed", 0.0)), seconds, hlo=hlo_lib.analyse(compiled.as_text()))


def compile_steps(config: Any, target: Target, per_chip_batch: int,
                  with_eval: bool = True) -> list[StepReport]:
  """The train step (and the eval step) of `config`, compiled for `target` at `per_chip_batch` images."""
  num_classes = config.model.num_classes
  mesh = parallel.make_mesh(target.devices)
  model = model_lib.from_config(config.model, num_classes, target.platform)
  schedule = optim.make_schedule(config.schedule, config.optim.lr, config.num_epochs, steps_per_epoch=1000)
  tx = optim.make_optimizer(config.optim, schedule)
  abstract = train_lib.abstract_train_state(model, tx, config.data.image_size)
  shardings = parallel.state_shardings(abstract, mesh, config.fsdp)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  train_step, eval_step = train_lib.build_steps(config, model, tx, schedule, mesh, shardings, jax.random.key(0))
  size, batch = config.data.image_size, per_chip_batch * target.chips
  on_batch = parallel.batch_sharding(mesh)
  data = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=on_batch),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=on_batch)}
  reports = [_compile("train step", train_step, (state, data), per_chip_batch, target)]
  if with_eval:
    data["mask"] = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=on_batch)
    reports.append(_compile("eval step", eval_step, (state.variables, data), per_chip_batch, target))
  return reports


@dataclasses.dataclass(frozen=True)
class MemoryModel:
  """Train-step memory per chip = fixed + per_image x per-chip batch, from two compiles."""

  fixed: float
  per_image: float

  @classmethod
  def fit(cls, a: StepReport, b: StepReport) -> MemoryModel:
    per_image = (b.total - a.total) / (b.per_chip_batch - a.per_chip_batch)
    return cls(a.total - per_image * a.per_chip_batch, per_image)

  def largest_batch(self, hbm: float) -> int:
    """The largest per-chip batch under `hbm`: a multiple of 8 when 8 or more fit."""
    room = int((hbm - self.fixed) // self.per_image)
    return room // 8 * 8 if room >= 8 else max(room, 0)


def find_batch(config: Any, target: Target, probes: tuple[int, int] = (8, 16),
               log: Callable[[str], None] = print) -> tuple[int, MemoryModel, list[StepReport]]:
  """The largest per-chip batch whose train step fits `target`, the memory model and the compiles behind it.

  Two compiles fit the memory model; the predicted batch is compiled to check it, and lowered by a tenth
  while it does not fit.
  """
  if not target.hbm:
    raise ValueError(f"{target.kind}: its memory is unknown, so no batch can be fitted to it")
  reports = [compile_steps(config, target, b, with_eval=False)[0] for b in probes]
  for r in reports:
    log(f"  probe: {r.per_chip_batch} per {target.unit} -> {gib(r.total) if r.fits else r.error} "
        f"({r.compile_seconds:.0f} s to compile)")
  if not all(r.fits for r in reports):
    smaller = tuple(max(1, b // 4) for b in probes)
    if smaller == probes:
      return 0, MemoryModel(math.inf, math.inf), reports
    return find_batch(config, target, smaller, log)
  memory = MemoryModel.fit(*reports)
  batch = memory.largest_batch(target.budget)
  while batch > 0:
    check = compile_steps(config, target, batch, with_eval=False)[0]
    reports.append(check)
    log(f"  check: {batch} per {target.unit} -> {gib(check.total) if check.fits else check.error}")
    if check.fits and check.total <= target.budget:
      return batch, memory, reports
    batch = int(batch * 0.9) // 8 * 8 if batch > 8 else batch - 1
  return 0, memory, reports


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _budget(target: Target) -> str:
  """'79.11 GiB' or '59.33 GiB (75 % of 79.11 GiB: JAX's GPU allocator, XLA_CLIENT_MEM_FRACTION)'."""
  if target.memory_fraction == 1.0:
    return gib(target.hbm)
  return (f"{gib(target.budget)} ({target.memory_fraction:.0%} of {gib(target.hbm)}: JAX's GPU allocator, "
          "XLA_CLIENT_MEM_FRACTION)")


def _roofline(flops: float, nbytes: float, report: StepReport, target: Target, macs: int) -> str:
  """' -> 12.3 ms at the chip's peak and bandwidth, 4567 img/s per chip, MFU 28%' ('' without a datasheet)."""
  peak = target.chip.peak() if target.chip else None
  if not peak or not flops:
    return ""
  seconds = max(flops / peak, nbytes / target.chip.bandwidth)
  passes = 6 if report.name == "train step" else 2  # forward + backward = 3 forwards
  mfu = passes * macs * report.per_chip_batch / seconds / peak
  return (f" -> {seconds * 1e3:.1f} ms at the {target.unit}'s peak and bandwidth, "
          f"{report.per_chip_batch / seconds:.0f} img/s per {target.unit}, MFU {mfu:.0%}")


def report_lines(reports: list[StepReport], target: Target, config: Any, breakdown: bool = False) -> list[str]:
  """The human-readable report: memory per device, fit, the cost figures (modelled) and, with `breakdown`,
  the FLOPs and bytes of each part of the step."""
  macs = summary.count_macs(model_lib.variant_from_config(config.model), config.data.image_size,
                            config.model.num_classes)
  unit = target.unit
  lines = []
  for r in reports:
    head = f"{r.name}, {r.per_chip_batch} images per {unit}"
    if not r.fits:
      lines.append(f"{head}: does NOT fit ({r.error})")
      continue
    fits = "fits" if r.total <= (target.budget or math.inf) else "does NOT fit"
    verdict = f" of {_budget(target)}: {fits}" if target.budget else ""
    inputs = "parameters, optimiser state, batch" if r.name == "train step" else "parameters, batch"
    lines.append(f"{head}: arguments {gib(r.arguments)} ({inputs}) + temporaries {gib(r.temporaries)} + "
                 f"outputs {gib(r.outputs - r.aliased)} = {gib(r.total)}{verdict} "
                 f"(compiled in {r.compile_seconds:.0f} s)")
    if r.flops:
      lines.append(f"  modelled, not measured (XLA cost analysis, loop bodies counted once): "
                   f"{r.flops / 1e12:.2f} TFLOP and {r.bytes_accessed / 1e9:.1f} GB accessed per {unit} and step "
                   f"({r.bytes_accessed / r.per_chip_batch / 1e9:.3f} GB per image)"
                   + _roofline(r.flops, r.bytes_accessed, r, target, macs))
    if r.hlo:
      total = r.hlo.total
      kinds = sorted(r.hlo.census.items(), key=lambda kv: -kv[1].count)
      census = ", ".join(f"{t.count} {kind}" for kind, t in kinds)
      lines.append(f"  modelled from the HLO (each kernel's operands and outputs once, GEMM and conv FLOPs): "
                   f"{total.flops / 1e12:.2f} TFLOP and {total.bytes / 1e9:.1f} GB per {unit} and step "
                   f"({total.bytes / r.per_chip_batch / 1e9:.3f} GB per image)"
                   + _roofline(total.flops, total.bytes, r, target, macs))
      lines.append(f"  kernels: {census}")
      if breakdown:
        lines += breakdown_lines(r)
  return lines


def breakdown_lines(report: StepReport) -> list[str]:
  """The step's modelled FLOPs and bytes per image by part of the model, forward and backward."""
  rows = sorted(report.hlo.parts.items(), key=lambda kv: -(kv[1]["forward"].bytes + kv[1]["backward"].bytes))
  total = report.hlo.total.bytes or 1.0
  per = report.per_chip_batch
  lines = [f"  {'part':38} {'GFLOP/img fwd':>13} {'bwd':>7} {'MB/img fwd':>10} {'bwd':>8} {'bytes':>6}"]
  for name, t in rows:
    fwd, bwd = t["forward"], t["backward"]
    lines.append(f"  {name:38} {fwd.flops / per / 1e9:13.3f} {bwd.flops / per / 1e9:7.3f} "
                 f"{fwd.bytes / per / 1e6:10.1f} {bwd.bytes / per / 1e6:8.1f} "
                 f"{(fwd.bytes + bwd.bytes) / total:6.1%}")
  return lines


def advice(report: StepReport, config: Any) -> str:
  """What would make `report` fit, naming its biggest consumer."""
  biggest = ("the temporaries (activations kept for the backward pass, the augmentation)"
             if report.temporaries >= report.arguments else "the arguments (parameters and AdamW moments)")
  switches = []
  if config.model.remat == "none":
    switches.append("--config.model.remat=block (recompute each block in the backward pass)")
  if config.optim.grad_accum_steps == 1 and report.per_chip_batch % 2 == 0:
    switches.append("--config.optim.grad_accum_steps=2 or more (micro-batches of the same global batch)")
  if not config.fsdp:
    switches.append("--config.fsdp=True (parameters and optimiser state split over the chips)")
  switches.append("a larger slice (fewer images per chip)")
  return f"the biggest consumer is {biggest}; try {'; '.join(switches)}"
