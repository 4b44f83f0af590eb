r"""Learning curves side by side: the same narrow CvT and recipe trained by cvt_jax and by the official loop.

The official loop is bench/torch_training.py's (microsoft/CvT's step with timm's transforms, Mixup and
scheduler) on bench/torch_models.py's CvT, fed by timm's `create_transform` over the same JPEG folder tree
that cvt_jax's own pipeline reads. For each seed both start from the same weights (the official init in
PyTorch, converted by `cvt_jax.weights`); data order and augmentation draws are each framework's own.
Recipes: 'crop' (random-resized crop + flip, label smoothing 0.1: the demo's) and 'full' (the official
ImageNet chain: RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0, smoothing
0.1). Both use the demo's narrow CvT at 32 px, batch 64, AdamW lr 2e-3, and timm's per-epoch cosine.

  python -m bench.learning_curves --out bench/results/learning-curves-digits           # the demo's digits
  python -m bench.learning_curves --data_dir ~/flowers --out /tmp/flowers --epochs 30  # any folder tree
  python -m bench.learning_curves --out all --plot crop.json full.json  # one figure from several runs
  python -m bench.learning_curves --out same --same_batches   # both steps on cvt_jax's batches
  python -m bench.learning_curves --out inputs --compare_inputs 6   # the two pipelines' images, no training

Writes <out>.json (per epoch: val top-1 and mean train loss, per framework, recipe and seed; the machine)
after every run, and <out>.png (mean and min-max band over the seeds). With --same_batches each epoch also
records how far the two runs are apart (loss, val predictions, logits). Needs timm and torchvision's
transforms (./run.sh test unpacks both beside the venv) and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import textwrap
import time
from typing import Any

import numpy as np

RECIPES = ("crop", "full")
FRAMEWORKS = ("cvt_jax", "official")


def make_config(recipe: str, epochs: int, data_dir: str, num_classes: int, seed: int, overrides: str = "") -> Any:
  """The demo config (narrow CvT, 32 px, batch 64) with the official per-epoch schedule and `recipe`;
  `overrides` ('augment.mixup_alpha=0,optim.grad_accum_steps=4') changes config fields (ablations)."""
  from cvt_jax.configs import demo  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import augment  # pylint: disable=g-import-not-at-top

  config = demo.get_config(f"epochs={epochs}")
  config.seed = seed
  config.model.num_classes = num_classes
  config.data.source, config.data.data_dir, config.data.eval_split = "folder", data_dir, "val"
  config.data.num_workers = 0
  config.schedule.per_step = False  # timm's scheduler, stepped once per epoch by tools/train.py
  if recipe == "full":
    config.augment.update(augment.default_config())
  for item in filter(None, overrides.split(",")):
    path, _, value = item.partition("=")
    *parents, key = path.split(".")
    block = config
    try:
      for parent in parents:
        block = block[parent]
      block[key] = type(block[key])(value == "True" if value in ("True", "False") else value)
    except KeyError:
      raise ValueError(f"--set {item}: the config has no field {path}") from None
    except (ValueError, TypeError) as e:
      raise ValueError(f"--set {item}: {e}") from None
  return config


def initial_weights(config: Any, seed: int) -> tuple[Any, dict[str, Any]]:
  """(the PyTorch CvT at the official init of `seed`, the same weights as cvt_jax variables)."""
  import torch  # pylint: disable=g-import-not-at-top

  from bench import torch_models  # pylint: disable=g-import-not-at-top
  from bench import torch_training  # pylint: disable=g-import-not-at-top
  from cvt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from cvt_jax import weights  # pylint: disable=g-import-not-at-top

  net = torch_models.CvT(model_lib.variant_from_config(config.model), config.model.num_classes)
  torch_training.official_init_(net, seed)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "init.pth")
    torch.save(net.state_dict(), path)
    return net, weights.load(path, heads=tuple(config.model.heads)).variables


def perturbed(variables: dict[str, Any], scale: float, seed: int) -> dict[str, Any]:
  """cvt_jax's initial parameters each times (1 + scale u), u uniform in [-1, 1]: how far a run carries a
  difference of the size of fp32 rounding."""
  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p * (1 + scale * rng.uniform(-1, 1, p.shape)).astype(p.dtype), variables["params"])
  return {**variables, "params": params}


class _CvtJaxRun:
  """cvt_jax's train and eval steps and input pipeline for `config`, from `variables`, on one device (the
  whole batch is one GPU's, as in one official process)."""

  def __init__(self, config: Any, variables: dict[str, Any]):
    import jax  # pylint: disable=g-import-not-at-top

    from cvt_jax import parallel  # pylint: disable=g-import-not-at-top
    from cvt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    from cvt_jax.train import trainer  # pylint: disable=g-import-not-at-top

    self.config = config
    self.mesh = parallel.make_mesh(jax.devices()[:1])
    self.spec = input_pipeline.DataSpec.from_config(config.data)
    info = input_pipeline.dataset_info(self.spec)
    self.steps_per_epoch = input_pipeline.steps_per_epoch(info.num_train_examples, config.global_batch_size)
    self.setup = trainer.make_setup(config, self.mesh, self.steps_per_epoch, info.num_classes)
    self.state = trainer.create_train_state(jax.device_put(variables), self.setup.tx, self.mesh)
    _, self.train_rng = jax.random.split(jax.random.key(config.seed))  # as the trainer does
    self.train_step, self.eval_step = trainer.build_steps(config, self.setup, self.mesh, self.train_rng)

  def batches(self) -> Any:
    """The training batches, on the device (close() them)."""
    from cvt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

    return input_pipeline.Prefetcher(
        input_pipeline.train_batches(self.spec, self.config.global_batch_size, self.config.seed), self.mesh)

  def eval_batches(self) -> Any:
    from cvt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

    return input_pipeline.eval_batches(self.spec, self.config.eval_batch_size)


