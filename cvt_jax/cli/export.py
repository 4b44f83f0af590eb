r"""Export a checkpoint for serving: `cvt-jax export CHECKPOINT OUT_DIR`, loadable by plain `jax` or ONNX Runtime.

  cvt-jax export CvT-13-224x224-IN-1k.pth cvt13_served
  cvt-jax export out/finetune served --dtype bfloat16 --platforms cpu,cuda,tpu   # one file, three lowerings
  cvt-jax export CvT-13-224x224-IN-1k.pth cvt13_onnx --format onnx              # model.onnx
  python examples/serve.py cvt13_served cat.jpg     # jax, numpy and PIL only: no cvt_jax, no flax
  python examples/serve_onnx.py cvt13_onnx cat.jpg  # onnxruntime, numpy and PIL only
  cvt-jax predict --exported cvt13_served cat.jpg   # either format

CHECKPOINT is anything `cvt-jax convert` reads. OUT_DIR (a new or empty local folder, or an earlier export,
which is replaced) receives model.stablehlo, the `jax.export` serialization of the eval-mode forward with the
weights baked in: uint8 images (b, S, S, 3), already resized and centre-cropped as the official eval
transform does (signature.json says how), normalised inside; fp32 logits (b, classes) out; any batch size b.
signature.json holds that contract, classes.txt the class names when they are known. The files are written
into a staging folder beside OUT_DIR and renamed: an error leaves nothing behind. For consumers with a JAX
older than the exporting one, set JAX_EXPORT_CALLING_CONVENTION_VERSION (e.g. 9) when exporting.
--format onnx writes model.onnx instead (the same contract; float32; converted by jax2onnx, which
`pip install 'cvt-jax[onnx]'` installs). docs/serving.md compares the two.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import jax
from absl import flags

from cvt_jax import export
from cvt_jax import export_onnx
from cvt_jax import weights
from cvt_jax.cli import runner

FLAGS = flags.FlagValues()
_FORMAT = flags.DEFINE_enum("format", "stablehlo", ["stablehlo", "onnx"], "model.stablehlo (`jax.export`) or "
                            "model.onnx (ONNX Runtime and other ONNX runtimes).", flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input resolution, fixed in the artefact (default: "
                                   "the workdir's training resolution, else 224).",
                                   lower_bound=export.MIN_IMAGE_SIZE, flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", export.DTYPES, "Compute dtype (the logits are float32 either "
                           "way).", flag_values=FLAGS)
_PLATFORMS = flags.DEFINE_list("platforms", None, f"Lowerings to carry, any of {','.join(export.PLATFORMS)} "
                               "(default: this host's).", flag_values=FLAGS)
flags.register_validator("platforms", lambda p: p is None or (p and set(p) <= set(export.PLATFORMS)),
                         f"expected a comma-separated list of {', '.join(export.PLATFORMS)}", flag_values=FLAGS)
_HEADS = runner.define_heads_flag(FLAGS)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise runner.UsageError(f"expected CHECKPOINT and OUT_DIR, got {len(argv) - 1} arguments (see --help)")
  source, out_dir = argv[1:]
  onnx = _FORMAT.value == "onnx"
  if onnx:
    if _PLATFORMS.present:
      raise runner.UsageError("--platforms: lowerings of the StableHLO format; an ONNX model runs wherever its "
                              "runtime does")
    if _DTYPE.value not in export_onnx.DTYPES:
      raise runner.UsageError(f"--dtype {_DTYPE.value}: --format onnx exports {', '.join(export_onnx.DTYPES)} "
                              "(ONNX Runtime's CPU provider has no bfloat16 kernels)")
    export_onnx.check_installed("jax2onnx", "onnx")
  export.check_out_dir(out_dir)
  print(f"loading {source}", flush=True)
  checkpoint = weights.load(source, heads=_HEADS.value)
  image_size = _IMAGE_SIZE.value or checkpoint.image_size or 224
  platforms = tuple(dict.fromkeys(_PLATFORMS.value or [jax.export.default_export_platform()]))
  target = "ONNX" if onnx else ", ".join(platforms)
  print(f"exporting {checkpoint.variant.describe()}, {checkpoint.num_classes} classes, at {image_size}x"
        f"{image_size} in {_DTYPE.value} for {target}", flush=True)
  start = time.perf_counter()
  if onnx:
    export_onnx.save(export_onnx.export(checkpoint, image_size, _DTYPE.value), checkpoint, out_dir, _DTYPE.value)
  else:
    export.save(export.export(checkpoint, image_size, _DTYPE.value, platforms), checkpoint, out_dir, _DTYPE.value)
  model_file = export.ONNX_FILE if onnx else export.MODEL_FILE
  size = os.path.getsize(os.path.join(out_dir, model_file)) / 2**20
  print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s: {model_file} ({size:.1f} MiB), "
        f"{', '.join(sorted(set(os.listdir(out_dir)) - {model_file}))}")


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
