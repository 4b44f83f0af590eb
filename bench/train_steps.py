r"""Time the real training step on this machine's devices, fed one synthetic batch (no data is read).

  python -m bench.train_steps --config cvt13:batch=256 --steps 50 --json steps.json

The step is the trainer's own (`trainer.build_steps`: on-device augmentation, forward, backward, AdamW,
sharded over every local device) on random uint8 images; it reports the compile time, the compiled
memory, each step's time, the median img/s after `--warmup` steps, the first and last loss, and the
device's peak memory where the backend counts it. `bench/gpu.sh` runs it on a GPU; it needs neither
TensorFlow nor a dataset.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath

from cvt_jax import parallel
from cvt_jax import workdir as workdir_lib
from cvt_jax.cli import runner
from cvt_jax.text import gib
from cvt_jax.train import trainer

FLAGS = flags.FlagValues()
_CONFIG = runner.define_config_flag(FLAGS, "Config name or file with its argument: cvt13:batch=256.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps, warm-up included.", lower_bound=1, flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 5, "Steps left out of the median.", lower_bound=0, flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", None, "Also write the result to this .json file.", flag_values=FLAGS)
flags.mark_flags_as_required(["config"], flag_values=FLAGS)


def time_steps(config: Any, steps: int, warmup: int) -> dict[str, Any]:
  """Compiles `config`'s train step for the local devices and runs it `steps` times on one batch."""
  mesh = parallel.make_mesh()
  num_classes = config.model.num_classes
  setup = trainer.make_setup(config, mesh)
  size, batch = config.data.image_size, config.global_batch_size
  variables = jax.jit(setup.model.init, out_shardings=parallel.replicated(mesh))(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  state = trainer.create_train_state(variables, setup.tx, mesh, config.fsdp)
  # The same program as `cvt-jax compile` builds (cvt_jax.aot.steps.compile_steps), so a persistent
  # compilation cache serves one from the other.
  train_step, _ = trainer.build_steps(config, setup, mesh, jax.random.key(0))
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()
  data = parallel.global_batch({"image": rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
                                "label": rng.integers(0, num_classes, local).astype(np.int32)}, mesh)
  started = time.perf_counter()
  compiled = train_step.lower(state, data).compile()
  compile_s = time.perf_counter() - started
  memory = compiled.memory_analysis()
  times, losses = [], []
  for _ in range(steps):
    started = time.perf_counter()
    state, metrics = compiled(state, data)
    losses.append(float(metrics["loss"]))  # fetching waits for the step
    times.append(time.perf_counter() - started)
  median = statistics.median(times[warmup:] or times)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"variant": config.model.variant, "image_size": size, "global_batch": batch,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "compile_s": compile_s,
          "compiled_temp_bytes": memory.temp_size_in_bytes, "compiled_argument_bytes": memory.argument_size_in_bytes,
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "step_s": times, "median_step_s": median,
          "img_per_s": batch / median, "loss_first": losses[0], "loss_last": losses[-1]}


def main(argv: Sequence[str]) -> None:
  runner.no_arguments(argv)
  if _JSON.value:
    workdir_lib.check_output(_JSON.value, ".json")
  result = time_steps(_CONFIG.value, _STEPS.value, _WARMUP.value)
  peak = result["peak_bytes_in_use"]
  print(f"{result['variant']} @{result['image_size']}, global batch {result['global_batch']} on "
        f"{result['devices']}: compiled in {result['compile_s']:.0f} s; median step "
        f"{result['median_step_s'] * 1e3:.1f} ms = {result['img_per_s']:.0f} img/s over {_STEPS.value} steps; "
        f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}"
        + (f"; peak device memory {gib(peak)}" if peak else ""), flush=True)
  if _JSON.value:
    epath.Path(_JSON.value).write_text(json.dumps(result, indent=1))


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS, runner.config_fields_help)


if __name__ == "__main__":
  run()
