r"""Compile the train and eval steps for a TPU slice (or this host), and report memory and fit per chip.

  cvt-jax compile --config cvt13 --topology v5e:2x2              # the config's global batch over 4 chips
  cvt-jax compile --config cvtw24 --topology v5e:16x16            # W24 @384, global batch 2048, 256 chips
  cvt-jax compile --config cvt13 --topology v5e:2x2 --per_chip_batch 128
  cvt-jax compile --config cvt13 --topology v5e:2x2 --find_batch --config.model.remat=block
  cvt-jax compile --config cvt13                                  # this host's devices (a GPU, say)

Nothing runs and no data is read: the real sharded train step (on-device augmentation, forward, backward,
AdamW) and eval step are lowered with abstract inputs and compiled ahead of time (as MaxText's
train_compile.py does), for compile-only devices of a TPU topology (libtpu: `pip install 'jax[tpu]'`,
on any host) or for the local devices. Per chip it prints the arguments (parameters, optimiser state,
batch), the temporaries, the total against the chip's HBM, and fits / does not fit; the step's FLOPs,
bytes accessed and the step time and MFU that XLA's cost model implies, labelled modelled: a compile
is no measurement. A step that does not fit exits 1 naming the biggest consumer and the switches that
help (model.remat, optim.grad_accum_steps, fsdp, a larger slice). `--find_batch` finds the largest
per-chip batch that fits: two compiles give memory = fixed + per-image x batch, a third checks the
prediction (memory is linear in the batch; XLA's cost analysis counts a loop body once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags

from cvt_jax import cli

# Per chip: HBM bytes, dense bf16 FLOP/s, HBM bytes/s (device_kind as libtpu names it).
TPU_CHIPS = {
    "TPU v4": (32 * 2**30, 275e12, 1.2e12),
    "TPU v5 lite": (16 * 2**30, 197e12, 8.2e11),
    "TPU v5": (95 * 2**30, 459e12, 2.76e12),
    "TPU v6 lite": (32 * 2**30, 918e12, 1.64e12),
}
_MEGACORE = ("v4", "v5p")  # chips of two TensorCores, one device per chip as deployed
_OOM = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\).*?HBM \(([\d.]+)([KMGT])\)", re.S)

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config name or file with its argument: cvtw24:res=384.", lock_config=True,
    flag_values=FLAGS)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology to compile for (v4:2x2x2, v5e:16x16, "
                                "v5p:4x4x4, ...); default: this host's devices.", flag_values=FLAGS)
_PER_CHIP_BATCH = flags.DEFINE_integer("per_chip_batch", None, "Images per chip per step (default: the "
                                       "config's global_batch_size over the chips).", lower_bound=1,
                                       flag_values=FLAGS)
_FIND_BATCH = flags.DEFINE_bool("find_batch", False, "Find the largest per-chip batch that fits.",
                                flag_values=FLAGS)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Head size (default: the config's).", lower_bound=1,
                                    flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", None, "Also write the report to this .json file.", flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)


class DoesNotFit(ValueError):
  """A step that needs more memory than a chip has."""


@dataclasses.dataclass
class StepReport:
  """What one compile says about one step, per chip (bytes)."""

  name: str
  per_chip_batch: int
  fits: bool
  arguments: int = 0  # parameters, optimiser state and the batch, as the step receives them
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


def _memory(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
          "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes}


def _cost(compiled: Any) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def compile_step(name: str, jitted: Any, args: Sequence[Any], per_chip_batch: int) -> StepReport:
  """Compiles `jitted` for abstract `args`; a step that does not fit HBM reports the sizes libtpu gave."""
  started = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except  # libtpu says RESOURCE_EXHAUSTED in several types
    match = _OOM.search(str(e))
    if not match:
      raise
    unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return StepReport(name, per_chip_batch, fits=False, temporaries=int(float(match[1]) * unit[match[2]]),
                      compile_seconds=time.perf_counter() - started,
                      error=f"temporaries {match[1]}{match[2]} exceed the HBM ({match[3]}{match[4]})")
  return StepReport(name, per_chip_batch, True, **_memory(compiled), flops=_cost(compiled)[0],
                    bytes_accessed=_cost(compiled)[1], compile_seconds=time.perf_counter() - started)


class Target:
  """The devices to compile for, and the per-chip figures the report compares against."""

  def __init__(self, topology: str | None):
    import jax  # pylint: disable=g-import-not-at-top

    self.topology = topology
    if topology:
      _quiet_libtpu()
      from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
      kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in _MEGACORE else {}
      try:
        self.devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
      except RuntimeError as e:
        if "TPU support not installed" in str(e):
          raise RuntimeError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' (any host; "
                             "or point TPU_LIBRARY_PATH at a libtpu.so)") from None
        raise ValueError(f"--topology {topology}: {cli.one_line(e)}") from None
    else:
      self.devices = jax.devices()
    self.kind = self.devices[0].device_kind
    self.platform = self.devices[0].platform
    known = TPU_CHIPS.get(self.kind)
    self.hbm, self.peak_flops, self.bandwidth = known if known else (self._local_memory(), None, None)

  def _local_memory(self) -> int | None:
    stats = self.devices[0].memory_stats() if hasattr(self.devices[0], "memory_stats") else None
    return (stats or {}).get("bytes_limit")

  @property
  def chips(self) -> int:
    return len(self.devices)

  def describe(self) -> str:
    where = self.topology or "this host"
    hbm = f"{self.hbm / 2**30:.2f} GiB each" if self.hbm else "memory unknown"
    return f"{where}: {self.chips} x {self.kind} ({hbm})"


def _quiet_libtpu() -> None:
  """libtpu asks the cloud metadata server and the environment about the host it runs on: a compile-only
  run answers for it (any values do), so nothing is looked up and nothing is printed."""
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)


def compile_steps(config: Any, target: Target, per_chip_batch: int, num_classes: int) -> list[StepReport]:
  """The train step and the eval step of `config`, compiled for `target` at `per_chip_batch` images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cvt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from cvt_jax import optim  # pylint: disable=g-import-not-at-top
  from cvt_jax import parallel  # pylint: disable=g-import-not-at-top
  from cvt_jax import train_lib  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(target.devices)
  model = model_lib.from_config(config.model, num_classes, target.platform)
  schedule = optim.make_schedule(config.schedule, config.optim.lr, config.num_epochs, steps_per_epoch=1000)
  tx = optim.make_optimizer(config.optim, schedule)
  abstract = train_lib.abstract_train_state(model, tx, config.data.image_size)
  shardings = parallel.state_shardings(abstract, mesh, config.fsdp)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  size, batch = config.data.image_size, per_chip_batch * target.chips
  on_batch = parallel.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=on_batch)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=on_batch)
  step = train_lib.shard_train_step(train_lib.make_train_step(
      model, tx, schedule, num_classes, config.augment, jax.random.key(0), target.chips,
      config.optim.grad_accum_steps), mesh, shardings)
  train = compile_step("train step", step, (state, {"image": images, "label": labels}), per_chip_batch)
  eval_model = model.clone(dtype=model_lib.compute_dtype(config.model.eval_dtype, target.platform), remat="none")
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  eval_step = train_lib.shard_eval_step(train_lib.make_eval_step(eval_model), mesh,
                                        {"params": shardings.params, "batch_stats": shardings.batch_stats})
  mask = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=on_batch)
  evaluation = compile_step("eval step", eval_step, (variables, {"image": images, "label": labels, "mask": mask}),
                            per_chip_batch)
  return [train, evaluation]


