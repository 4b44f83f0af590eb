"""`python train.py --config configs/cvt13.py --workdir out`: the same as `cvt-jax train` (see --help)."""

from cvt_jax.cli import train

if __name__ == "__main__":
  train.run()