def train_cvt_jax(config: Any, variables: dict[str, Any]) -> dict[str, list[float]]:
  """cvt_jax's own run: its pipeline, augmentation, train and eval steps."""
  import jax  # pylint: disable=g-import-not-at-top

  from cvt_jax.train import trainer  # pylint: disable=g-import-not-at-top

  run = _CvtJaxRun(config, variables)
  batches = run.batches()
  curve: dict[str, list[float]] = {"val_top1": [], "train_loss": []}
  try:
    for _ in range(config.num_epochs):
      losses = []
      for _ in range(run.steps_per_epoch):
        run.state, metrics = run.train_step(run.state, next(batches))
        losses.append(metrics["loss"])
      curve["train_loss"].append(float(np.mean(jax.device_get(losses))))
      result = trainer.evaluate_batches(run.eval_step, run.state.variables, run.eval_batches(), run.mesh)
      curve["val_top1"].append(result["top1"])
  finally:
    batches.close()
  return curve


class _Folder:
  """`<root>/<split>/<class>/<image>` with labels by sorted class folder (torchvision's ImageFolder)."""

  def __init__(self, root: str, split: str, classes: tuple[str, ...], transform: Any):
    self.items = [(os.path.join(root, split, name, f), label) for label, name in enumerate(classes)
                  for f in sorted(os.listdir(os.path.join(root, split, name)))]
    self.transform = transform

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> tuple[Any, int]:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    path, label = self.items[index]
    with Image.open(path) as img:
      return self.transform(img.convert("RGB")), label


def official_trainer(config: Any, net: Any, num_classes: int, mixing: bool = True) -> Any:
  """bench/torch_training.py's official step and schedule for `config` (timm's Mixup unless not `mixing`)."""
  from bench import torch_training  # pylint: disable=g-import-not-at-top

  aug = config.augment
  return torch_training.OfficialTrainer(
      net, lr=config.optim.lr * config.global_batch_size / config.optim.lr_batch_size,
      weight_decay=config.optim.weight_decay, epochs=config.num_epochs,
      warmup_epochs=config.schedule.warmup_epochs, warmup_lr=config.schedule.warmup_lr,
      min_lr=config.schedule.min_lr, num_classes=num_classes, label_smoothing=aug.label_smoothing,
      mixup_alpha=aug.mixup_alpha if mixing else 0.0, cutmix_alpha=aug.cutmix_alpha if mixing else 0.0,
      switch_prob=aug.mixup_switch_prob)


