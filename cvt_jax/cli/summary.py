"""Parameters and multiply-accumulates (MACs) of a CvT variant: `cvt-jax summary cvt-13 --res 384`.

  cvt-jax summary --all                               # every variant at 224 and 384
  cvt-jax summary cvt-21 --res 384 --num_classes 21841

The paper's "GFLOPs" are MACs with the attention einsums included (ptflops misses those and reports
4.06G for CvT-13).
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from cvt_jax import complexity
from cvt_jax.cli import runner
from cvt_jax.model import VARIANTS
from cvt_jax.model import get_variant


def format_table(rows: list[tuple[str, int, int, int]]) -> str:
  lines = ["| variant | resolution | params | GMACs |", "|---|---|---|---|"]
  lines += [f"| {name} | {res}x{res} | {params:,} | {macs / 1e9:.3f} |" for name, res, params, macs in rows]
  return "\n".join(lines)


FLAGS = flags.FlagValues()
_RES = flags.DEFINE_integer("res", 224, "Input resolution (224 or 384; any works).", lower_bound=32,
                            flag_values=FLAGS)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier size; 0 for no head.", lower_bound=0,
                                    flag_values=FLAGS)
_ALL = flags.DEFINE_bool("all", False, "The table for every variant at 224 and 384.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 2:
    raise runner.UsageError(f"expected at most one variant, got {' '.join(argv[1:])}")
  try:
    names = sorted(VARIANTS) if _ALL.value else [get_variant(argv[1] if len(argv) > 1 else "cvt-13").name]
  except ValueError as e:
    raise runner.UsageError(str(e)) from e
  resolutions = (224, 384) if _ALL.value else (_RES.value,)
  rows = [(name, res, complexity.count_params(name, _NUM_CLASSES.value),
           complexity.count_macs(name, res, _NUM_CLASSES.value)) for name in names for res in resolutions]
  print(format_table(rows))


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
