"""Training and evaluation of CvT: one jitted, sharded train step, padded evaluation, resumable loop.

Data parallel over a ('data',) mesh of every device of every process: each process loads its slice of the
global batch, `parallel.global_batch` makes one sharded `jax.Array`, parameters and optimiser state are
replicated. Under jit BatchNorm statistics are computed over the whole global batch (synchronised BN),
where the official code used per-GPU statistics; it only touches the small conv-projection BNs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvt_jax import augment
from cvt_jax import checkpointing
from cvt_jax import input_pipeline
from cvt_jax import model as model_lib
from cvt_jax import optim
from cvt_jax import parallel
from cvt_jax import pretrained

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config (the data position is a function of `step`)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def compute_dtype(name: str) -> jnp.dtype:
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU (where bf16 matmuls are emulated and slow)."""
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  if name not in _DTYPES:
    raise ValueError(f"model.dtype={name!r}; use 'auto' or one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


def model_variant(model_config: Any) -> model_lib.Variant:
  """The official variant by name, or a custom width when `dims`, `depths` and `heads` are all set."""
  custom = (model_config.dims, model_config.depths, model_config.heads)
  if all(x is None for x in custom):
    return model_lib.get_variant(model_config.variant)
  if any(x is None for x in custom) or any(len(x) != 3 for x in custom):
    raise ValueError(f"model.dims/depths/heads={custom}: set all three, each with one value per stage.")
  if any(d % h for d, h in zip(model_config.dims, model_config.heads)):
    raise ValueError(f"model.dims={model_config.dims} must be divisible by model.heads={model_config.heads}.")
  return model_lib.make_variant(model_config.variant, tuple(model_config.dims), tuple(model_config.depths),
                                tuple(model_config.heads), model_config.drop_path_rate or 0.0)


def create_model(model_config: Any, num_classes: int) -> model_lib.CvT:
  """The CvT described by the config's `model` block."""
  return model_lib.CvT.from_variant(model_variant(model_config), num_classes=num_classes,
                                    dtype=compute_dtype(model_config.dtype),
                                    drop_path_rate=model_config.drop_path_rate,
                                    depthwise_impl=model_config.depthwise_impl)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example cross entropy against soft targets (mixup/cutmix/smoothing), in fp32."""
  return -jnp.sum(targets.astype(jnp.float32) * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def make_train_step(model: model_lib.CvT, tx: optax.GradientTransformation, schedule: optim.Schedule,
                    num_classes: int, augment_config: Any, base_rng: jax.Array
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The pure train step (jit it): augment on device, forward/backward, AdamW update, metrics."""

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    # The rng depends only on (seed, step), so a resumed run draws exactly what an uninterrupted one would.
    aug_rng, drop_rng = jax.random.split(jax.random.fold_in(base_rng, state.step))
    images, targets = augment.train_augment(aug_rng, batch["image"], batch["label"], num_classes,
                                            augment_config)

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                    train=True, mutable=["batch_stats"], rngs={"drop_path": drop_rng})
      return soft_cross_entropy(logits, targets).mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return train_step


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """Step 0 with fresh AdamW moments, replicated over the mesh."""
  return jax.jit(
      lambda v: TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                           batch_stats=v["batch_stats"], opt_state=tx.init(v["params"])),
      out_shardings=parallel.replicated(mesh))(variables)