def official_train_transform(config: Any) -> Any:
  """timm's `create_transform` for training as the official loader builds it for `config`."""
  from bench import torch_training  # pylint: disable=g-import-not-at-top

  aug = config.augment
  rand_augment = (f"rand-m{aug.randaugment_magnitude:g}-n{aug.randaugment_num_ops}-"
                  f"mstd{aug.randaugment_magnitude_std:g}-inc1")
  # The yamls' COLOR_JITTER 0.4 is dropped by timm when RandAugment is on, as in the recipe.
  return torch_training.import_timm().data.create_transform(
      config.data.image_size, is_training=True, scale=tuple(config.data.crop_scale),
      ratio=tuple(config.data.crop_ratio), hflip=0.5, color_jitter=None, interpolation="bicubic",
      auto_augment=rand_augment if aug.randaugment else None, re_prob=aug.erasing_prob, re_mode="pixel")


def train_official(config: Any, net: Any) -> dict[str, list[float]]:
  """The official loop: timm's transforms (as its loader builds them), Mixup, scheduler; drop_last."""
  import torch  # pylint: disable=g-import-not-at-top

  from bench import torch_training  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import sources  # pylint: disable=g-import-not-at-top

  timm = torch_training.import_timm()
  torch.manual_seed(config.seed)
  np.random.seed(config.seed)  # timm's Mixup draws from numpy, RandAugment from `random`
  random.seed(config.seed)
  eval_transform = timm.data.create_transform(config.data.image_size, is_training=False, interpolation="bicubic",
                                              crop_pct=0.875)
  classes = sources.class_folders(config.data.data_dir, "train")
  train = torch.utils.data.DataLoader(
      _Folder(config.data.data_dir, "train", classes, official_train_transform(config)),
      batch_size=config.global_batch_size, shuffle=True, drop_last=True)
  val = torch.utils.data.DataLoader(_Folder(config.data.data_dir, "val", classes, eval_transform),
                                    batch_size=config.eval_batch_size)
  trainer = official_trainer(config, net, len(classes))
  curve: dict[str, list[float]] = {"val_top1": [], "train_loss": []}
  for epoch in range(config.num_epochs):
    losses = [trainer.step(images, labels) for images, labels in train]
    trainer.end_epoch(epoch)
    curve["train_loss"].append(float(np.mean(losses)))
    net.eval()
    with torch.no_grad():
      hits = sum(int((net(images).argmax(-1) == labels).sum()) for images, labels in val)
    curve["val_top1"].append(100.0 * hits / len(val.dataset))
  return curve


