r"""Evaluates a checkpoint over every image of a split: top-1, top-5, loss and the image count.

  python -m cvt_jax.evaluate --config configs/cvt13.py --checkpoint CvT-13-224x224-IN-1k.pth \
      --config.data.data_dir=~/tensorflow_datasets
  python -m cvt_jax.evaluate --config configs/cvt13.py:res=384 --checkpoint cvt13_384.npz \
      --data ~/imagenet          # a folder tree <root>/{train,val}/<wnid>/*.JPEG
  python -m cvt_jax.evaluate --config configs/finetune.py:... --checkpoint out/finetune   # a workdir

The checkpoint is an orbax training workdir (its latest step), a converted `.npz` or a PyTorch file
(converted on the fly); its own architecture and head are used, the config supplies the data, the
resolution (224: resize 256 + centre crop, 384: squash), the eval batch size and the compute dtype.
The dataset's classes are checked against the head before any image is read. The result is printed and
written as JSON (`--output`, default next to the checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cvt_jax import input_pipeline
from cvt_jax import parallel
from cvt_jax import pretrained
from cvt_jax import train_lib

_PROGRESS_SECONDS = 10.0
_WNID = re.compile(r"n\d{8}")


class ClassMismatchError(ValueError):
  """The dataset's classes do not match the checkpoint's head."""


def check_classes(checkpoint: pretrained.Checkpoint, info: input_pipeline.DatasetInfo, source: str,
                  where: str) -> None:
  """Fails unless the dataset's label order is the one the head was trained with.

  The class count must equal the head size. The names are compared with the checkpoint's stored class
  names (fine-tuned runs) or, for a 1000-class head without them, with the sorted ImageNet WNIDs of
  `imagenet_classes.tsv`: always for a folder tree (`source` 'folder'), for TFDS when its names are WNIDs.

  Raises:
    ClassMismatchError: naming the dataset, both counts or the first label that differs.
  """
  if info.num_classes != checkpoint.num_classes:
    raise ClassMismatchError(
        f"{where} has {info.num_classes} classes ({_preview(info.class_names)}) but the head of "
        f"{checkpoint.source} has {checkpoint.num_classes}; evaluate on the dataset it was trained for.")
  expected, kind = checkpoint.class_names, "the classes stored with the checkpoint"
  if expected is None and checkpoint.num_classes == 1000:
    if source != "folder" and not all(_WNID.fullmatch(name) for name in info.class_names):
      logging.info("%s does not name its classes by WNID; only the class count was checked.", where)
      return
    expected = tuple(wnid for wnid, _ in pretrained.imagenet_classes())
    kind = "the sorted ImageNet WNIDs of imagenet_classes.tsv"
  if expected is None or tuple(info.class_names) == tuple(expected):
    return
  first = next(i for i, (a, b) in enumerate(zip(info.class_names, expected)) if a != b)
  message = (f"the class order of {where} differs from {kind} from label "
             f"{first} on: dataset {info.class_names[first]!r} vs checkpoint {expected[first]!r}. "
             "Labels are the sorted folder names; a different order gives near-chance accuracy.")
  if sorted(info.class_names) == sorted(expected) or checkpoint.class_names is None:
    raise ClassMismatchError(message)
  logging.warning("Class names differ (%s); evaluating by label index.", message)


def _preview(names: tuple[str, ...], count: int = 3) -> str:
  shown = ", ".join(names[:count])
  return shown + (", ..." if len(names) > count else "")


def _with_progress(batches: Iterable[input_pipeline.Batch], total: int) -> Iterator[input_pipeline.Batch]:
  """Passes batches through, logging images loaded / total and img/s every few seconds."""
  started = last = time.time()
  seen = 0
  for batch in batches:
    yield batch
    seen = min(total, seen + int(batch["mask"].shape[0]) * jax.process_count())
    now = time.time()
    if now - last >= _PROGRESS_SECONDS or seen == total:
      rate = seen / max(now - started, 1e-9)
      logging.info("eval: %d/%d images (%.0f%%), %.1f img/s, ETA %.0fs", seen, total, 100 * seen / total,
                   rate, (total - seen) / max(rate, 1e-9))
      last = now


def default_output(checkpoint: pretrained.Checkpoint, split: str, image_size: int) -> str:
  """`<workdir>/eval_<split>_<res>_step<N>.json`, or `<file stem>.eval_<split>_<res>.json` beside a file."""
  name = f"eval_{split.replace('/', '_').replace(':', '_')}_{image_size}"
  if checkpoint.step is not None:
    return os.path.join(checkpoint.source, f"{name}_step{checkpoint.step}.json")
  return f"{os.path.splitext(checkpoint.source)[0]}.{name}.json"


def evaluate_checkpoint(config: Any, checkpoint_path: str, output: str | None = None,
                        heads: tuple[int, int, int] | None = None) -> dict[str, Any]:
  """Evaluates `checkpoint_path` on `config.data`'s eval split; writes and returns the JSON summary.

  Raises:
    FileNotFoundError: a missing checkpoint or data path.
    ClassMismatchError: the dataset's classes do not fit the head.
    RuntimeError: the pass did not count every image of the split (e.g. undecodable files).
  """
  parallel.check_global_batch_size(config.eval_batch_size, "eval_batch_size")
  variant = train_lib.model_variant(config.model)  # used only by a workdir without model_info.json
  checkpoint = pretrained.load(checkpoint_path, variant=variant, heads=heads)
  spec = input_pipeline.DataSpec.from_config(config.data, config.data.image_size)
  where = (f"folder tree {os.path.join(spec.data_dir, spec.eval_split)!r}" if spec.source == "folder"
           else f"TFDS {spec.name}:{spec.eval_split}")
  info = input_pipeline.dataset_info(spec)
  check_classes(checkpoint, info, spec.source, where)
  if checkpoint.image_size and checkpoint.image_size != spec.image_size:
    logging.info("Trained at %d px, evaluating at %d px.", checkpoint.image_size, spec.image_size)

  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  model = checkpoint.model(dtype=train_lib.compute_dtype(config.model.dtype),
                           depthwise_impl=config.model.depthwise_impl)
  state = jax.device_put(train_lib.TrainState(
      step=jnp.asarray(checkpoint.step or 0, jnp.int32), params=checkpoint.variables["params"],
      batch_stats=checkpoint.variables["batch_stats"], opt_state=None), replicated)
  eval_step = jax.jit(train_lib.make_eval_step(model),
                      in_shardings=(replicated, parallel.batch_sharding(mesh)), out_shardings=replicated)
  logging.info("Evaluating %s (%s, %d classes) on %s: %d images at %d px, batch %d on %d devices.",
               checkpoint.source, checkpoint.variant.name, checkpoint.num_classes, where,
               info.num_eval_examples, spec.image_size, config.eval_batch_size, jax.device_count())
  started = time.time()
  batches = _with_progress(input_pipeline.eval_batches(spec, config.eval_batch_size), info.num_eval_examples)
  result = train_lib.evaluate(eval_step, state, batches, mesh)
  seconds = time.time() - started
  if result["count"] != info.num_eval_examples:
    raise RuntimeError(f"counted {result['count']} of the {info.num_eval_examples} images of {where}; "
                       "the missing ones were undecodable (see the warnings above).")
  summary = {"checkpoint": os.path.abspath(checkpoint.source), "step": checkpoint.step,
             "variant": checkpoint.variant.name, "dataset": where, "image_size": spec.image_size,
             "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
             "count": result["count"], "seconds": round(seconds, 2),
             "images_per_second": round(result["count"] / max(seconds, 1e-9), 1)}
  output = output or default_output(checkpoint, spec.eval_split, spec.image_size)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(summary, f, indent=1)
  summary["output"] = output
  return summary


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (data, resolution, eval batch), e.g. configs/cvt13.py:res=384.",
    lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir (latest step), converted .npz, or PyTorch .pth/.bin/.safetensors.")
_DATA = flags.DEFINE_string("data", None, "Shortcut for a folder tree: sets data.source=folder and "
                            "data.data_dir (the root holding train/ and val/).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON summary path (default: next to the checkpoint).")
_HEADS = flags.DEFINE_list("heads", None, "Attention heads per stage of a custom-width PyTorch checkpoint.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if _DATA.value:
    config.data.source, config.data.data_dir = "folder", os.path.expanduser(_DATA.value)
  heads = tuple(int(h) for h in _HEADS.value) if _HEADS.value else None
  try:
    summary = evaluate_checkpoint(config, _CHECKPOINT.value, _OUTPUT.value, heads)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    logging.debug("Details:", exc_info=True)
    sys.exit(f"evaluate: {type(e).__name__}: {e}")
  print(f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  loss {summary['loss']:.4f}  "
        f"images {summary['count']}  ({summary['images_per_second']:.1f} img/s)  -> {summary['output']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
