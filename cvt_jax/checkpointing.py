"""Checkpoints in the workdir: periodic and preemption saves, automatic resume, `init_from` weights.

orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
never resumes from a half-written checkpoint: `latest_step()` only sees committed steps.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from flax import traverse_util

from cvt_jax import model as model_lib


class Checkpointer:
  """An orbax `CheckpointManager` over `<workdir>/checkpoints` holding the whole train state."""

  def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int):
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=True,
        create=True)
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest fully committed step, or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether the periodic or the (multi-host) preemption policy wants a save at `step`."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True once the cluster (jax's coordination service) has announced a preemption at `step`."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state` (arrays are copied off the devices before it returns)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, target: Any) -> Any:
    """Restores `step` with the structure, dtypes and shardings of `target` (arrays or abstract)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as e:  # orbax names one key or two shapes, not the checkpoint, the arrays or the fix
      path = os.path.join(self.directory, str(step))
      raise ValueError(f"Checkpoint {path} does not fit the configured model and optimiser "
                       f"({_mismatches(path, abstract) or e}). It was written with another config: "
                       "resume with that config, or train in a new --workdir.") from e

  def close(self) -> None:
    """Waits for pending asynchronous saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def check_writable(workdir: str | os.PathLike) -> None:
  """Fails at start-up, not at the first save, when `workdir` cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"workdir {os.fspath(workdir)!r} is not writable: {e.strerror or e} "
                     f"({e.filename or workdir}).") from e


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mismatches(path: str, target: Any, limit: int = 5) -> str:
  """The arrays missing from, unused in and mis-shaped in the checkpoint at `path`, for `target`."""
  try:
    with ocp.StandardCheckpointer() as reader:
      stored = _shapes(reader.metadata(os.path.join(path, "default")).item_metadata)
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: orbax's own message is used
    return ""
  wanted = _shapes(target)
  cap = lambda keys: keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])
  problems = {
      "missing in checkpoint": [k for k in wanted if k not in stored],
      "not used by the model": [k for k in stored if k not in wanted],
      "shape mismatch": [f"{k}: checkpoint {stored[k]} vs model {wanted[k]}"
                         for k in wanted if k in stored and stored[k] != wanted[k]]}
  return "; ".join(f"{what}: {cap(keys)}" for what, keys in problems.items() if keys)


class StopFlag:
  """Set by SIGTERM (preemption) or SIGINT; the train loop checks it every step and saves before exiting."""

  def __init__(self):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopFlag":
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("Received %s: saving a checkpoint after the current step, then stopping.",
                    signal.Signals(signum).name)
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def should_stop(self, sync: bool) -> bool:
    """Whether any process got a signal. With several processes they only agree when `sync` is True,
    because agreeing is a collective that waits for the queued steps; the caller syncs every few steps.
    """
    if jax.process_count() == 1:
      return self.is_set()
    if not sync:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.is_set()))))


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def merge_pretrained(target: dict[str, Any], loaded: dict[str, Any], source: str,
                     replace_head: bool) -> dict[str, Any]:
  """Takes every array of `target` (fresh variables) from `loaded`, strictly.

  Args:
    target: freshly initialised {'params', 'batch_stats'} of the model to train.
    loaded: converted variables with the same structure.
    source: the checkpoint path, for error messages.
    replace_head: keep the fresh `params/head/*` (a new class count) instead of the loaded one.

  Returns:
    `target` with the loaded values (cast to the target dtypes).

  Raises:
    ValueError: naming every missing key, unused key and shape mismatch outside the head.
  """
  want, have = _flat(target), _flat(loaded)
  is_head = lambda key: key.startswith("params/head/")
  missing = sorted(k for k in want if k not in have and not (replace_head and is_head(k)))
  unused = sorted(k for k in have if k not in want and not (replace_head and is_head(k)))
  mismatched = sorted(f"{k}: checkpoint {tuple(np.shape(have[k]))} vs model {tuple(want[k].shape)}"
                      for k in want if k in have and not (replace_head and is_head(k))
                      and tuple(np.shape(have[k])) != tuple(want[k].shape))
  if missing or unused or mismatched:
    problems = [f"missing in checkpoint: {missing}" if missing else "",
                f"not used by the model: {unused}" if unused else "",
                f"shape mismatch: {mismatched}" if mismatched else ""]
    raise ValueError(f"init_from {source!r} does not fit the model; "
                     + "; ".join(p for p in problems if p))
  merged = {k: (v if replace_head and is_head(k) else np.asarray(have[k], dtype=v.dtype))
            for k, v in want.items()}
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})


def load_init_from(path: str, target: dict[str, Any], variant: str | model_lib.Variant,
                   num_classes: int) -> dict[str, Any]:
  """Loads converted CvT weights for fine-tuning; a different class count gets a fresh head."""
  from cvt_jax import weights  # the converter pulls in file-format readers only when needed

  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from: no such file {path!r}.")
  loaded = weights.load_weights(path)
  if model_lib.get_variant(loaded.variant).stages != model_lib.get_variant(variant).stages:
    raise ValueError(f"init_from {path!r} holds a {model_lib.get_variant(loaded.variant).name} but the "
                     f"config trains a {model_lib.get_variant(variant).name} (model.variant).")
  replace_head = loaded.num_classes != num_classes
  if replace_head:
    logging.info("init_from: %d-class head of %s replaced by a fresh %d-class head.",
                 loaded.num_classes, path, num_classes)
  return merge_pretrained(target, loaded.variables, path, replace_head)
