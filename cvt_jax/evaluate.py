"""Evaluation of a checkpoint over every image of a split (`cvt-jax eval` is its command).

The checkpoint is anything `weights.load` reads (a workdir, a converted .npz, a PyTorch file, a hub name);
its own architecture and head are used, and the config supplies the data, the eval batch size and the
compute dtype (model.eval_dtype, float32 as the official evaluation). The dataset's classes are checked
against the head and the output is checked writable before any image is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
from absl import logging
from etils import epath

from cvt_jax import model as model_lib
from cvt_jax import parallel
from cvt_jax import text
from cvt_jax import weights
from cvt_jax import workdir as workdir_lib
from cvt_jax.data import input_pipeline
from cvt_jax.data import labels
from cvt_jax.train import trainer

_PROGRESS_SECONDS = 10.0
_WNID = re.compile(r"n\d{8}")


class ClassMismatchError(ValueError):
  """The dataset's classes do not match the checkpoint's head."""


def check_classes(checkpoint: weights.Checkpoint, info: input_pipeline.DatasetInfo, source: str,
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
    expected = tuple(wnid for wnid, _ in labels.imagenet_classes())
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


class _Progress:
  """Logs images evaluated / total and img/s every few seconds. The rate is the steady one, counted from
  the end of the first batch: it leaves out the compile and the input workers' start."""

  def __init__(self, total: int):
    self._total = total
    self._first = self._latest = None
    self._last_log = time.time()
    self._seen = self._after_first = 0

  def __call__(self, rows: int) -> None:
    """A batch of `rows` rows was evaluated."""
    now = self._latest = time.time()
    rows = min(rows, self._total - self._seen)  # not the padding
    self._seen += rows
    if self._first is None:
      self._first = now
    else:
      self._after_first += rows
    if now - self._last_log >= _PROGRESS_SECONDS or self._seen == self._total:
      rate = self.rate()
      steady = "" if rate is None else f", {rate:.1f} img/s after the first batch"
      eta = "" if rate is None else f", ETA {(self._total - self._seen) / max(rate, 1e-9):.0f}s"
      logging.info("eval: %d/%d images (%.0f%%)%s%s", self._seen, self._total, 100 * self._seen / self._total,
                   steady, eta)
      self._last_log = now

  def rate(self) -> float | None:
    """img/s from the end of the first batch to the end of the latest; None until a second one."""
    if not self._after_first:
      return None
    return self._after_first / max(self._latest - self._first, 1e-9)


def _dataset_label(spec: input_pipeline.DataSpec) -> str:
  """A short name of the dataset for file names: the TFDS name, else the data folder's name."""
  if spec.source == "tfds" or not spec.data_dir:
    return spec.name
  return os.path.basename(os.path.normpath(spec.data_dir))


def default_output(checkpoint: weights.Checkpoint, dataset: str, split: str, image_size: int) -> str:
  """`<workdir>/eval_<dataset>_<split>_<res>_step<N>.json`, `<file stem>.eval_<dataset>_<split>_<res>.json`
  beside a file, or `eval_<hub name>_<dataset>_<split>_<res>.json` in the current folder for a hub
  checkpoint."""
  name = re.sub(r"[^\w.-]", "_", f"eval_{dataset}_{split}_{image_size}")
  source = checkpoint.source
  if checkpoint.step is not None and epath.Path(source).is_dir():  # a workdir
    return os.path.join(source, f"{name}_step{checkpoint.step}.json")
  if weights.is_hub_name(source.split(" ")[0]):
    return f"eval_{source.split(' ')[0].replace('/', '_')}_{name[len('eval_'):]}.json"
  return f"{source.rsplit('.', 1)[0]}.{name}.json"


def _check_not_another_dataset(output: str, where: str) -> None:
  """A default output that holds the result of another dataset of the same folder name is kept."""
  try:
    earlier = json.loads(epath.Path(output).read_text()).get("dataset")
  except (OSError, ValueError, AttributeError):
    return
  if earlier not in (None, where):
    raise ValueError(f"{output} holds the evaluation of {earlier}, not of {where}: give --output <file.json> "
                     "to keep both")


