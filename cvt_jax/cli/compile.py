r"""Compile the train and eval steps for a TPU slice, NVIDIA GPUs or this host; report memory and fit per device.

  cvt-jax compile --config cvt13 --topology v5e:2x2              # the config's global batch over 4 chips
  cvt-jax compile --config cvtw24 --topology v5e:16x16            # W24 @384, global batch 2048, 256 chips
  cvt-jax compile --config cvt13 --topology v5e:2x2 --per_chip_batch 128
  cvt-jax compile --config cvt13 --topology v5e:2x2 --find_batch --config.model.remat=block
  cvt-jax compile --config cvt13:batch=256 --topology h100        # one H100, from any host
  cvt-jax compile --config cvt13 --topology h100:8 --breakdown    # a node of 8; FLOPs and bytes per part
  cvt-jax compile --config cvt13 --topology a100:4x8              # 4 nodes of 8 A100s
  cvt-jax compile --config cvt13                                  # this host's devices (a GPU, say)

Nothing runs and no data is read: the real sharded train step (on-device augmentation, forward, backward,
AdamW) and eval step are lowered with abstract inputs and compiled ahead of time (as MaxText's
train_compile.py does), for compile-only devices of a TPU topology (libtpu: `pip install 'jax[tpu]'`, on
any host), of NVIDIA GPUs (XLA's CUDA plugin, which `./run.sh compile` unpacks; no GPU needed) or for the
local devices. Per device it prints the arguments (parameters, optimiser state, batch), the temporaries,
the total against the device's memory (on GPUs the 75 % JAX's allocator takes), and fits / does not fit;
then, labelled modelled (a compile is no measurement), XLA's FLOPs and bytes accessed where it gives them
(TPU), the same from the compiled HLO kernel by kernel (every platform), the kernel census (GEMMs,
convolutions, fused attention, other fusions, copies) and the step time and MFU they imply at the
device's peak and bandwidth; `--breakdown` splits FLOPs and bytes over the model's parts. A step that does
not fit exits 1 naming the biggest consumer and the switches that help. Memory is linear in the
per-device batch: `--find_batch` compiles two batches, solves for the largest one that fits and compiles
it to check.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from absl import flags
from etils import epath

from cvt_jax import workdir as workdir_lib
from cvt_jax.aot import devices
from cvt_jax.aot import report
from cvt_jax.aot import steps
from cvt_jax.cli import runner
from cvt_jax.text import gib
from cvt_jax.text import plural

FLAGS = flags.FlagValues()
_CONFIG = runner.define_config_flag(
    FLAGS, "Config name or file with its argument: cvtw24:res=384.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Devices to compile for: a TPU topology (v4:2x2x2, v5e:16x16, "
                                "v5p:4x4x4, ...) or NVIDIA GPUs, NAME[:[NODESx]GPUS] with NAME h100, h200 or "
                                "a100 (h100, h100:8, h100:4x8); default: this host's devices.", flag_values=FLAGS)
_PER_CHIP_BATCH = flags.DEFINE_integer("per_chip_batch", None, "Images per chip per step (default: the "
                                       "config's global_batch_size over the chips).", lower_bound=1,
                                       flag_values=FLAGS)
_FIND_BATCH = flags.DEFINE_bool("find_batch", False, "Find the largest per-chip batch that fits.",
                                flag_values=FLAGS)
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also print each step's modelled FLOPs and bytes per image "
                                "by part of the model (patch embeddings, q/k/v projections, attention, MLP, "
                                "norms, augmentation, loss, optimiser, layout changes), forward and backward.",
                                flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", None, "Also write the report to this .json file.", flag_values=FLAGS)
flags.mark_flags_as_required(["config"], flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  runner.no_arguments(argv)
  if _JSON.value:
    workdir_lib.check_output(_JSON.value, ".json")
  config = _CONFIG.value
  if _TOPOLOGY.value:
    try:
      devices.check_topology(_TOPOLOGY.value)
    except ValueError as e:
      raise runner.UsageError(str(e)) from None
  target = devices.Target(_TOPOLOGY.value)
  print(f"compiling {config.model.variant} @{config.data.image_size} for {target.describe()}", flush=True)
  if _FIND_BATCH.value:
    per_chip, memory, _ = steps.find_batch(config, target)
    print(f"largest per-{target.unit} batch that fits: {per_chip} ({per_chip * target.chips} on "
          f"{plural(target.chips, target.unit)}); "
          f"memory ~ {gib(memory.fixed)} + {memory.per_image / 2**20:.1f} MiB per image")
  else:
    per_chip = _PER_CHIP_BATCH.value or config.global_batch_size // target.chips
    if not _PER_CHIP_BATCH.value and config.global_batch_size % target.chips:
      raise runner.UsageError(f"global_batch_size={config.global_batch_size} does not split over {target.chips} "
                              "chips: pass --per_chip_batch")
  if per_chip and config.optim.grad_accum_steps > 1 and per_chip % config.optim.grad_accum_steps:
    raise runner.UsageError(f"optim.grad_accum_steps={config.optim.grad_accum_steps} must divide the per-chip "
                            f"batch {per_chip}")
  reports = steps.compile_steps(config, target, per_chip) if per_chip else []
  for line in report.report_lines(reports, target, config, _BREAKDOWN.value):
    print(line)
  if _JSON.value:
    epath.Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)  # check_output allowed a parent to make
    epath.Path(_JSON.value).write_text(json.dumps(
        {"target": target.describe(), "hbm_per_chip": target.hbm, "budget_per_chip": target.budget,
         "config": config.to_dict(),
         "reports": [{**dataclasses.asdict(r), "total": r.total} for r in reports]}, indent=1, default=str))
  failed = [r for r in reports if not r.fits or (target.budget and r.total > target.budget)]
  if not reports:
    raise steps.DoesNotFit(f"not even one image per chip fits {target.describe()}")
  if failed:
    raise steps.DoesNotFit(f"{failed[0].name} does not fit {target.describe()}: {report.advice(failed[0], config)}")


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS, runner.config_fields_help)


if __name__ == "__main__":
  run()