# Per-image statistics of normalised (N, C, H, W) training images.
IMAGE_STATISTICS = {
    "mean": lambda x: x.mean((1, 2, 3)),
    "std": lambda x: x.std((1, 2, 3)),
    "share of bright pixels": lambda x: (x[:, 0] > 1.0).mean((1, 2)),
    "centre mean - mean": lambda x: (x[:, :, x.shape[2] // 4:-(x.shape[2] // 4), x.shape[3] // 4:-(x.shape[3] // 4)]
                                     .mean((1, 2, 3)) - x.mean((1, 2, 3))),
    "mean horizontal gradient": lambda x: np.abs(np.diff(x, axis=3)).mean((1, 2, 3)),
}


def compare_inputs(config: Any, epochs: int) -> dict[str, Any]:
  """The images each pipeline gives the step, `epochs` epochs of each: cvt_jax's host crops (and for the full
  recipe its device RandAugment and erasing) against timm's transforms, before mixing (compared apart, in
  tests/test_train_parity.py). Per statistic of IMAGE_STATISTICS: both means and stds and the two-sample
  Kolmogorov-Smirnov p-value."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top

  from bench import torch_training  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import sources  # pylint: disable=g-import-not-at-top

  spec = input_pipeline.DataSpec.from_config(config.data)
  steps = epochs * input_pipeline.steps_per_epoch(input_pipeline.dataset_info(spec).num_train_examples,
                                                  config.global_batch_size)
  unmixed = {**config.augment, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
  device_chain = jax.jit(lambda rng, images, labels: augment.train_augment(
      rng, images, labels, config.model.num_classes, unmixed)[0])
  batches = input_pipeline.train_batches(spec, config.global_batch_size, config.seed)
  rng = jax.random.key(config.seed)
  ours = np.concatenate([np.asarray(device_chain(jax.random.fold_in(rng, step), batch["image"], batch["label"]))
                         for step, batch in zip(range(steps), batches)]).transpose(0, 3, 1, 2)
  torch_training.import_timm()
  random.seed(config.seed)
  torch.manual_seed(config.seed)
  folder = _Folder(config.data.data_dir, "train", sources.class_folders(config.data.data_dir, "train"),
                   official_train_transform(config))
  per_epoch = len(ours) // epochs
  theirs = torch.stack([folder[int(i)][0] for _ in range(epochs)
                        for i in torch.randperm(len(folder))[:per_epoch]]).numpy()
  out = {"images": len(ours)}
  for name, statistic in IMAGE_STATISTICS.items():
    a, b = statistic(ours), statistic(theirs)
    out[name] = {"cvt_jax": [float(a.mean()), float(a.std())], "official": [float(b.mean()), float(b.std())],
                 "ks_p": float(stats.ks_2samp(a, b).pvalue)}
  return out


def train_same_batches(config: Any, net: Any, variables: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
  """Both steps on the same batches, from the same weights: cvt_jax's pipeline and device augmentation,
  the official step fed cvt_jax's augmented images and soft targets (its own draws replayed from the
  step's rng). What differs is the arithmetic alone, and how far fp32 rounding carries over a run.

  Returns {'cvt_jax': curve, 'official': curve}; each epoch also records the largest relative difference of
  the two steps' losses, and on the validation images (the same pixels for both) the share of predictions
  the two models agree on and the largest logit difference relative to the largest logit.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from bench import torch_training  # pylint: disable=g-import-not-at-top
  from cvt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cvt_jax.train import trainer  # pylint: disable=g-import-not-at-top

  run = _CvtJaxRun(config, variables)
  official = official_trainer(config, net, run.setup.model.num_classes, mixing=False)
  augmented = jax.jit(lambda rng, images, labels: augment.train_augment(
      rng, images, labels, run.setup.model.num_classes, config.augment))
  logits_of = jax.jit(lambda v, images: run.setup.model.apply(v, model_lib.normalize(images), train=False))
  to_torch = lambda x: torch.from_numpy(np.array(x))
  curves = {name: {"val_top1": [], "train_loss": []} for name in FRAMEWORKS}
  gaps: dict[str, list[float]] = {"max_loss_gap": [], "val_agreement": [], "max_logit_gap": []}
  batches = run.batches()
  try:
    for epoch in range(config.num_epochs):
      losses: dict[str, list[float]] = {name: [] for name in FRAMEWORKS}
      for _ in range(run.steps_per_epoch):
        batch = next(batches)
        aug_rng, _ = trainer.step_rngs(run.train_rng, run.state.step)
        images, targets = augmented(aug_rng, batch["image"], batch["label"])
        run.state, metrics = run.train_step(run.state, batch)
        losses["cvt_jax"].append(float(metrics["loss"]))
        losses["official"].append(official.step_on_targets(to_torch(images).permute(0, 3, 1, 2), to_torch(targets)))
      official.end_epoch(epoch)
      gaps["max_loss_gap"].append(float(np.max(np.abs(np.subtract(*losses.values())) / losses["official"])))
      hits = {name: 0 for name in FRAMEWORKS}
      agree, count, logit_gap = 0, 0, 0.0
      net.eval()
      for batch in run.eval_batches():
        mask = batch["mask"].astype(bool)
        ours = np.asarray(logits_of(run.state.variables, batch["image"]))[mask]
        with torch.no_grad():
          theirs = net(torch_training.normalize(batch["image"])).numpy()[mask]
        labels = batch["label"][mask]
        hits["cvt_jax"] += int((ours.argmax(-1) == labels).sum())
        hits["official"] += int((theirs.argmax(-1) == labels).sum())
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        count += len(labels)
        logit_gap = max(logit_gap, float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))))
      for name in FRAMEWORKS:
        curves[name]["val_top1"].append(100.0 * hits[name] / count)
        curves[name]["train_loss"].append(float(np.mean(losses[name])))
      gaps["val_agreement"].append(100.0 * agree / count)
      gaps["max_logit_gap"].append(logit_gap)
  finally:
    batches.close()
  for name in FRAMEWORKS:
    curves[name].update(gaps)
  return curves