def find_batch(config: Any, target: Target, num_classes: int, log: Any = print) -> tuple[int, list[StepReport]]:
  """The largest per-chip batch (a multiple of 8) whose train step fits; the compiles that decided it."""
  if not target.hbm:
    raise ValueError(f"{target.kind}: its memory is unknown, so no batch can be found to fit it")
  probes = []
  for batch in (8, 16):
    report = compile_steps(config, target, batch, num_classes)[0]
    probes.append(report)
    log(f"  probe: {batch} per chip -> {_gib(report.total)} ({report.compile_seconds:.0f} s compile)")
    if not report.fits:
      break
  if not all(p.fits for p in probes):
    low = 1 if not probes[0].fits else 8
    for batch in range(low, 0, -1) if low == 1 else ():
      report = compile_steps(config, target, batch, num_classes)[0]
      probes.append(report)
      if report.fits:
        return batch, probes
    return (low if probes[0].fits else 0), probes
  per_image = (probes[1].total - probes[0].total) / 8
  fixed = probes[0].total - 8 * per_image
  guess = max(8, int((target.hbm - fixed) / per_image) // 8 * 8)
  while guess > 16:
    report = compile_steps(config, target, guess, num_classes)[0]
    probes.append(report)
    log(f"  check: {guess} per chip -> {_gib(report.total) if report.fits else report.error}")
    if report.fits:
      return guess, probes
    guess = int(guess * 0.9) // 8 * 8
  return 16, probes


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def report_lines(reports: list[StepReport], target: Target, config: Any, num_classes: int) -> list[str]:
  """The human-readable report: memory per chip, fit, and the cost model's figures (modelled)."""
  from cvt_jax import summary  # pylint: disable=g-import-not-at-top

  lines = []
  for r in reports:
    if not r.fits:
      lines.append(f"{r.name}, {r.per_chip_batch} images per chip: does NOT fit ({r.error})")
      continue
    hbm = f" of {_gib(target.hbm)}: {'fits' if r.total <= target.hbm else 'does NOT fit'}" if target.hbm else ""
    lines.append(f"{r.name}, {r.per_chip_batch} images per chip: arguments {_gib(r.arguments)} (parameters, "
                 f"optimiser state, batch) + temporaries {_gib(r.temporaries)} + outputs "
                 f"{_gib(r.outputs - r.aliased)} = {_gib(r.total)}{hbm} (compiled in {r.compile_seconds:.0f} s)")
    if r.name == "train step" and target.peak_flops:
      useful = 6 * summary.count_macs(_variant(config), config.data.image_size, num_classes) * r.per_chip_batch
      modelled = max(r.flops / target.peak_flops, r.bytes_accessed / target.bandwidth)
      lines.append(f"  modelled (XLA cost analysis, loop bodies counted once; not a measurement): "
                   f"{r.flops / 1e12:.2f} TFLOP and {r.bytes_accessed / 1e9:.1f} GB accessed per chip -> "
                   f"{modelled * 1e3:.1f} ms per step at the chip's peak and bandwidth, "
                   f"{r.per_chip_batch / modelled:.0f} img/s per chip, MFU {useful / modelled / target.peak_flops:.0%}")
  return lines


def _variant(config: Any):
  from cvt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  return model_lib.variant_from_config(config.model)


def advice(report: StepReport, config: Any, target: Target) -> str:
  """What would make `report` fit, naming its biggest consumer."""
  biggest = ("the temporaries (activations kept for the backward pass, the augmentation)"
             if report.temporaries >= report.arguments else "the arguments (parameters and AdamW moments)")
  switches = []
  if config.model.remat == "none":
    switches.append("--config.model.remat=block (recompute each block: ~4x less activation memory)")
  if config.optim.grad_accum_steps == 1 and report.per_chip_batch % 2 == 0:
    switches.append("--config.optim.grad_accum_steps=2 (or more: micro-batches of the same global batch)")
  if not config.fsdp:
    switches.append("--config.fsdp=True (split parameters and optimiser state over the chips)")
  switches.append("a larger slice (fewer images per chip)")
  return f"the biggest consumer is {biggest}; try {'; '.join(switches)}"


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _JSON.value:
    cli.check_output(_JSON.value, ".json")
  from cvt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from cvt_jax import train_lib  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  num_classes = _NUM_CLASSES.value or config.model.num_classes
  model_lib.variant_from_config(config.model)
  target = Target(_TOPOLOGY.value)
  print(f"compiling {config.model.variant} @{config.data.image_size} for {target.describe()}", flush=True)
  if _FIND_BATCH.value:
    batch, probes = find_batch(config, target, num_classes)
    print(f"largest per-chip batch that fits: {batch} ({batch * target.chips} on {target.chips} chips)")
    per_chip = batch
  else:
    per_chip = _PER_CHIP_BATCH.value or config.global_batch_size // target.chips
    if not _PER_CHIP_BATCH.value and config.global_batch_size % target.chips:
      raise cli.UsageError(f"global_batch_size={config.global_batch_size} does not split over {target.chips} "
                           "chips; pass --per_chip_batch")
  if config.optim.grad_accum_steps > 1 and per_chip % config.optim.grad_accum_steps:
    raise cli.UsageError(f"optim.grad_accum_steps={config.optim.grad_accum_steps} must divide the per-chip "
                         f"batch {per_chip}")
  reports = compile_steps(config, target, per_chip, num_classes) if per_chip else []
  for line in report_lines(reports, target, config, num_classes):
    print(line)
  if _JSON.value:
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(_JSON.value).write_text(json.dumps(
        {"target": target.describe(), "hbm_per_chip": target.hbm, "config": config.to_dict(),
         "reports": [{**dataclasses.asdict(r), "total": r.total} for r in reports]}, indent=1, default=str))
  failed = [r for r in reports if not r.fits or (target.hbm and r.total > target.hbm)]
  if failed or not reports:
    raise DoesNotFit(f"{(failed or [StepReport('train step', 0, False)])[0].name} does not fit "
                       f"{target.describe()}: {advice(failed[0], config, target) if failed else 'not even 1 per chip'}")
  del train_lib
  return 0


def run(argv: Sequence[str] | None = None) -> None:
  cli.run(main, argv, __doc__, FLAGS, cli.config_fields_help)


if __name__ == "__main__":
  run()
