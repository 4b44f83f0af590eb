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
import math
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from cvt_jax import parallel
from cvt_jax.aot import hlo as hlo_lib
from cvt_jax.aot.devices import Target
from cvt_jax.text import gib
from cvt_jax.train import trainer

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
  hlo: hlo_lib.Analysis | None = None  # the program's kernels, modelled (cvt_jax.aot.hlo)

  @property
  def total(self) -> int:
    """Peak HBM of the step: arguments, the outputs not written in place, and the temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


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
  mesh = parallel.make_mesh(target.devices)
  setup = trainer.make_setup(config, mesh)
  abstract = trainer.abstract_train_state(setup.model, setup.tx, config.data.image_size)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                       setup.state_sharding)
  train_step, eval_step = trainer.build_steps(config, setup, mesh, jax.random.key(0))
  on_batch = parallel.batch_sharding(mesh)

  def abstract_batch(per_chip: int, masked: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    n, size = per_chip * target.chips, config.data.image_size
    shapes = {"image": ((n, size, size, 3), jnp.uint8), "label": ((n,), jnp.int32)}
    if masked:
      shapes["mask"] = ((n,), jnp.bool_)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=on_batch) for k, (shape, dtype) in shapes.items()}

  reports = [_compile("train step", train_step, (state, abstract_batch(per_chip_batch)), per_chip_batch, target)]
  if with_eval:  # at the batch evaluation runs at: config.eval_batch_size over the chips
    eval_per_chip = -(-config.eval_batch_size // target.chips)
    reports.append(_compile("eval step", eval_step, (state.variables, abstract_batch(eval_per_chip, masked=True)),
                            eval_per_chip, target))
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
