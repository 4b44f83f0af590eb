"""`cvt-jax COMMAND [ARGS]`: the project's commands behind one entry point (`cvt-jax COMMAND --help`).

This module imports only the standard library: the input pipeline's worker processes re-import the console
script (and so this module) as they start.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn, Sequence

# command -> (module under cvt_jax.cli with `run(argv)`, one-line description); imported only when called.
COMMANDS = {
    "train": ("train", "train and evaluate from a config; rerun the same command to resume"),
    "eval": ("eval", "top-1/top-5 of a checkpoint over every image of a split"),
    "predict": ("predict", "top classes of image files"),
    "convert": ("convert", "any checkpoint (PyTorch, workdir, hub name) to a cvt_jax .npz"),
    "prepare": ("prepare", "a folder tree or TFDS dataset as ArrayRecord shards for fast, sharded reading"),
    "export": ("export", "a checkpoint as StableHLO (jax.export) for serving without cvt_jax"),
    "summary": ("summary", "parameters and MACs of a variant"),
    "compile": ("compile", "compile the train and eval steps for a TPU slice, a GPU node or this host; "
                           "report memory and fit"),
    "demo": ("demo", "train a small CvT on offline digit images and print its top-1"),
}


def main(argv: Sequence[str] | None = None) -> NoReturn:
  """The `cvt-jax` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"cvt-jax: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(f"cvt_jax.cli.{COMMANDS[command][0]}")
  module.run([f"cvt-jax {command}", *argv[2:]])


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"  {name:{width}}  {description}" for name, (_, description) in COMMANDS.items()]
  return ("usage: cvt-jax COMMAND [ARGS]   (cvt-jax COMMAND --help for its flags)\n\ncommands:\n"
          + "\n".join(lines))


if __name__ == "__main__":
  main()
