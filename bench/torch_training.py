"""The official CvT training step in PyTorch, assembled as microsoft/CvT assembles it (never installed).

The reference of tests/test_train_parity.py and bench/learning_curves.py, beside the model of
bench/torch_models.py. Read off microsoft/CvT @ f851e68:
- `lib/optim/build.py`: `torch.optim.AdamW(set_wd(model), lr, weight_decay)` (betas, eps: PyTorch's defaults),
  two groups; `WITHOUT_WD_LIST: ['bn', 'bias', 'ln']` and the model's `no_weight_decay()` (cls tokens) go to
  the group with weight decay 0; depthwise convs are decayed ('dw' is not in the list).
- `lib/scheduler/build.py` + `tools/train.py`: timm's `create_scheduler(ARGS)` with `ARGS.epochs = END_EPOCH`,
  `step(begin_epoch)` at once and `step(epoch + 1)` after each epoch: epoch e trains at lr(e) throughout.
- `lib/core/loss.py`: timm's Mixup targets (smoothing folded in) with `SoftTargetCrossEntropy` when
  `MIXUP_PROB > 0`, otherwise the official `LabelSmoothingCrossEntropy`.
- `lib/core/function.py`: `model.train()`; per batch mixup, forward, loss, `zero_grad`, backward, step.
- timm's loader (`create_loader`, prefetcher): uint8 batches normalised on the device as `(x - 255 mean) /
  (255 std)`, then random erasing. BatchNorm is `nn.BatchNorm2d` (momentum 0.1, running variance unbiased).
AMP is left out: the parity is in fp32.

timm imports torchvision, whose PyPI wheels are CUDA builds that fail at import beside the CPU torch; its
pure-Python transforms suffice, so `import_timm` assembles the package without running its `__init__`. The
official code pins timm 0.3.2; where 1.0.31 changed what it computes (cutmix's box for odd sizes, posterize
at 0 bits in newer Pillows), `import_timm` puts the 0.3.2 behaviour back.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvt_jax.model import MEAN_RGB
from cvt_jax.model import STD_RGB

# Unpacked beside the venv by ./run.sh test (pip install --no-deps --target ...).
TORCHVISION_DIR = os.path.join(sys.prefix, "torchvision-transforms")
TIMM_DIR = os.path.join(sys.prefix, "timm")
TIMM_VERSION = "1.0.31"
WITHOUT_WD_LIST = ("bn", "bias", "ln")  # the official yamls' TRAIN.WITHOUT_WD_LIST
# The official model's `no_weight_decay()`: every stage's pos_embed and cls_token.
NO_WEIGHT_DECAY = frozenset(f"stage{i}.{name}" for i in range(3) for name in ("pos_embed", "cls_token"))


def import_timm() -> types.ModuleType:
  """timm, with torchvision's Python modules standing in for the package (its C ops do not load here).

  Takes both from beside the venv where ./run.sh test unpacked them, else from sys.path. Undo with
  `forget_timm`.
  """
  if "torchvision" not in sys.modules and os.path.isdir(TORCHVISION_DIR):
    package = types.ModuleType("torchvision")
    package.__path__ = [os.path.join(TORCHVISION_DIR, "torchvision")]
    sys.modules["torchvision"] = package
  if os.path.isdir(TIMM_DIR) and TIMM_DIR not in sys.path:
    sys.path.append(TIMM_DIR)
  # pylint: disable=g-import-not-at-top
  import timm
  import timm.data
  import timm.data.auto_augment
  import timm.layers
  import timm.loss
  import timm.scheduler
  from PIL import Image, ImageOps

  def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    if bits_to_keep >= 8:
      return img
    if bits_to_keep <= 0:  # PosterizeIncreasing at magnitude 10: newer Pillows refuse, the official code's
      return img.point(lambda _: 0)  # gave black, as cvt_jax does
    return ImageOps.posterize(img, bits_to_keep)

  ops = timm.data.auto_augment.NAME_TO_OP
  ops.update({name: posterize for name, op in ops.items() if op is timm.data.auto_augment.posterize})

  mixup = timm.data.mixup

  def rand_bbox(img_shape, lam, margin=0.0, count=None):
    """The cutmix box of timm 0.3.2, which the official code pins: rows centre - cut // 2 to centre + cut // 2
    (newer timm ends at centre + (cut + 1) // 2, a pixel more when the cut is odd)."""
    assert margin == 0.0, "the official Mixup sets no margin"
    height, width = img_shape[-2:]
    cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
    cy = mixup.np.random.randint(0, height, size=count)  # mixup.np: the tests replay these draws
    cx = mixup.np.random.randint(0, width, size=count)
    return (np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height),
            np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width))

  mixup.rand_bbox = rand_bbox
  return timm


def forget_timm() -> None:
  """Removes what `import_timm` added: transformers probes for torchvision and timm and must find neither."""
  for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
    del sys.modules[name]
  if TIMM_DIR in sys.path:
    sys.path.remove(TIMM_DIR)