def machine() -> dict[str, Any]:
  """The CPU the curves ran on."""
  info: dict[str, Any] = {"platform": platform.platform(), "cores": os.cpu_count()}
  try:
    with open("/proc/cpuinfo") as f:
      first = f.read().split("\n\n")[0].splitlines()  # the first core's block
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
    info["cpu"] = {k: fields[k] for k in ("model name", "cpu family", "model") if k in fields}
    info["avx512"] = "avx512f" in fields.get("flags", "")
  except OSError:
    pass
  return info


def summarize(runs: dict[str, Any]) -> dict[str, Any]:
  """Per recipe and framework: the final top-1's mean, std, min and max over the seeds."""
  out: dict[str, Any] = {}
  for recipe, frameworks in runs.items():
    for framework, seeds in frameworks.items():
      final = [run["val_top1"][-1] for run in seeds.values()]
      out.setdefault(recipe, {})[framework] = {
          "seeds": len(final), "final_top1_mean": float(np.mean(final)), "final_top1_std": float(np.std(final)),
          "final_top1_min": float(np.min(final)), "final_top1_max": float(np.max(final))}
  return out


def merged(paths: list[str]) -> dict[str, Any]:
  """Results files of the same set-up (e.g. one per recipe, run side by side) as one."""
  results: dict[str, Any] = {}
  for path in paths:
    with open(path) as f:
      part = json.load(f)
    runs = {**results.get("runs", {}), **part["runs"]}
    results = {**results, **part, "runs": runs, "summary": summarize(runs)}
  return results


def _title(results: dict[str, Any]) -> str:
  """What ran where: the data, the recipe, the seeds and the CPU."""
  m = results["machine"]
  cpu = m.get("cpu", {})
  where = (f"{cpu.get('model name', m['platform'])} (family {cpu.get('cpu family')} model {cpu.get('model')}"
           f"{', AVX-512' if m.get('avx512') else ''}), {m['cores']} cores")
  if m.get("note"):
    where += f"; {m['note']}"
  return (f"{os.path.basename(results['data_dir'].rstrip('/'))}, {results['epochs']} epochs: {results['recipe']}; "
          f"seeds {', '.join(map(str, results['seeds']))}; {where}")


