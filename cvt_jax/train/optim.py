"""The official CvT optimisers (AdamW with a decay mask; SGD for fine-tuning) and timm's warm-up + cosine."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array | int], jax.Array]


def scaled_lr(lr: float, lr_batch_size: int, global_batch_size: int) -> float:
  """The linear scaling rule: `lr` is given at `lr_batch_size` images per step."""
  return lr * global_batch_size / lr_batch_size


def epoch_lr(epoch: jax.Array | float, *, base_lr: float, num_epochs: int, warmup_epochs: float,
             warmup_lr: float, min_lr: float) -> jax.Array:
  """timm's CosineLRScheduler at (possibly fractional) `epoch`, as the official CvT configures it.

  Warm-up is linear from `warmup_lr` and replaces (not delays) the cosine, which counts from epoch 0:
  lr(e) = min_lr + 0.5 (base_lr - min_lr) (1 + cos(pi e / num_epochs)) for e >= warmup_epochs.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = warmup_lr + epoch * (base_lr - warmup_lr) / max(warmup_epochs, 1e-12)
  progress = jnp.minimum(epoch / num_epochs, 1.0)
  cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * progress))
  return jnp.where(epoch < warmup_epochs, warm, cosine)


def make_schedule(schedule_config: Any, base_lr: float, num_epochs: int, steps_per_epoch: int) -> Schedule:
  """optax schedule (step -> lr) from the config's `schedule` block.

  With `per_step=False` the lr is constant within an epoch (timm's `step(epoch)` once per epoch);
  `per_step=True` evaluates the same curve at the fractional epoch of every step.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")

  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
    if not schedule_config.per_step:
      epoch = jnp.floor(epoch)
    return epoch_lr(epoch, base_lr=base_lr, num_epochs=num_epochs,
                    warmup_epochs=schedule_config.warmup_epochs, warmup_lr=schedule_config.warmup_lr,
                    min_lr=schedule_config.min_lr)

  return schedule


def decay_mask(params: Any) -> Any:
  """True for the tensors the official code decays: every conv/linear `kernel` (depthwise ones too).

  Biases, LayerNorm/BatchNorm scales and the cls token are not decayed. Works on shapes
  (`jax.eval_shape` output) as well as on arrays.
  """
  def is_kernel(path, _):
    return getattr(path[-1], "key", None) == "kernel"

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(optim_config: Any, learning_rate: Schedule) -> optax.GradientTransformation:
  """`optim.name` 'adamw' (the official recipe) or 'sgd' (momentum; the paper's fine-tuning recipe).

  AdamW's decay is decoupled and scaled by the lr, as in torch.optim.AdamW; SGD's is added to the gradient
  before the momentum, as in torch.optim.SGD. Both decay only the tensors of `decay_mask`.
  """
  name = optim_config.get("name", "adamw")
  if name == "adamw":
    return optax.adamw(learning_rate, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                       weight_decay=optim_config.weight_decay, mask=decay_mask)
  if name == "sgd":
    sgd = optax.sgd(learning_rate, momentum=optim_config.momentum)
    if not optim_config.weight_decay:
      return sgd
    return optax.chain(optax.add_decayed_weights(optim_config.weight_decay, mask=decay_mask), sgd)
  raise ValueError(f"optim.name={name!r}; use 'adamw' or 'sgd'.")