def set_wd(model: nn.Module, without_wd: Iterable[str] = WITHOUT_WD_LIST) -> list[dict[str, Any]]:
  """The official `set_wd`: [{'params': decayed}, {'params': not decayed, 'weight_decay': 0}]."""
  without_wd = set(without_wd)
  norm_types = tuple(t for key, t in (("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm), ("ln", nn.LayerNorm))
                     if key in without_wd)
  depthwise = lambda m: isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels
  exempt = {id(p) for m in model.modules() if norm_types and isinstance(m, norm_types) for p in (m.weight, m.bias)}
  exempt |= {id(m.weight) for m in model.modules() if depthwise(m) and "dw" in without_wd}
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    # The official code matches the skip names as substrings of the parameter names.
    if (any(s in name for s in NO_WEIGHT_DECAY) or id(p) in exempt
        or ("bias" in without_wd and name.endswith(".bias"))):
      no_decay.append(p)
    else:
      decay.append(p)
  return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
  """`build_optimizer` for `OPTIMIZER: adamW`."""
  return torch.optim.AdamW(set_wd(model), lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: float, warmup_lr: float,
                    min_lr: float, begin_epoch: int = 0) -> Any:
  """`build_lr_scheduler` for `METHOD: 'timm'` with the yamls' ARGS (cooldown and decay rate included:
  neither changes a cosine's lr within `epochs`); already stepped to `begin_epoch`."""
  args = types.SimpleNamespace(sched="cosine", epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
                               min_lr=min_lr, cooldown_epochs=10, decay_rate=0.1)
  scheduler, _ = import_timm().scheduler.create_scheduler(args, optimizer)
  scheduler.step(begin_epoch)
  return scheduler


class LabelSmoothingCrossEntropy(nn.Module):
  """The official `lib/core/loss.py` one (not timm's): eps * mean(-log p) + (1 - eps) * nll."""

  def __init__(self, epsilon: float = 0.1):
    super().__init__()
    self.epsilon = epsilon

  def forward(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_preds = F.log_softmax(preds, dim=-1)
    loss = -log_preds.sum(dim=-1).mean()
    nll = F.nll_loss(log_preds, target)
    return self.epsilon * loss / preds.shape[-1] + (1 - self.epsilon) * nll


def build_criterion(mixup_prob: float, label_smoothing: float) -> nn.Module:
  """The official `build_criterion(train=True)` for `LOSS: softmax`."""
  if mixup_prob > 0:
    return import_timm().loss.SoftTargetCrossEntropy()
  if label_smoothing > 0:
    return LabelSmoothingCrossEntropy(label_smoothing)
  return nn.CrossEntropyLoss()


def build_mixup(num_classes: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                label_smoothing: float, prob: float = 1.0) -> Any:
  """`train_one_epoch`'s timm Mixup (mode 'batch'), or None when `prob` is 0 or both alphas are."""
  if prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
    return None
  return import_timm().data.Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                                  switch_prob=switch_prob, mode="batch", label_smoothing=label_smoothing,
                                  num_classes=num_classes)


def normalize(images_nhwc: np.ndarray) -> torch.Tensor:
  """uint8 NHWC -> float32 NCHW as timm's PrefetchLoader normalises a batch."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).float()
  mean = torch.tensor([255 * m for m in MEAN_RGB]).view(1, 3, 1, 1)
  std = torch.tensor([255 * s for s in STD_RGB]).view(1, 3, 1, 1)
  return x.sub_(mean).div_(std)


@torch.no_grad()
def official_init_(model: nn.Module, seed: int) -> None:
  """The official `INIT: 'trunc_norm'`: Linear weights trunc-normal(0.02) (cut at +-2, a no-op) with zero
  biases, norms at weight 1 bias 0, cls tokens trunc-normal(0.02); convs and the head's bias keep PyTorch's
  default U(+-1/sqrt(fan_in))."""
  torch.manual_seed(seed)
  for module in model.modules():
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      module.reset_parameters()
    if isinstance(module, nn.Linear):
      nn.init.trunc_normal_(module.weight, std=0.02)
      if module is not getattr(model, "head", None):
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
      nn.init.ones_(module.weight)
      nn.init.zeros_(module.bias)
    if isinstance(getattr(module, "cls_token", None), nn.Parameter):
      nn.init.trunc_normal_(module.cls_token, std=0.02)


class OfficialTrainer:
  """`tools/train.py` + `train_one_epoch` on one process: `step` per batch, `end_epoch` after each epoch."""

  def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, epochs: int, warmup_epochs: float,
               warmup_lr: float, min_lr: float, num_classes: int, label_smoothing: float,
               mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5):
    self.model = model
    self.optimizer = build_optimizer(model, lr, weight_decay)
    self.scheduler = build_scheduler(self.optimizer, epochs, warmup_epochs, warmup_lr, min_lr)
    self.mixup = build_mixup(num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing)
    self.criterion = build_criterion(1.0 if self.mixup else 0.0, label_smoothing)
    self.soft_target_criterion = build_criterion(1.0, label_smoothing)  # the official loss for mixed targets

  @property
  def lr(self) -> float:
    return self.optimizer.param_groups[0]["lr"]

  def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
    """One training step on a normalised NCHW batch; returns the loss."""
    targets = labels
    if self.mixup is not None:
      images, targets = self.mixup(images, labels)
    return self._update(images, targets, self.criterion)

  def step_on_targets(self, images: torch.Tensor, targets: torch.Tensor) -> float:
    """One training step on a batch augmented and mixed elsewhere: normalised NCHW images and soft targets
    (smoothing included), with the loss the official code takes for soft targets; returns the loss."""
    return self._update(images, targets, self.soft_target_criterion)

  def _update(self, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module) -> float:
    self.model.train()
    loss = criterion(self.model(images), targets)
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    return loss.item()

  def end_epoch(self, epoch: int) -> None:
    self.scheduler.step(epoch + 1)