def shard_train_step(train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
                     mesh: jax.sharding.Mesh) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`train_step` jitted data-parallel: state replicated and donated, the batch split over 'data'."""
  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(model: model_lib.CvT) -> Callable[[TrainState, Batch], Metrics]:
  """Sums of loss, top-1 and top-5 hits and the example count over the real (mask=1) rows of a batch."""

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    images = augment.eval_preprocess(batch["image"])
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    labels, mask = batch["label"], batch["mask"].astype(bool)
    loss = soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = top5 == labels[:, None]
    return {"loss": jnp.sum(jnp.where(mask, loss, 0.0)),
            "top1": jnp.sum(hits[:, 0] & mask, dtype=jnp.int32),
            "top5": jnp.sum(hits.any(axis=-1) & mask, dtype=jnp.int32),
            "count": jnp.sum(mask, dtype=jnp.int32)}

  return eval_step


class Prefetcher:
  """Loads and shards the next batches on a background thread while the devices compute."""

  _DONE = object()

  def __init__(self, batches: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh, size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(iter(batches), mesh), daemon=True)
    self._thread.start()

  def _fill(self, batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh) -> None:
    try:
      for batch in batches:
        if not self._put(parallel.global_batch(batch, mesh)):
          return
      self._put(self._DONE)
    except BaseException as e:  # re-raised in the consumer, which owns error reporting
      self._put(e)

  def _put(self, item: Any) -> bool:
    """Blocks until `item` is queued (True) or the prefetcher is closed (False)."""
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=0.5)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self) -> Batch:
    item = self._queue.get()
    if item is self._DONE:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._closed.set()
    self._thread.join(timeout=5)


def evaluate(eval_step: Callable[[TrainState, Batch], Metrics], state: TrainState,
             batches: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh) -> dict[str, float]:
  """top-1/top-5 (%) and mean loss over every real example of one padded pass; 'count' = examples seen."""
  totals = None
  prefetch = Prefetcher(batches, mesh)
  try:
    for batch in prefetch:
      sums = eval_step(state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  finally:
    prefetch.close()
  totals = jax.device_get(totals)
  count = 0 if totals is None else int(totals["count"])
  if count == 0:
    raise ValueError("The evaluation split yielded no examples.")
  return {"top1": 100.0 * float(totals["top1"]) / count, "top5": 100.0 * float(totals["top5"]) / count,
          "loss": float(totals["loss"]) / count, "count": count}


def _make_writer(workdir: str):
  """TensorBoard scalars via clu on process 0 (the console gets the formatted lines logged beside them)."""
  try:
    from clu import metric_writers
  except ImportError:  # e.g. a GPU machine without TensorFlow: log the scalars instead
    return _LoggingWriter(enabled=jax.process_index() == 0)
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")))


class _LoggingWriter:
  """The subset of clu's MetricWriter used here, for machines without clu (e.g. a GPU box without TF)."""

  def __init__(self, enabled: bool):
    self._enabled = enabled

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._enabled:
      logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _log_parameter_overview(params: Any) -> None:
  if jax.process_index() > 0:
    return
  try:
    from clu import parameter_overview
  except ImportError:
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("Model: %d parameters in %d tensors.", count, len(jax.tree.leaves(params)))
    return
  parameter_overview.log_parameter_overview(params, include_stats=False)


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
      raise ValueError(f"Invalid config: {message}")

  model_variant(config.model)
  compute_dtype(config.model.dtype)
  require(config.model.num_classes > 0, f"model.num_classes={config.model.num_classes} must be positive.")
  require(config.model.drop_path_rate is None or 0.0 <= config.model.drop_path_rate < 1.0,
          f"model.drop_path_rate={config.model.drop_path_rate} must be in [0, 1).")
  require(config.model.depthwise_impl in ("auto", "conv", "shift"),
          f"model.depthwise_impl={config.model.depthwise_impl!r}; use 'auto', 'conv' or 'shift'.")
  require(config.data.source in ("tfds", "folder"),
          f"data.source={config.data.source!r}; use 'tfds' or 'folder'.")
  require(config.data.image_size >= 32, f"data.image_size={config.data.image_size} must be >= 32.")
  if config.data.source == "folder":
    require(bool(config.data.data_dir), "data.source='folder' needs data.data_dir=<root with train/ and val/>.")
  if config.data.data_dir:
    require(os.path.isdir(os.path.expanduser(config.data.data_dir)),
            f"data.data_dir={config.data.data_dir!r} is not a directory.")
  require(config.optim.lr > 0, f"optim.lr={config.optim.lr} must be positive.")
  require(config.optim.lr_batch_size > 0, f"optim.lr_batch_size={config.optim.lr_batch_size} must be positive.")
  require(config.optim.weight_decay >= 0, f"optim.weight_decay={config.optim.weight_decay} must be >= 0.")
  require(config.num_epochs > 0, f"num_epochs={config.num_epochs} must be positive.")
  require(0 <= config.schedule.warmup_epochs < config.num_epochs,
          f"schedule.warmup_epochs={config.schedule.warmup_epochs} must be in [0, num_epochs).")
  for key in ("eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
    require(config[key] > 0, f"{key}={config[key]} must be positive.")
  parallel.check_global_batch_size(config.global_batch_size, "global_batch_size")
  parallel.check_global_batch_size(config.eval_batch_size, "eval_batch_size")
  if config.init_from:
    require(os.path.isfile(os.path.expanduser(config.init_from)),
            f"init_from={config.init_from!r} is not a file.")


def _format_seconds(seconds: float) -> str:
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def train_and_evaluate(config: Any, workdir: str, *, interrupt_at_step: int | None = None
                       ) -> tuple[TrainState, dict[str, float] | None]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint, evaluating every N epochs.

  Args:
    config: a config from `configs/` (see `configs/common.py`).
    workdir: checkpoints and TensorBoard logs; running again with the same workdir resumes.
    interrupt_at_step: behave as if preempted after this step (save, then return): tests, time boxes.

  Returns:
    The final train state and the last evaluation ({'top1','top5','loss','count'}; None if none ran).
  """
  validate_config(config)
  checkpointing.check_writable(workdir)
  mesh = parallel.make_mesh()
  spec = input_pipeline.DataSpec.from_config(config.data, config.data.image_size)
  info = input_pipeline.dataset_info(spec)
  if info.num_classes != config.model.num_classes:
    raise ValueError(f"model.num_classes={config.model.num_classes} but dataset {spec.name!r} has "
                     f"{info.num_classes} classes.")
  steps_per_epoch = info.num_train_examples // config.global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"global_batch_size={config.global_batch_size} exceeds the {info.num_train_examples} "
                     "training examples (batches drop the remainder).")
  total_steps = steps_per_epoch * config.num_epochs
  eval_every = steps_per_epoch * config.eval_every_epochs

  model = create_model(config.model, info.num_classes)
  if jax.process_index() == 0:  # makes the workdir self-describing for evaluate/predict/export
    pretrained.write_model_info(workdir, model.variant, info.num_classes, info.class_names,
                                config.data.image_size)
  base_lr = optim.scaled_lr(config.optim.lr, config.optim.lr_batch_size, config.global_batch_size)
  schedule = optim.make_schedule(config.schedule, base_lr, config.num_epochs, steps_per_epoch)
  tx = optim.make_optimizer(config.optim, schedule)
  replicated = parallel.replicated(mesh)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))

  dummy = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
  variables = jax.jit(model.init, out_shardings=replicated)(init_rng, dummy)
  if config.init_from:
    variables = jax.device_put(checkpointing.load_init_from(
        config.init_from, variables, model_variant(config.model), info.num_classes), replicated)
  state = create_train_state(variables, tx, mesh)
  del variables

  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  start_step = ckpt.latest_step() or 0
  if start_step:
    logging.info("Resuming from step %d of %d (%s).", start_step, total_steps, ckpt.directory)
    state = ckpt.restore(start_step, state)
  elif config.init_from:
    logging.info("Starting from the weights in %s.", config.init_from)
  _log_parameter_overview(state.params)
  logging.info("%d train / %d eval examples, %d classes; %d steps/epoch x %d epochs = %d steps; "
               "global batch %d on %d devices (%d processes); lr %.3g.", info.num_train_examples,
               info.num_eval_examples, info.num_classes, steps_per_epoch, config.num_epochs, total_steps,
               config.global_batch_size, jax.device_count(), jax.process_count(), base_lr)

  train_step = shard_train_step(
      make_train_step(model, tx, schedule, info.num_classes, config.augment, train_rng), mesh)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(replicated, parallel.batch_sharding(mesh)),
                      out_shardings=replicated)

  def run_eval(step: int) -> dict[str, float]:
    started = time.time()
    result = evaluate(eval_step, state, input_pipeline.eval_batches(spec, config.eval_batch_size), mesh)
    if result["count"] != info.num_eval_examples:  # e.g. undecodable files, masked out by the pipeline
      logging.warning("Evaluation counted %d examples but split %r has %d.", result["count"],
                      spec.eval_split, info.num_eval_examples)
    logging.info("eval @ step %d (epoch %.2f): top-1 %.2f%%, top-5 %.2f%%, loss %.4f over %d/%d images "
                 "(%.1fs)", step, step / steps_per_epoch, result["top1"], result["top5"], result["loss"],
                 result["count"], info.num_eval_examples, time.time() - started)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    writer.flush()
    return result

  writer = _make_writer(workdir)
  last_eval = None
  history: list[tuple[int, Metrics]] = []
  train_batches = Prefetcher(
      input_pipeline.train_batches(spec, config.global_batch_size, config.seed, start_step=start_step), mesh)
  try:
    with checkpointing.StopFlag() as stop:
      last_log_time, last_log_step = time.time(), start_step
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, next(train_batches))
        history.append((step, metrics))
        stop_now = (step == interrupt_at_step or ckpt.reached_preemption(step)
                    or stop.should_stop(sync=step % config.log_every_steps == 0))
        log_now = step % config.log_every_steps == 0 or step == total_steps or stop_now
        save_now = ckpt.should_save(step) or step == total_steps or stop_now
        if log_now or save_now:
          # Fetching the metrics waits for these steps; a NaN here must never reach a checkpoint.
          bad = _first_non_finite(history)
          if bad is not None:
            raise FloatingPointError(
                f"Non-finite training loss at step {bad[0]} (loss={bad[1]['loss']}, grad_norm="
                f"{bad[1]['grad_norm']}, lr={bad[1]['lr']:.3g}); stopped without saving it. The last good "
                f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or check "
                "the data, then rerun the command to resume from it.")
        if log_now:
          host = jax.device_get([m for _, m in history])
          elapsed = time.time() - last_log_time
          steps_per_sec = (step - last_log_step) / max(elapsed, 1e-9)
          scalars = {"train/loss": float(np.mean([m["loss"] for m in host])), "train/lr": float(host[-1]["lr"]),
                     "train/grad_norm": float(np.mean([m["grad_norm"] for m in host])),
                     "train/img_per_sec": steps_per_sec * config.global_batch_size,
                     "train/epoch": step / steps_per_epoch}
          writer.write_scalars(step, scalars)
          logging.info("step %d/%d (epoch %.2f): loss %.4f, lr %.3g, %.1f img/s, ETA %s", step, total_steps,
                       step / steps_per_epoch, scalars["train/loss"], scalars["train/lr"],
                       scalars["train/img_per_sec"], _format_seconds((total_steps - step) / steps_per_sec))
          history.clear()
          last_log_time, last_log_step = time.time(), step
        if save_now:
          ckpt.save(step, state)
        if stop_now and step < total_steps:
          logging.warning("Stopped at step %d; checkpoint saved, rerun the same command to resume.", step)
          return state, last_eval
        if step % eval_every == 0 or step == total_steps:
          last_eval = run_eval(step)
          last_log_time = time.time()  # keep eval time out of the img/s figure
    if start_step == total_steps:
      last_eval = run_eval(total_steps)
    return state, last_eval
  finally:
    train_batches.close()
    ckpt.close()
    writer.close()
