"""The trainer: one jitted, sharded train step, padded evaluation, and the resumable training loop.

Data parallel over a ('data',) mesh of every device of every process: each process loads its slice of the
global batch, `parallel.global_batch` makes one sharded `jax.Array`; parameters and optimiser state are
replicated, or split over 'data' with `config.fsdp`. Under jit, BatchNorm statistics are computed over the
whole global batch (synchronised BN), where the official code used per-GPU statistics; it only touches the
small conv-projection BNs. Mixup/cutmix pair images within each device's part of the batch, as the
official per-GPU code does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, ContextManager, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from cvt_jax import checkpointing
from cvt_jax import model as model_lib
from cvt_jax import ops
from cvt_jax import parallel
from cvt_jax import text
from cvt_jax import trees
from cvt_jax import weights
from cvt_jax import workdir as workdir_lib
from cvt_jax.aot import hardware
from cvt_jax.data import augment
from cvt_jax.data import input_pipeline
from cvt_jax.train import optim
from cvt_jax.train import tensorboard

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Variables = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config (the data position is a function of `step`)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> Variables:
    return {"params": self.params, "batch_stats": self.batch_stats}


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example cross entropy against soft targets (mixup/cutmix/smoothing), in fp32."""
  return -jnp.sum(targets.astype(jnp.float32) * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def step_rngs(base_rng: jax.Array, step: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """(augmentation rng, drop-path rng) of training step `step`: a function of the run's rng and the step
  alone, so a resumed run draws exactly what an uninterrupted one would."""
  aug_rng, drop_rng = jax.random.split(jax.random.fold_in(base_rng, step))
  return aug_rng, drop_rng


def make_train_step(model: model_lib.CvT, tx: optax.GradientTransformation, schedule: optim.Schedule,
                    augment_config: Any, base_rng: jax.Array, *, shards: int = 1, grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The pure train step (jit it): augment on device, forward/backward, AdamW update, metrics.

  Args:
    model, tx, schedule: the model (its `num_classes` sizes the soft targets), the optimiser and its
      learning-rate schedule (for the metrics).
    augment_config: `config.augment`.
    base_rng: the run's rng; step k draws from `step_rngs(base_rng, k)`.
    shards: mixup/cutmix pair images within this many equal parts of the batch (the device count).
    grad_accum_steps: split the batch into this many micro-batches, each holding an equal part of every
      shard, and average their gradients: the same update from less memory. BatchNorm then normalises each
      micro-batch with its own statistics (as the official per-GPU BatchNorm normalised per GPU batch), and
      the running averages move once per step, by the mean of the micro-batches' statistics. With micro-
      batches of identical statistics the step equals the plain one up to fp32 rounding, but for the
      running variances: each takes its micro-batch's unbiased variance (n / (n - 1) with its n).
  """

  def loss_fn(params, batch_stats, images, targets, drop_rng):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                  mutable=["batch_stats"], rngs={"drop_path": drop_rng})
    with jax.named_scope("loss"):  # the scopes name the step's parts in the compiled HLO (cvt_jax.aot.hlo)
      return soft_cross_entropy(logits, targets).mean(), updates["batch_stats"]

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  # RandAugment gathers ('cpu' formulation) where gathers are cheap, on CPUs and GPUs; on TPUs, where a
  # gather costs about a memory tile per element, it gathers nothing (docs/performance.md).
  augment_kernels = "plain" if ops.resolve_kernels(model.kernels) == "tpu" else "cpu"

  def accumulated(params, batch_stats, images, targets, drop_rng):
    """grad_fn over `grad_accum_steps` micro-batches (a scan, so memory holds one at a time)."""
    k = grad_accum_steps

    def micro(x):  # (B, ...) -> (k, B/k, ...), micro-batch m = the m-th part of every shard
      per = x.shape[0] // (shards * k)
      return x.reshape(shards, k, per, *x.shape[1:]).swapaxes(0, 1).reshape(k, shards * per, *x.shape[1:])

    def body(carry, inputs):
      m, images_m, targets_m = inputs
      (loss, stats), grads = grad_fn(params, batch_stats, images_m, targets_m, jax.random.fold_in(drop_rng, m))
      loss_sum, stats_sum, grads_sum = carry
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      return (loss_sum + loss, add(stats_sum, stats), add(grads_sum, grads)), None

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    init = (jnp.zeros((), jnp.float32), zeros(batch_stats), zeros(params))
    (loss, stats, grads), _ = jax.lax.scan(body, init, (jnp.arange(k), micro(images), micro(targets)))
    mean = lambda tree: jax.tree.map(lambda x: x / k, tree)
    return (loss / k, mean(stats)), mean(grads)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    aug_rng, drop_rng = step_rngs(base_rng, state.step)
    with jax.named_scope("augment"):
      images, targets = augment.train_augment(aug_rng, batch["image"], batch["label"], model.num_classes,
                                              augment_config, shards, augment_kernels)
    compute = grad_fn if grad_accum_steps == 1 else accumulated
    (loss, batch_stats), grads = compute(state.params, state.batch_stats, images, targets, drop_rng)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return train_step


def abstract_train_state(model: model_lib.CvT, tx: optax.GradientTransformation, image_size: int) -> TrainState:
  """The train state's shapes and dtypes, without computing anything."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return jax.eval_shape(lambda v: _fresh_state(v, tx), variables)


def _fresh_state(variables: Variables, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


def create_train_state(variables: Variables, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       fsdp: bool = False) -> TrainState:
  """Step 0 with fresh AdamW moments, replicated over the mesh (or FSDP-split)."""
  shardings = parallel.state_shardings(jax.eval_shape(lambda v: _fresh_state(v, tx), variables), mesh, fsdp)
  return jax.jit(lambda v: _fresh_state(v, tx), out_shardings=shardings)(variables)


def shard_train_step(train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
                     mesh: jax.sharding.Mesh, state_sharding: Any = None,
                     ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`train_step` jitted data-parallel: state donated (replicated unless `state_sharding` says otherwise),
  the batch split over 'data', metrics replicated."""
  state_sharding = parallel.replicated(mesh) if state_sharding is None else state_sharding
  return jax.jit(parallel.traced_on(train_step, mesh),
                 in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


def make_eval_step(model: model_lib.CvT) -> Callable[[Variables, Batch], Metrics]:
  """Sums of loss, top-1 and top-5 hits and the example count over the real (mask=1) rows of a batch."""

  def eval_step(variables: Variables, batch: Batch) -> Metrics:
    logits = model.apply(variables, model_lib.normalize(batch["image"]), train=False)
    labels, mask = batch["label"], batch["mask"].astype(bool)
    loss = soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = top5 == labels[:, None]
    return {"loss": jnp.sum(jnp.where(mask, loss, 0.0)),
            "top1": jnp.sum(hits[:, 0] & mask, dtype=jnp.int32),
            "top5": jnp.sum(hits.any(axis=-1) & mask, dtype=jnp.int32),
            "count": jnp.sum(mask, dtype=jnp.int32)}

  return eval_step


def shard_eval_step(eval_step: Callable[[Variables, Batch], Metrics], mesh: jax.sharding.Mesh,
                    variables_sharding: Any = None) -> Callable[[Variables, Batch], Metrics]:
  """`eval_step` jitted with the batch split over 'data' (variables replicated unless said otherwise)."""
  variables_sharding = parallel.replicated(mesh) if variables_sharding is None else variables_sharding
  return jax.jit(parallel.traced_on(eval_step, mesh),
                 in_shardings=(variables_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a config trains on a mesh: the model, its learning-rate schedule and optimiser, and the shardings
  of the train state."""

  model: model_lib.CvT
  base_lr: float  # scaled to the global batch
  schedule: optim.Schedule
  tx: optax.GradientTransformation
  state_sharding: Any


def make_setup(config: Any, mesh: jax.sharding.Mesh, steps_per_epoch: int = 1, num_classes: int | None = None,
          variant: model_lib.Variant | None = None) -> Setup:
  """The one wiring of config -> model -> schedule -> optimiser, shared by the trainer, `cvt-jax compile`
  and the benchmarks: the learning rate scaled to the global batch, the schedule in epochs of
  `steps_per_epoch` steps (what compiles and benchmarks pass matters to no program shape), the classes and
  architecture of the data and checkpoint where they differ from the config's."""
  model = model_lib.from_config(config.model, num_classes or config.model.num_classes, parallel.platform(mesh),
                                variant=variant)
  base_lr = optim.scaled_lr(config.optim.lr, config.optim.lr_batch_size, config.global_batch_size)
  schedule = optim.make_schedule(config.schedule, base_lr, config.num_epochs, steps_per_epoch)
  tx = optim.make_optimizer(config.optim, schedule)
  state_sharding = parallel.state_shardings(abstract_train_state(model, tx, config.data.image_size), mesh,
                                            config.fsdp)
  return Setup(model, base_lr, schedule, tx, state_sharding)


def build_steps(config: Any, setup: Setup, mesh: jax.sharding.Mesh, base_rng: jax.Array
                ) -> tuple[Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
                           Callable[[Variables, Batch], Metrics]]:
  """The jitted, sharded train and eval steps of `config` on `mesh` (what training runs and `cvt_jax.aot`
  compiles). The eval step computes in `config.model.eval_dtype`, without remat."""
  model, sharding = setup.model, setup.state_sharding
  train_step = shard_train_step(
      make_train_step(model, setup.tx, setup.schedule, config.augment, base_rng,
                      shards=mesh.shape[parallel.DATA_AXIS], grad_accum_steps=config.optim.grad_accum_steps),
      mesh, sharding)
  eval_model = model.clone(dtype=model_lib.compute_dtype(config.model.eval_dtype, parallel.platform(mesh)),
                           remat="none")
  eval_step = shard_eval_step(make_eval_step(eval_model), mesh,
                              {"params": sharding.params, "batch_stats": sharding.batch_stats})
  return train_step, eval_step


class EvalMemoryError(ValueError):
  """An eval batch whose step would need more memory than the host has available."""


def check_eval_batch_fits(eval_step: Callable[[Variables, Batch], Metrics], variables: Variables,
                          batch_size: int, image_size: int, mesh: jax.sharding.Mesh) -> None:
  """Compiles `eval_step` for batches of `batch_size` images (its calls then reuse the compilation) and, on
  a CPU, refuses a batch whose buffers (XLA's memory analysis) exceed the memory the host has available.

  Raises:
    EvalMemoryError: naming both sizes and a batch that would fit.
  """
  rows = {"image": ((image_size, image_size, 3), jnp.uint8), "label": ((), jnp.int32), "mask": ((), jnp.bool_)}
  batch = {key: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=parallel.batch_sharding(mesh))
           for key, (shape, dtype) in rows.items()}
  stats = eval_step.lower(variables, batch).compile().memory_analysis()
  if parallel.platform(mesh) != "cpu" or stats is None:
    return  # accelerators: XLA itself refuses a step that does not fit the device
  available = hardware.available_host_memory()
  if available is None:
    return
  # The variables are in memory already: what a call adds is its temporaries and outputs, and the batch.
  per_batch = (stats.temp_size_in_bytes + stats.output_size_in_bytes) * jax.local_device_count()
  needed = per_batch + batch_size * image_size * image_size * 3
  if needed > available:
    devices = jax.device_count()
    fits = devices * int(batch_size * available / needed / devices)
    raise EvalMemoryError(
        f"an eval batch of {batch_size} images at {image_size} px needs {text.gib(needed)}, more than "
        f"the {text.gib(available)} this host has available: lower --config.eval_batch_size"
        + (f" (about {fits} fits)" if fits else ""))


def evaluate_batches(eval_step: Callable[[Variables, Batch], Metrics], variables: Variables,
                     batches: Iterable[input_pipeline.Batch], mesh: jax.sharding.Mesh,
                     on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """top-1/top-5 (%) and mean loss over every real example of one padded pass; 'count' = examples seen,
  'skipped' = the undecodable images left out, in the order met. `on_step(rows)` follows each step, once
  it has finished (for progress reports that count what was evaluated, not what was loaded)."""
  totals = None
  skipped: list[str] = []
  prefetch = input_pipeline.Prefetcher(batches, mesh,
                                       on_skipped=lambda bad: skipped.extend(key for key, _ in bad))
  try:
    for batch in prefetch:
      sums = eval_step(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      if on_step:
        jax.block_until_ready(totals)
        on_step(batch["mask"].shape[0])
  finally:
    prefetch.close()
  totals = jax.device_get(totals)
  count = 0 if totals is None else int(totals["count"])
  if count == 0:
    raise ValueError("the evaluation split yielded no readable examples")
  return {"top1": 100.0 * float(totals["top1"]) / count, "top5": 100.0 * float(totals["top5"]) / count,
          "loss": float(totals["loss"]) / count, "count": count, "skipped": skipped}


def _first_non_finite(history: list[tuple[int, Metrics]]) -> tuple[int, dict[str, float]] | None:
  """The first (step, metrics) whose loss or grad norm is NaN/inf; fetching waits for those steps."""
  for step, metrics in jax.device_get(history):
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      return step, metrics
  return None


def validate_config(config: Any) -> None:
  """Checks the values a run depends on, before any data or device work, with messages naming the key."""
  def require(ok: bool, message: str) -> None:
    if not ok:
      raise ValueError(f"invalid config: {message}")

  model_lib.compute_dtype(config.model.dtype)
  model_lib.compute_dtype(config.model.eval_dtype)
  require(config.model.num_classes > 0, f"model.num_classes={config.model.num_classes} must be positive")
  require(config.model.drop_path_rate is None or 0.0 <= config.model.drop_path_rate < 1.0,
          f"model.drop_path_rate={config.model.drop_path_rate} must be in [0, 1)")
  require(config.model.kernels in ops.KERNEL_CHOICES,
          f"model.kernels={config.model.kernels!r}; use one of {ops.KERNEL_CHOICES}")
  require(config.model.remat in model_lib.REMAT_CHOICES,
          f"model.remat={config.model.remat!r}; use one of {model_lib.REMAT_CHOICES}")
  input_pipeline.check_config(config.data)
  require(model_lib.variant_from_config(config.model) is not None or bool(config.init_from),
          "model.variant='' takes the architecture of init_from, which is not set; name the variant")
  optim_config = config.optim
  for key in ("lr", "weight_decay"):
    require(math.isfinite(optim_config[key]), f"optim.{key}={optim_config[key]} must be finite")
  require(optim_config.lr > 0, f"optim.lr={optim_config.lr} must be positive")
  require(optim_config.lr_batch_size > 0, f"optim.lr_batch_size={optim_config.lr_batch_size} must be positive")
  require(optim_config.weight_decay >= 0, f"optim.weight_decay={optim_config.weight_decay} must be >= 0")
  require(optim_config.grad_accum_steps >= 1,
          f"optim.grad_accum_steps={optim_config.grad_accum_steps} must be >= 1")
  require(config.num_epochs > 0, f"num_epochs={config.num_epochs} must be positive")
  require(0 <= config.schedule.warmup_epochs < config.num_epochs,
          f"schedule.warmup_epochs={config.schedule.warmup_epochs} must be in [0, num_epochs)")
  for key in ("eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
    require(config[key] > 0, f"{key}={config[key]} must be positive")
  require(config.profile_steps >= 0, f"profile_steps={config.profile_steps} must be >= 0")
  parallel.check_global_batch_size(config.global_batch_size, "global_batch_size")
  parallel.check_global_batch_size(config.eval_batch_size, "eval_batch_size")
  per_device = config.global_batch_size // jax.device_count()
  require(per_device % optim_config.grad_accum_steps == 0,
          f"optim.grad_accum_steps={optim_config.grad_accum_steps} must divide the per-device batch "
          f"({config.global_batch_size} / {jax.device_count()} devices = {per_device})")
  if config.init_from:
    require(epath.Path(os.path.expanduser(config.init_from)).exists()
            or weights.is_hub_name(config.init_from), f"init_from={config.init_from!r} does not exist")


def _format_seconds(seconds: float) -> str:
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class _Profiler:
  """Traces `steps` training steps (from the 3rd after the start, past compilation) into <workdir>/profile."""

  def __init__(self, workdir: epath.Path, first_step: int, steps: int):
    self._dir, self._start, self._stop = workdir / "profile", first_step + 2, first_step + 2 + steps
    self._active = False

  def before(self, step: int) -> None:
    if self._start < self._stop and step == self._start:
      jax.profiler.start_trace(os.fspath(self._dir))
      self._active = True

  def after(self, step: int, result: Any) -> None:
    if self._active and step + 1 == self._stop:
      jax.block_until_ready(result)
      jax.profiler.stop_trace()
      self._active = False
      logging.info("Wrote a profile of steps %d-%d to %s (open it with TensorBoard or Perfetto).",
                   self._start, step, self._dir)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a run of a config in a workdir is, worked out before anything is written."""

  spec: input_pipeline.DataSpec
  info: input_pipeline.DatasetInfo
  model_info: workdir_lib.ModelInfo
  stored_info: workdir_lib.ModelInfo | None  # the workdir's model_info.json, if it has one
  init: weights.Checkpoint | None  # config.init_from, loaded
  steps_per_epoch: int
  total_steps: int


def _plan(config: Any, workdir: epath.Path, fresh: bool) -> _Plan:
  """Checks everything that can refuse a run before it writes a file: the initial weights against the
  config's architecture, the data against the config, and the workdir's model_info.json against both.

  Raises:
    ValueError (WeightsError, WorkdirError, ...): naming what does not fit.
  """
  variant = model_lib.variant_from_config(config.model)
  init = None
  if config.init_from:
    init = weights.load(os.path.expanduser(config.init_from))
    if variant is None:  # the architecture is the checkpoint's (model.drop_path_rate still applies)
      variant = init.variant
      logging.info("Taking the architecture of init_from: %s.", variant.describe())
    weights.check_architecture(init, variant, "init_from")
  spec = input_pipeline.DataSpec.from_config(config.data)
  info = input_pipeline.dataset_info(spec)
  if info.num_classes != config.model.num_classes:
    raise ValueError(f"model.num_classes={config.model.num_classes} but the {spec.where()} has "
                     f"{info.num_classes} classes: give --config.model.num_classes={info.num_classes}")
  steps_per_epoch = input_pipeline.steps_per_epoch(info.num_train_examples, config.global_batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f"global_batch_size={config.global_batch_size} exceeds the {info.num_train_examples} "
                     "training examples (batches drop the remainder)")
  model_info = workdir_lib.ModelInfo(
      variant, info.num_classes, info.class_names, config.data.image_size,
      workdir_lib.data_fingerprint(spec.source, spec.data_dir or spec.name, info.num_train_examples,
                                   info.num_eval_examples, info.class_names))
  stored = None if fresh else workdir_lib.check_resumable(workdir, model_info)
  return _Plan(spec, info, model_info, stored, init, steps_per_epoch, steps_per_epoch * config.num_epochs)


def train_and_evaluate(config: Any, workdir: str | epath.PathLike, *,
                       log_to: Callable[[str], ContextManager[Any]] | None = None, fresh: bool = False,
                       interrupt_at_step: int | None = None) -> tuple[TrainState, dict[str, float] | None]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint, evaluating every N epochs.

  Everything that can refuse the run (the config, the initial weights, the data, a workdir of another
  run) is checked before any file is written; a local workdir is then locked for the run.

  Args:
    config: a config from `cvt_jax/configs` (see `configs/common.py`).
    workdir: checkpoints, TensorBoard logs and model_info.json, local or `gs://`; running again resumes.
    log_to: opens the run's log file for the length of the run (`log_to(<workdir>/train.log)`; other
      processes of a multi-host run log to train.process<N>.log); local workdirs only.
    fresh: first delete what earlier runs wrote in `workdir` (refused, deleting nothing, if it holds
      anything else).
    interrupt_at_step: behave as if preempted after this step (save, then return): tests, time boxes.

  Returns:
    The final train state and the last evaluation ({'top1','top5','loss','count'}; None if none ran).
  """
  validate_config(config)
  workdir = epath.Path(workdir)
  local = workdir_lib.is_local(workdir)
  if fresh and local:
    workdir_lib.check_removable(workdir)
  plan = _plan(config, workdir, fresh)
  with contextlib.ExitStack() as stack:
    if local:
      workdir_lib.check_writable(workdir)
      if jax.process_index() == 0:
        stack.enter_context(workdir_lib.Lock(workdir))
      if fresh:
        workdir_lib.remove_run(workdir)
      if log_to:
        suffix = "" if jax.process_index() == 0 else f".process{jax.process_index()}"
        stack.enter_context(log_to(os.fspath(workdir / f"train{suffix}.log")))
    return _train(config, workdir, plan, interrupt_at_step)


@dataclasses.dataclass(frozen=True)
class _Run:
  """The parts of a run the training loop works with."""

  config: Any
  workdir: epath.Path
  plan: _Plan
  mesh: jax.sharding.Mesh
  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  eval_step: Callable[[Variables, Batch], Metrics]
  ckpt: checkpointing.Checkpointer


def _train(config: Any, workdir: epath.Path, plan: _Plan, interrupt_at_step: int | None
           ) -> tuple[TrainState, dict[str, float] | None]:
  mesh = parallel.make_mesh()
  info = plan.info
  training = make_setup(config, mesh, plan.steps_per_epoch, info.num_classes, plan.model_info.variant)
  model, tx = training.model, training.tx
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))

  dummy = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
  variables = jax.jit(model.init, out_shardings=parallel.replicated(mesh))(init_rng, dummy)
  if plan.init:
    variables = jax.device_put(weights.init_from(plan.init, jax.device_get(variables), model.spec,
                                                 info.num_classes, log=logging.info),
                               parallel.replicated(mesh))
  state = create_train_state(variables, tx, mesh, config.fsdp)
  del variables
  logging.info("%s: %s parameters; %d train / %d eval examples, %d classes; %d steps/epoch x %d epochs = %d "
               "steps; global batch %d on %s (%s); lr %.3g.", model.spec.name,
               f"{trees.size(state.params):,}", info.num_train_examples,
               info.num_eval_examples, info.num_classes, plan.steps_per_epoch, config.num_epochs,
               plan.total_steps, config.global_batch_size, text.plural(jax.device_count(), "device"),
               text.plural(jax.process_count(), "process"), training.base_lr)

  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  try:
    restored = _restore_latest(ckpt, state, config.model.scan_blocks)
    start_step = 0
    if restored:
      start_step, state = restored
      logging.info("Resuming from step %d of %d (%s).", start_step, plan.total_steps, ckpt.directory)
    elif config.init_from:
      logging.info("Starting from the weights in %s.", config.init_from)
    if jax.process_index() == 0 and plan.stored_info != plan.model_info:
      workdir_lib.write_model_info(workdir, plan.model_info)  # state exists now: the workdir describes it
    train_step, eval_step = build_steps(config, training, mesh, train_rng)
    run = _Run(config, workdir, plan, mesh, train_step, eval_step, ckpt)
    return _loop(run, state, start_step, interrupt_at_step)
  finally:
    ckpt.close()


def _restore_latest(ckpt: checkpointing.Checkpointer, state: TrainState,
                    scan_blocks: bool) -> tuple[int, TrainState] | None:
  """`ckpt.restore_latest(state)`; its mismatch error names `model.scan_blocks` when the checkpoint's blocks
  are laid out for the other setting."""
  try:
    return ckpt.restore_latest(state)
  except checkpointing.CheckpointMismatchError as error:
    if model_lib.is_scanned(error.stored) == scan_blocks:
      raise
    raise checkpointing.CheckpointMismatchError(
        f"{error} (its blocks are {'one module each' if scan_blocks else 'stacked'}: it was written with "
        f"--config.model.scan_blocks={not scan_blocks})", error.stored) from None


class _Evaluator:
  """A run's periodic evaluation: every image of the eval split, logged and written to TensorBoard."""

  def __init__(self, run: _Run, writer: tensorboard.ScalarWriter):
    self._run, self._writer = run, writer
    self._batch = input_pipeline.eval_batch_size(run.config.eval_batch_size, run.plan.info.num_eval_examples)
    self._compiled = False

  def __call__(self, step: int, variables: Variables) -> dict[str, float]:
    run, plan = self._run, self._run.plan
    started = time.time()
    logging.info("eval @ step %d: %d images of %s in batches of %d%s", step, plan.info.num_eval_examples,
                 plan.spec.where(plan.spec.eval_split), self._batch,
                 "" if self._compiled else " (compiling the eval step first)")
    if not self._compiled:
      check_eval_batch_fits(run.eval_step, variables, self._batch, run.config.data.image_size, run.mesh)
      self._compiled = True
    result = evaluate_batches(run.eval_step, variables, input_pipeline.eval_batches(plan.spec, self._batch),
                              run.mesh)
    if result["count"] != plan.info.num_eval_examples:  # e.g. undecodable files, masked out by the pipeline
      logging.warning("Evaluation counted %d examples but split %r has %d.", result["count"],
                      plan.spec.eval_split, plan.info.num_eval_examples)
    logging.info("eval @ step %d (epoch %.2f): top-1 %.2f%%, top-5 %.2f%%, loss %.4f over %d/%d images "
                 "(%.1fs)", step, step / plan.steps_per_epoch, result["top1"], result["top5"], result["loss"],
                 result["count"], plan.info.num_eval_examples, time.time() - started)
    self._writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items() if k != "skipped"})
    self._writer.flush()
    return result


def _loop(run: _Run, state: TrainState, start_step: int, interrupt_at_step: int | None
          ) -> tuple[TrainState, dict[str, float] | None]:
  """The training loop proper (see `train_and_evaluate`)."""
  config, plan, ckpt = run.config, run.plan, run.ckpt
  steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
  eval_every = steps_per_epoch * config.eval_every_epochs

  writer = tensorboard.ScalarWriter(os.fspath(run.workdir / "tensorboard"))
  evaluate = _Evaluator(run, writer)
  profiler = _Profiler(run.workdir, start_step, config.profile_steps)
  last_eval = None
  history: list[tuple[int, Metrics]] = []
  train_batches = input_pipeline.Prefetcher(
      input_pipeline.train_batches(plan.spec, config.global_batch_size, config.seed, start_step=start_step),
      run.mesh, on_skipped=input_pipeline.SkipLog(logging.warning))
  try:
    with checkpointing.StopFlag() as stop:
      last_log_time, last_log_step = time.time(), start_step
      if start_step < total_steps:
        logging.info("Compiling the train step, then step %d of %d ...", start_step + 1, total_steps)
      for step in range(start_step + 1, total_steps + 1):
        profiler.before(step)
        state, metrics = run.train_step(state, next(train_batches))
        profiler.after(step, state)
        history.append((step, metrics))
        first = step == start_step + 1  # its time is the compile's: logged as such, with no rate
        stop_now = step == interrupt_at_step or stop.is_set() or ckpt.reached_preemption(step)
        log_now = first or step % config.log_every_steps == 0 or step == total_steps or stop_now
        save_now = ckpt.should_save(step) or step == total_steps or stop_now
        if log_now or save_now:
          # Fetching the metrics waits for these steps; a NaN here must never reach a checkpoint.
          bad = _first_non_finite(history)
          if bad is not None:
            raise FloatingPointError(
                f"non-finite training loss at step {bad[0]} (loss={bad[1]['loss']}, grad_norm="
                f"{bad[1]['grad_norm']}, lr={bad[1]['lr']:.3g}); stopped without saving it. The last good "
                f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or check "
                "the data, then rerun the command to resume from it.")
        if log_now:
          host = jax.device_get([m for _, m in history])
          elapsed = time.time() - last_log_time
          scalars = {"train/loss": float(np.mean([m["loss"] for m in host])), "train/lr": float(host[-1]["lr"]),
                     "train/grad_norm": float(np.mean([m["grad_norm"] for m in host])),
                     "train/epoch": step / steps_per_epoch}
          if first:
            logging.info("step %d/%d (epoch %.2f): loss %.4f, lr %.3g; compiled and ran in %.1f s, progress "
                         "every %d steps", step, total_steps, step / steps_per_epoch, scalars["train/loss"],
                         scalars["train/lr"], elapsed, config.log_every_steps)
          else:
            steps_per_sec = (step - last_log_step) / max(elapsed, 1e-9)
            scalars["train/img_per_sec"] = steps_per_sec * config.global_batch_size
            logging.info("step %d/%d (epoch %.2f): loss %.4f, lr %.3g, %.1f img/s, ETA %s", step, total_steps,
                         step / steps_per_epoch, scalars["train/loss"], scalars["train/lr"],
                         scalars["train/img_per_sec"], _format_seconds((total_steps - step) / steps_per_sec))
          writer.write_scalars(step, scalars)
          history.clear()
          last_log_time, last_log_step = time.time(), step
        if save_now:
          ckpt.save(step, state)
        if stop_now and step < total_steps:
          logging.warning("Stopped at step %d; checkpoint saved, rerun the same command to resume.", step)
          return state, last_eval
        if step % eval_every == 0 or step == total_steps:
          last_eval = evaluate(step, state.variables)
          last_log_time = time.time()  # keep eval time out of the img/s figure
    if start_step == total_steps:
      last_eval = evaluate(total_steps, state.variables)
    return state, last_eval
  finally:
    train_batches.close()
    writer.close()
