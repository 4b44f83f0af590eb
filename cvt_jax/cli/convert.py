r"""Convert a checkpoint to the cvt_jax weights format: `cvt-jax convert SRC DST.npz`.

SRC is a released PyTorch file (.pth/.pt/.bin/.ckpt/.safetensors, official or Hugging Face layout), a
Hugging Face hub name (microsoft/cvt-13, from the local cache when there), a training workdir (its newest
step, with its class names) or a converted .npz. DST is a .npz, local or gs://, written atomically: nothing
is left behind on an error. PyTorch is not needed. The variant and the class count are read off the tensors.

  cvt-jax convert CvT-13-224x224-IN-1k.pth cvt13_224.npz --verify
  cvt-jax convert out/finetune finetuned.npz            # class names go to finetuned.classes.txt
  cvt-jax convert out/cvt13 backbone.npz --nohead        # fine-tuning from it always starts a fresh head
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cvt_jax import trees
from cvt_jax import weights
from cvt_jax import workdir as workdir_lib
from cvt_jax.cli import runner

FLAGS = flags.FlagValues()
_HEADS = runner.define_heads_flag(FLAGS)
_HEAD = flags.DEFINE_bool("head", True, "Keep the classification head (--nohead: the backbone only).",
                          flag_values=FLAGS)
_VERIFY = flags.DEFINE_bool("verify", False, "Reload DST, compare it with the conversion and run one "
                            "forward pass.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise runner.UsageError(f"expected SRC and DST, got {len(argv) - 1} arguments (see --help)")
  src, dst = argv[1:]
  workdir_lib.check_output(dst, ".npz")
  print(f"reading {src}", flush=True)
  checkpoint = weights.load(src, heads=_HEADS.value)
  if not _HEAD.value:
    checkpoint = checkpoint.without_head()
  named = checkpoint.variant.name != "custom"
  print(f"variant: {checkpoint.variant.describe()}"
        + ("" if named else " -- matches no named variant, converted as a custom architecture"))
  print(f"classes: {checkpoint.num_classes or '0 (no head: features only)'}")
  print(f"params:  {checkpoint.num_params:,}")
  weights.save(checkpoint, dst)
  print(f"wrote {dst}", flush=True)
  if _VERIFY.value:
    _verify(dst, checkpoint)


def _verify(dst: str, converted: weights.Checkpoint) -> None:
  """Reloads `dst`, compares it with the converted arrays and runs one forward pass."""
  loaded = weights.load(dst)
  want, got = trees.flatten(converted.variables), trees.flatten(loaded.variables)
  differ = [k for k in want if not np.array_equal(want[k], got.get(k))]
  if differ or loaded.variant != converted.variant or loaded.num_classes != converted.num_classes:
    raise ValueError(f"{dst}: the reloaded file differs from the conversion (arrays: {differ[:5]})")
  out = jax.jit(loaded.model().apply)(loaded.variables, jnp.zeros((1, 224, 224, 3), jnp.float32))
  if not np.isfinite(np.asarray(out)).all():
    raise ValueError(f"{dst}: a forward pass gives non-finite outputs")
  print(f"verified: {len(got)} arrays reload bit-exact; a 224x224 forward pass gives finite outputs "
        f"{tuple(out.shape)}")


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
