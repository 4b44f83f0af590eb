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
from cvt_jax import model as model_lib
from cvt_jax import optim
from cvt_jax import parallel
from cvt_jax import summary
from cvt_jax import train_lib

_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, deployed as one device per chip
_OOM = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\).*?HBM \(([\d.]+)([KMGT])\)", re.S)
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


class Target:
  """The devices to compile for, and the per-device figures a report compares against."""

  def __init__(self, topology: str | None):
    self.topology = topology
    if topology:
      _prepare_libtpu()
      from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
      kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in _MEGACORE else {}
      try:
        self.devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
      except RuntimeError as e:
        if "TPU support not installed" in str(e):
          raise ValueError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' (any host), "
                           "or set TPU_LIBRARY_PATH to a libtpu.so") from None
        raise ValueError(f"--topology {topology}: {' '.join(str(e).split())}") from None
    else:
      self.devices = jax.devices()
    self.kind = self.devices[0].device_kind
    self.platform = self.devices[0].platform
    self.chip = hardware.chip(self.kind)
    self.hbm = self.chip.hbm if self.chip else self._local_memory()

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


def _compile(name: str, jitted: Any, args: Sequence[Any], per_chip_batch: int) -> StepReport:
  """Compiles `jitted` for abstract `args`; a step that does not fit HBM reports the sizes libtpu gave."""
  started = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except  # libtpu says RESOURCE_EXHAUSTED in several types
    match = _OOM.search(str(e))
    if not match:
      raise
    return StepReport(name, per_chip_batch, fits=False, temporaries=int(float(match[1]) * _UNITS[match[2]]),
                      compile_seconds=time.perf_counter() - started,
                      error=f"temporaries {match[1]}{match[2]} exceed the HBM ({match[3]}{match[4]})")
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return StepReport(name, per_chip_batch, True, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                    stats.alias_size_in_bytes, stats.temp_size_in_bytes, float(cost.get("flops", 0.0)),
                    float(cost.get("bytes accessed", 0.0)), time.perf_counter() - started)


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
  reports = [_compile("train step", train_step, (state, data), per_chip_batch)]
  if with_eval:
    data["mask"] = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=on_batch)
    reports.append(_compile("eval step", eval_step, (state.variables, data), per_chip_batch))
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
    log(f"  probe: {r.per_chip_batch} per chip -> {gib(r.total) if r.fits else r.error} "
        f"({r.compile_seconds:.0f} s to compile)")
  if not all(r.fits for r in reports):
    smaller = tuple(max(1, b // 4) for b in probes)
    if smaller == probes:
      return 0, MemoryModel(math.inf, math.inf), reports
    return find_batch(config, target, smaller, log)
  memory = MemoryModel.fit(*reports)
  batch = memory.largest_batch(target.hbm)
  while batch > 0:
    check = compile_steps(config, target, batch, with_eval=False)[0]
    reports.append(check)
    log(f"  check: {batch} per chip -> {gib(check.total) if check.fits else check.error}")
    if check.fits and check.total <= target.hbm:
      return batch, memory, reports
    batch = int(batch * 0.9) // 8 * 8 if batch > 8 else batch - 1
  return 0, memory, reports


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def report_lines(reports: list[StepReport], target: Target, config: Any) -> list[str]:
  """The human-readable report: memory per chip, fit, and the cost model's figures (modelled)."""
  lines = []
  for r in reports:
    head = f"{r.name}, {r.per_chip_batch} images per chip"
    if not r.fits:
      lines.append(f"{head}: does NOT fit ({r.error})")
      continue
    fits = "fits" if r.total <= (target.hbm or math.inf) else "does NOT fit"
    verdict = f" of {gib(target.hbm)}: {fits}" if target.hbm else ""
    inputs = "parameters, optimiser state, batch" if r.name == "train step" else "parameters, batch"
    lines.append(f"{head}: arguments {gib(r.arguments)} ({inputs}) + temporaries {gib(r.temporaries)} + "
                 f"outputs {gib(r.outputs - r.aliased)} = {gib(r.total)}{verdict} "
                 f"(compiled in {r.compile_seconds:.0f} s)")
    peak = target.chip.peak() if target.chip else None
    if r.name == "train step" and peak and r.flops:
      macs = summary.count_macs(model_lib.variant_from_config(config.model), config.data.image_size,
                                config.model.num_classes)
      seconds = max(r.flops / peak, r.bytes_accessed / target.chip.bandwidth)
      mfu = 6 * macs * r.per_chip_batch / seconds / peak
      lines.append(f"  modelled, not measured (XLA cost analysis, loop bodies counted once): "
                   f"{r.flops / 1e12:.2f} TFLOP and {r.bytes_accessed / 1e9:.1f} GB accessed per chip and step "
                   f"-> {seconds * 1e3:.1f} ms at the chip's peak and bandwidth, "
                   f"{r.per_chip_batch / seconds:.0f} img/s per chip, MFU {mfu:.0%}")
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
