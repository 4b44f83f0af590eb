"""`python train.py --config configs/cvt13.py --workdir out`: the same as `cvt-jax train` (see --help)."""

if __name__ == "__main__":
  # Imported here, not above: the input pipeline's worker processes re-import this script as they start.
  from cvt_jax.cli import train
  train.run()
