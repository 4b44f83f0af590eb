"""Latency of an exported CvT against the in-process model on this host, and the bf16 export's deviation.

  PYTHONPATH=. python bench/export_latency.py [CHECKPOINT] [--image_size 224] [--batches 1,8] [--rounds 15]

Without CHECKPOINT: CvT-13 with the official random initialisation (latency does not depend on the values).
Both contenders run in this process in interleaved rounds (a noisy machine slows both alike), on uint8
images already cropped; each time is one call, medians reported. Results go to stdout (bench/README.md).
"""

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from cvt_jax import export
from cvt_jax import model as model_lib
from cvt_jax import weights


def timed(fn, images) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(images))
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", nargs="?")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  if args.checkpoint:
    checkpoint = weights.load(args.checkpoint)
  else:
    model = model_lib.CvT.from_variant("cvt-13")
    variables = jax.tree.map(np.asarray, model.init_variables(jax.random.key(0), args.image_size))
    checkpoint = weights.Checkpoint(variables, model.spec, 1000, source="cvt-13, random init")
  model = checkpoint.model()
  variables = jax.device_put(checkpoint.variables)
  in_process = jax.jit(lambda v, x: model.apply(v, model_lib.normalize(x)))
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in ("float32", "bfloat16"):
      export.save(export.export(checkpoint, args.image_size, dtype), checkpoint, f"{tmp}/{dtype}", dtype)
    exported = {d: jax.jit(export.ExportedModel(f"{tmp}/{d}").exported.call) for d in ("float32", "bfloat16")}
  contenders = {"in-process": lambda x: in_process(variables, x), "exported": exported["float32"]}
  rng = np.random.default_rng(0)
  print(f"{checkpoint.source} @{args.image_size}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
  for batch in map(int, args.batches.split(",")):
    images = rng.integers(0, 256, (batch, args.image_size, args.image_size, 3), np.uint8)
    compile_s = {name: timed(fn, images) for name, fn in contenders.items()}
    times = {name: [] for name in contenders}
    for r in range(args.rounds):
      for name in list(contenders)[r % 2:] + list(contenders)[:r % 2]:  # alternate who goes first
        times[name].append(timed(contenders[name], images))
    for name, t in times.items():
      ms = 1000 * statistics.median(t)
      print(f"batch {batch}: {name:10s} {ms:8.1f} ms ({1000 * batch / ms:6.2f} img/s), first call "
            f"{compile_s[name]:.1f} s")
    fp32, bf16 = (np.asarray(contenders["exported"](images)), np.asarray(exported["bfloat16"](images)))
    print(f"batch {batch}: bf16 export vs fp32: max |diff| {np.abs(bf16 - fp32).max():.3g} = "
          f"{np.abs(bf16 - fp32).max() / np.abs(fp32).max():.3g} of max |logit|; top-1 agrees on "
          f"{np.mean(bf16.argmax(-1) == fp32.argmax(-1)):.0%}")


if __name__ == "__main__":
  main()