def plot(results: dict[str, Any], path: str) -> None:
  """Val top-1 and train loss per epoch: the mean over seeds, a band from the lowest to the highest seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  recipes = [r for r in RECIPES if r in results["runs"]]
  fig, axes = plt.subplots(2, len(recipes), figsize=(5.5 * len(recipes), 7), squeeze=False)
  colours = {"cvt_jax": "tab:blue", "official": "tab:orange"}
  labels = {"cvt_jax": "cvt_jax", "official": "official loop (PyTorch + timm)"}
  for col, recipe in enumerate(recipes):
    for row, metric in enumerate(("val_top1", "train_loss")):
      ax = axes[row][col]
      for framework, seeds in results["runs"][recipe].items():
        curves = np.array([run[metric] for run in seeds.values()])
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), color=colours[framework],
                label=f"{labels[framework]} ({len(curves)} seeds)")
        ax.fill_between(epochs, curves.min(0), curves.max(0), color=colours[framework], alpha=0.25)
      ax.set_xlabel("epoch")
      ax.set_ylabel("val top-1 (%)" if metric == "val_top1" else "train loss (epoch mean)")
      ax.set_title(f"{recipe} recipe" if row == 0 else "")
      ax.grid(alpha=0.3)
      ax.legend(loc="lower right" if metric == "val_top1" else "upper right", fontsize=8)
  fig.suptitle("\n".join(textwrap.wrap(_title(results), 150)), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="writes <out>.json and <out>.png")
  parser.add_argument("--data_dir", default="", help="a folder tree <dir>/{train,val}/<class>/*; default: "
                      "the demo's digits, built under --digits_dir")
  parser.add_argument("--digits_dir", default="demo_data/digits")
  parser.add_argument("--epochs", type=int, default=12)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--recipes", default=",".join(RECIPES))
  parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="which to train (not with --same_batches)")
  parser.add_argument("--set", default="", help="config overrides for both, e.g. augment.randaugment=False,"
                      "optim.grad_accum_steps=4 (cvt_jax's BatchNorm then normalises each quarter apart)")
  parser.add_argument("--same_batches", action="store_true",
                      help="train both steps on cvt_jax's batches (its pipeline and augmentation draws): "
                      "the difference left is the arithmetic's")
  parser.add_argument("--perturb", type=float, default=0.0, metavar="SCALE",
                      help="multiply cvt_jax's initial parameters by (1 + SCALE u), u uniform in [-1, 1], e.g. 1e-7")
  parser.add_argument("--compare_inputs", type=int, default=0, metavar="EPOCHS",
                      help="train nothing: compare this many epochs of both pipelines' training images")
  parser.add_argument("--note", default="", help="recorded with the machine, e.g. what else loaded it")
  parser.add_argument("--plot", nargs="*", help="only draw <out>.png from these results files (merged)")
  args = parser.parse_args()
  json_path, png_path = f"{args.out}.json", f"{args.out}.png"
  frameworks = args.frameworks.split(",")
  if not set(frameworks) <= set(FRAMEWORKS):
    parser.error(f"--frameworks={args.frameworks}: choose from {','.join(FRAMEWORKS)}")
  try:
    make_config(RECIPES[0], args.epochs, "", 10, 0, args.set)
  except ValueError as e:
    parser.error(str(e))
  if args.plot is not None:
    plot(merged(args.plot), png_path)
    return

  from cvt_jax.data import digits  # pylint: disable=g-import-not-at-top
  from cvt_jax.data import sources  # pylint: disable=g-import-not-at-top

  # One thread each: on a shared host, PyTorch's and XLA's thread pools stall on busy cores (a step of
  # PyTorch took 25x longer with 2 threads than with 1 here).
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false",
                                      "intra_op_parallelism_threads=1"]).strip()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "cvt_jax_curves_cache"))
  data_dir = args.data_dir or digits.build_digits_tree(args.digits_dir)
  num_classes = len(sources.class_folders(data_dir, "train"))
  seeds = [int(s) for s in args.seeds.split(",")]
  results: dict[str, Any] = {
      "data_dir": data_dir, "epochs": args.epochs, "seeds": seeds, "machine": {**machine(), "note": args.note},
      "recipe": "demo CvT (dims 32/64/128, depths 1/1/2) at 32 px, batch 64, AdamW 2e-3 wd 0.05, cosine per "
                "epoch (warm-up 2 epochs), smoothing 0.1; 'full' adds RandAugment, erasing 0.25, mixup/cutmix",
      "overrides": args.set, "perturb": args.perturb, "batches": "shared" if args.same_batches else "own",
      "runs": {}}
  if args.compare_inputs:
    for recipe in args.recipes.split(","):
      config = make_config(recipe, args.epochs, data_dir, num_classes, seeds[0], args.set)
      results.setdefault("inputs", {})[recipe] = compare_inputs(config, args.compare_inputs)
      for name, row in results["inputs"][recipe].items():
        print(f"{recipe}: {name} {row}", flush=True)
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1)
    return
  for recipe in args.recipes.split(","):
    for seed in seeds:
      config = make_config(recipe, args.epochs, data_dir, num_classes, seed, args.set)
      net, variables = initial_weights(config, seed)
      if args.perturb:
        variables = perturbed(variables, args.perturb, seed)
      if args.same_batches:
        start = time.time()
        curves = train_same_batches(config, net, variables)
        for curve in curves.values():
          curve["seconds"] = round(time.time() - start, 1)  # the two steps' together
      else:
        curves = {}
        for framework in frameworks:
          start = time.time()
          curves[framework] = (train_cvt_jax(config, variables) if framework == "cvt_jax"
                               else train_official(config, net))
          curves[framework]["seconds"] = round(time.time() - start, 1)
      for framework, curve in curves.items():
        results["runs"].setdefault(recipe, {}).setdefault(framework, {})[str(seed)] = curve
        print(f"{recipe} seed {seed} {framework}: top-1 {curve['val_top1'][-1]:.2f} %, "
              f"loss {curve['train_loss'][-1]:.3f} ({curve['seconds']} s)", flush=True)
      if args.same_batches:
        print(f"  agreement on val {curves['cvt_jax']['val_agreement'][-1]:.1f} %, largest loss gap per epoch "
              f"{', '.join(f'{g:.1e}' for g in curves['cvt_jax']['max_loss_gap'])}", flush=True)
      results["summary"] = summarize(results["runs"])
      with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
  plot(results, png_path)


if __name__ == "__main__":
  main()