def evaluate_checkpoint(config: Any, checkpoint_path: str, output: str | None = None,
                        heads: tuple[int, int, int] | None = None, strict: bool = False,
                        image_size: int | None = None) -> dict[str, Any]:
  """Evaluates `checkpoint_path` on `config.data`'s eval split; writes and returns the JSON summary.

  The resolution is `image_size` if given, else the checkpoint's training resolution when it knows it
  (workdirs and their exports), else the config's `data.image_size`.

  Raises:
    FileNotFoundError: a missing checkpoint or data path.
    ClassMismatchError: the dataset's classes do not fit the head.
    ValueError: an output that cannot be written; with `strict`, unreadable images.
  """
  parallel.check_global_batch_size(config.eval_batch_size, "eval_batch_size")
  input_pipeline.check_config(config.data)
  variant = model_lib.variant_from_config(config.model)  # for a workdir without model_info.json only
  checkpoint = weights.load(checkpoint_path, variant=variant, heads=heads)
  size = image_size or checkpoint.image_size or config.data.image_size
  if size < 32:
    raise ValueError(f"image size {size} must be >= 32")
  spec = dataclasses.replace(input_pipeline.DataSpec.from_config(config.data), image_size=size)
  where = spec.where(spec.eval_split)
  if not output:
    output = default_output(checkpoint, _dataset_label(spec), spec.eval_split, size)
    _check_not_another_dataset(output, where)
  workdir_lib.check_output(output, ".json")
  info = input_pipeline.dataset_info(spec, splits=(spec.eval_split,))
  check_classes(checkpoint, info, spec.source, where)
  if checkpoint.image_size and checkpoint.image_size != size:
    logging.warning("Evaluating at %d px as asked; %s was trained at %d px.", size, checkpoint.source,
                    checkpoint.image_size)

  started = time.time()
  mesh = parallel.make_mesh()
  model = checkpoint.model(dtype=model_lib.compute_dtype(config.model.eval_dtype, parallel.platform(mesh)),
                           kernels=config.model.kernels)
  variables = jax.device_put(checkpoint.variables, parallel.replicated(mesh))
  eval_step = trainer.shard_eval_step(trainer.make_eval_step(model), mesh)
  batch_size = input_pipeline.eval_batch_size(config.eval_batch_size, info.num_eval_examples)
  logging.info("Evaluating %s (%s, %d classes) on %s: %d images at %d px, batch %d on %s, %s.",
               checkpoint.source, checkpoint.variant.name, checkpoint.num_classes, where,
               info.num_eval_examples, size, batch_size, text.plural(jax.device_count(), "device"),
               config.model.eval_dtype)
  trainer.check_eval_batch_fits(eval_step, variables, batch_size, size, mesh)
  progress = _Progress(info.num_eval_examples)
  result = trainer.evaluate_batches(eval_step, variables, input_pipeline.eval_batches(spec, batch_size), mesh,
                                      on_step=progress)
  skipped = result["skipped"]
  missing = info.num_eval_examples - result["count"]
  if missing and strict:
    raise ValueError(f"{missing} of the {info.num_eval_examples} images of {where} are unreadable (--strict)"
                     + (f", e.g. {skipped[0]}" if skipped else ""))
  if missing:
    logging.warning("%d of the %d images of %s are unreadable: top-1/top-5 are over the %d others.",
                    missing, info.num_eval_examples, where, result["count"])
  seconds = time.time() - started
  steady = progress.rate()
  summary = {"checkpoint": checkpoint.source, "step": checkpoint.step, "variant": checkpoint.variant.name,
             "dataset": where, "image_size": size, "dtype": config.model.eval_dtype,
             "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
             "count": result["count"], "images": info.num_eval_examples, "skipped": skipped,
             "batch_size": batch_size,
             # the whole pass, compile and input start-up included; and the steady rate after the first batch
             "seconds": round(seconds, 2), "images_per_second": round(result["count"] / seconds, 1),
             "images_per_second_after_first_batch": None if steady is None else round(steady, 1)}
  if jax.process_index() == 0:
    path = epath.Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
  summary["output"] = output
  return summary
