"""The text of `cvt-jax compile`: memory per device and fit, the modelled cost figures, and advice."""

from __future__ import annotations

import math
from typing import Any

from cvt_jax import complexity
from cvt_jax import model as model_lib
from cvt_jax.aot.devices import Target
from cvt_jax.aot.steps import StepReport
from cvt_jax.text import gib


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
  mfu = complexity.model_flops(macs, train=report.name == "train step") * report.per_chip_batch / seconds / peak
  return (f" -> {seconds * 1e3:.1f} ms at the {target.unit}'s peak and bandwidth, "
          f"{report.per_chip_batch / seconds:.0f} img/s per {target.unit}, MFU {mfu:.0%}")


def report_lines(reports: list[StepReport], target: Target, config: Any, breakdown: bool = False) -> list[str]:
  """The human-readable report: memory per device, fit, the cost figures (modelled) and, with `breakdown`,
  the FLOPs and bytes of each part of the step."""
  macs = complexity.count_macs(model_lib.variant_from_config(config.model), config.data.image_size,
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
