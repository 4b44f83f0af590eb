r"""Fine-tuning vs training from scratch, offline: `python examples/finetune_digits.py --out finetune_demo`.

No ImageNet weights exist offline, so the "pretrained checkpoint" is made here with the normal pipeline:
  1. pretrain the narrow demo CvT (configs/demo.py widths, 32 px) on digits 0-4 (all their train images),
  2. export its workdir to a converted `.npz` (the format of converted PyTorch weights) without the head,
  3. fine-tune it with configs/finetune.py (SGD momentum 0.9, cosine, new 5-class head) on digits 5-9,
     from `--shots` train images per class and from all of them,
  4. train the same model from scratch on the same data with the same steps (SGD at a few learning rates,
     and AdamW, the from-scratch recipe), and print the val top-1 of every run (all val images of 5-9).
The two tasks share the scanner, the strokes and the style, unlike ImageNet and a user's dataset, so this
shows that the fine-tuning path works and transfers features; it does not measure ImageNet transfer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
from absl import flags
from absl import logging

from cvt_jax import weights
from cvt_jax.cli import runner
from cvt_jax.configs import demo as demo_config
from cvt_jax.configs import finetune
from cvt_jax.data import digits
from cvt_jax.train import trainer

FLAGS = flags.FlagValues()

_OUT = flags.DEFINE_string("out", "finetune_demo", "Data trees, workdirs and results.json go here.",
                           flag_values=FLAGS)
_DIGITS = flags.DEFINE_string("digits", "demo_data/digits", "The digits JPEG tree (built if missing).",
                              flag_values=FLAGS)
_SHOTS = flags.DEFINE_integer("shots", 10, "Train images per class of the few-shot fine-tuning runs.",
                              lower_bound=1, flag_values=FLAGS)
_PRETRAIN_EPOCHS = flags.DEFINE_integer("pretrain_epochs", 30, "Epochs on digits 0-4.", lower_bound=1,
                                        flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 120, "Training steps of every fine-tuning / scratch run.",
                              lower_bound=1, flag_values=FLAGS)
_FINETUNE_LRS = flags.DEFINE_list("finetune_lrs", ["0.003", "0.01", "0.03"],
                                  "SGD learning rates of the fine-tuning runs (at the batch used).",
                                  flag_values=FLAGS)
_SCRATCH_LRS = flags.DEFINE_list("scratch_lrs", ["0.01", "0.03", "0.1"],
                                 "SGD learning rates of the from-scratch runs (at the batch used).",
                                 flag_values=FLAGS)
_ADAMW_LR = flags.DEFINE_float("adamw_lr", 2e-3, "AdamW learning rate of the from-scratch AdamW run.",
                               flag_values=FLAGS)
_SETTINGS = flags.DEFINE_list("settings", ["few", "full"], "few: --shots images per class (batch 16); "
                              "full: every train image (batch 64).", flag_values=FLAGS)


def _config(data_dir: str, init: str, batch: int, steps: int, train_images: int, opt: str, lr: float):
  """configs/finetune.py for the demo's narrow CvT at 32 px, `steps` steps of `batch` images."""
  steps_per_epoch = train_images // batch
  epochs = -(-steps // steps_per_epoch)
  config = finetune.get_config(f"init={init},data={data_dir},classes=5,res=32,batch={batch},epochs={epochs},"
                               f"opt={opt},lr={lr},eval_every={epochs}")
  architecture = demo_config.get_config().model
  config.model.variant = architecture.variant
  config.model.dims, config.model.depths, config.model.heads = (
      architecture.dims, architecture.depths, architecture.heads)
  config.model.drop_path_rate, config.model.dtype = 0.0, "float32"
  config.optim.lr_batch_size = batch  # `lr` is the rate at this batch
  config.eval_batch_size = 64
  return config


def _run(name: str, config, workdir: str, results: dict) -> dict:
  started = time.time()
  _, result = trainer.train_and_evaluate(config, workdir)
  results[name] = {**result, "seconds": round(time.time() - started, 1), "init_from": config.init_from,
                   "optim": config.optim.name, "lr": config.optim.lr, "batch": config.global_batch_size,
                   "epochs": config.num_epochs}
  logging.info("%s: top-1 %.2f%% over %d val images", name, result["top1"], result["count"])
  return results[name]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise runner.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  out = os.path.abspath(_OUT.value)
  # Runs that differ only in their initial weights compile the same train step: compile it once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
  tree = digits.build_digits_tree(_DIGITS.value)
  source_classes, target_classes = [str(d) for d in range(5)], [str(d) for d in range(5, 10)]
  pretrain_tree = digits.subset_tree(tree, os.path.join(out, "data", "digits_0-4"), source_classes)
  full_tree = digits.subset_tree(tree, os.path.join(out, "data", "digits_5-9"), target_classes)
  few_tree = digits.subset_tree(tree, os.path.join(out, "data", f"digits_5-9_{_SHOTS.value}shot"),
                                target_classes, _SHOTS.value)
  count = lambda tree: sum(len(os.listdir(os.path.join(tree, "train", c))) for c in os.listdir(
      os.path.join(tree, "train")))
  results_path = os.path.join(out, "results.json")
  results: dict = {}
  if os.path.isfile(results_path):  # earlier invocations (other --settings) stay in the table
    with open(results_path) as f:
      results = json.load(f)

  pretrain_images = count(pretrain_tree)
  config = _config(pretrain_tree, "", 64, _PRETRAIN_EPOCHS.value * (pretrain_images // 64), pretrain_images,
                   "adamw", 2e-3)
  config.optim.weight_decay = 0.05
  _run("pretrain on 0-4", config, os.path.join(out, "pretrain"), results)
  # Headless: digits 5-9 also have 5 classes, and init_from would otherwise keep the 0-4 head.
  init = os.path.join(out, "pretrain_digits_0-4_backbone.npz")
  weights.save(weights.load(os.path.join(out, "pretrain")).without_head(), init)

  settings = {"few": (few_tree, f"{_SHOTS.value}-shot", 16), "full": (full_tree, "full", 64)}
  for tree, label, batch in (settings[s] for s in _SETTINGS.value):
    images = count(tree)
    runs = [("fine-tune", init, "sgd", float(lr)) for lr in _FINETUNE_LRS.value]
    runs += [("scratch", "", "sgd", float(lr)) for lr in _SCRATCH_LRS.value]
    runs += [("scratch", "", "adamw", _ADAMW_LR.value)]
    for run, start, opt, lr in runs:
      name = f"{run} {label} {opt} lr={lr:g}"
      _run(name, _config(tree, start, batch, _STEPS.value, images, opt, lr),
           os.path.join(out, name.replace(" ", "_")), results)
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)
  print(f"{'run (digits 5-9 val top-1 unless pretrain)':44s} {'top-1':>7s} {'images':>6s} {'epochs':>6s} "
        f"{'batch':>5s}")
  for name, r in results.items():
    print(f"{name:44s} {r['top1']:6.2f}% {r['count']:6d} {r['epochs']:6d} {r['batch']:5d}")


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
