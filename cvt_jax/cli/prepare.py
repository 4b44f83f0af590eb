r"""Write a dataset as ArrayRecord shards for fast, sharded reading: `cvt-jax prepare SRC DST`.

  cvt-jax prepare ~/imagenet /data/imagenet_ar                        # a folder tree: train/, val/
  cvt-jax prepare tfds:imagenet2012 gs://bucket/imagenet_ar --data_dir ~/tensorflow_datasets
  cvt-jax prepare --verify /data/imagenet_ar                         # check counts, checksums, labels
  cvt-jax train --config cvt13 --workdir out --config.data.source=array_record \
      --config.data.data_dir=/data/imagenet_ar

SRC is a folder tree `<root>/<split>/<class>/<image>` (labels = the sorted class folders of train/; local or
gs://) or `tfds:NAME`, a prepared TFDS dataset (TFRecord datasets are read through TensorFlow: `pip install
'cvt-jax[tfds]'`). DST (local or gs://) receives `<split>/<split>-NNNNN-of-NNNNN.array_record` shards
holding each image's encoded bytes, label and source path, and `dataset_info.json` (class names, per split
its shards with their record counts and SHA-256), written last. DST must not be inside SRC, nor SRC
inside DST.

Rerun the same command to resume an interrupted preparation (Ctrl-C stops it within seconds; a killed one
leaves temporary folders that the rerun removes): finished shards are kept. A resume must be the same job:
DST records the options and a fingerprint of the source (its class names, and per split the number of
files and a digest of their ordered names and labels), and a rerun after anything changed (a class or a
file added or removed, another --records_per_shard) is refused in one line that names the change, leaving
every file as it was. --restart removes what an earlier preparation wrote in DST (its shards, their
markers, dataset_info.json) and starts over. A file that is no image is reported and left out (the info
file lists it); a split folder or class folder without images stops the command before anything is
written. --verify reads every record: counts, checksums, labels against the class names (and a tree's
class folders), record order, and no stray files in the split folders.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from cvt_jax.cli import runner
from cvt_jax.data import prepare
from cvt_jax.data import records

FLAGS = flags.FlagValues()
_SPLITS = flags.DEFINE_list("splits", None, "Splits to write (default: train, val/validation/test of a tree "
                            "that has them; every split of a TFDS dataset).", flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir of a tfds:NAME source.", flag_values=FLAGS)
_RECORDS_PER_SHARD = flags.DEFINE_integer("records_per_shard", 1024, "Images per shard (ImageNet's train "
                                          "split: 1,252 shards of ~110 MiB).", lower_bound=1,
                                          flag_values=FLAGS)
_JOBS = flags.DEFINE_integer("jobs", 8, "Shards written at a time.", lower_bound=1, flag_values=FLAGS)
_VERIFY = flags.DEFINE_bool("verify", False, "Check a prepared DST against its dataset_info.json (record "
                            "counts, checksums, labels, order, stray files) instead of writing.", flag_values=FLAGS)
_RESTART = flags.DEFINE_bool("restart", False, "Remove what an earlier preparation (of this or another job) "
                             "wrote in DST, then start over.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
  if _VERIFY.value:
    if _RESTART.value:
      raise runner.UsageError("--verify writes nothing: it takes no --restart")
    if len(argv) != 2:
      raise runner.UsageError("--verify takes one argument, the prepared folder")
    records.verify(argv[1])
    return
  if len(argv) != 3:
    raise runner.UsageError(f"expected SRC and DST, got {len(argv) - 1} arguments (see --help)")
  prepare.prepare(argv[1], argv[2], splits=_SPLITS.value, data_dir=_DATA_DIR.value,
                  records_per_shard=_RECORDS_PER_SHARD.value, jobs=_JOBS.value, restart=_RESTART.value)


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
