"""Training checkpoints in `<workdir>/checkpoints`: periodic and preemption saves, resume, stop signals.

orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
never resumes from a half-written checkpoint: only committed steps are listed. A committed step that no
longer reads (a damaged disk, a file removed by hand) is moved aside with a one-line warning and the newest
step that reads is used instead. Workdirs may be local or on an object store (`gs://`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import threading
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from cvt_jax import trees
from cvt_jax import workdir as workdir_lib

CHECKPOINTS = "checkpoints"
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)
_TMP_MARKER = ".orbax-checkpoint-tmp"
# orbax splits every replicated array into one slice per replica so that hosts share the writing; each slice is
# a device op dispatched on the saving thread, which for a CvT's hundreds of small arrays (biases, norms) costs
# more than writing them whole. Slices below this size are not split.
_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


class CheckpointMismatchError(ValueError):
  """A checkpoint written by another model or optimiser configuration; `stored`: its arrays' shapes."""

  def __init__(self, message: str, stored: Mapping[str, trees.Shape]):
    super().__init__(message)
    self.stored = stored


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class Checkpointer:
  """An orbax `CheckpointManager` over `<workdir>/checkpoints` holding the whole train state."""

  def __init__(self, workdir: str | epath.PathLike, every_steps: int, keep: int):
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=True,
        create=True)
    self.directory = _checkpoints(workdir)
    _register_array_handler()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether the periodic or the (multi-host) preemption policy wants a save at `step`."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True, on every process at the same step, once the cluster has announced a preemption (SIGTERM to
    any process of a multi-process run, through JAX's coordination service)."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state`; a failed earlier save is reported here (or in `close`)."""
    with self._write_errors():
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore_latest(self, target: Any) -> tuple[int, Any] | None:
    """(step, state) of the newest step that reads, restored like `target`; None when there is none.

    Raises:
      CheckpointMismatchError: the newest readable step holds other arrays than `target` (another config).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    want = trees.shapes(trees.flatten(abstract))
    for step in sorted(self._manager.all_steps(), reverse=True):
      path = self.directory / str(step)
      stored = _stored_shapes(path)
      problems = trees.mismatches(want, stored) if stored else ""
      if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit the configured model and optimiser ({problems}); it was "
            "written with another config: resume with that config, or train in a new --workdir", stored)
      try:
        return step, self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except  # any failure to read means a damaged step
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable step out of orbax's sight (`<step>.unreadable`), keeping it for inspection."""
    path = self.directory / str(step)
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    logging.warning("Checkpoint %s is unreadable (%s); using the step before it. It is kept as %s.unreadable.",
                    path, reason, path.name)
    if jax.process_index() == 0:
      path.rename(self.directory / f"{step}.unreadable.{int(time.time())}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()

  def close(self) -> None:
    """Waits for pending asynchronous saves, then releases the manager."""
    with self._write_errors():
      try:
        self._manager.wait_until_finished()
      finally:
        self._manager.close()

  def _write_errors(self):
    return _reporting_write_errors(self.directory)


@functools.cache
def _register_array_handler() -> None:
  """jax.Arrays are saved by orbax's `ArrayHandler` with `_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL` (orbax keeps
  one handler per type for the whole process). Unlike orbax's default handler it keeps no array-metadata
  store, which only typed PRNG-key arrays need: the train state holds none."""
  handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns of any override, expected or not
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _reporting_write_errors(directory: epath.Path) -> Iterator[None]:
  """Turns a failed checkpoint write into one `CheckpointWriteError` and removes its half-written steps."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except  # orbax wraps OSErrors in several types
    problem = _write_problem(error)
    if problem is None:
      raise
    _remove_half_written_steps(directory)
    raise CheckpointWriteError(
        f"cannot write a checkpoint to {directory}: {problem}{_disk_space(directory)}; the previous "
        "checkpoint is intact and the half-written one was removed. Free some space and rerun to resume."
    ) from error


def _remove_half_written_steps(directory: epath.Path, seconds: float = 30.0, settle: float = 2.0) -> None:
  """Removes the temporary folders of failed saves. orbax reports the first failed write while its other
  writer threads are still finishing theirs, so a folder can gain files as it is removed, or come back
  after it: done once none has been there for `settle` seconds."""
  deadline = time.monotonic() + seconds
  clean_since = time.monotonic()
  while time.monotonic() < deadline:
    partials = list(directory.glob(f"*{_TMP_MARKER}*"))
    if not partials and time.monotonic() - clean_since >= settle:
      return
    for partial in partials:
      clean_since = time.monotonic()
      try:
        partial.rmtree()
      except OSError:
        pass
    time.sleep(0.1)
  logging.warning("Could not remove the half-written checkpoint(s) %s; delete them by hand.",
                  ", ".join(str(p) for p in directory.glob(f"*{_TMP_MARKER}*")))


def _write_problem(error: BaseException) -> str | None:
  """'No space left on device' (or another filesystem refusal) if that is what `error` comes down to."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return os.strerror(e.errno)
  for e in chain:  # tensorstore reports them as text: 'RESOURCE_EXHAUSTED: ... No space left on device'
    for code in _WRITE_ERRNOS:
      if os.strerror(code) in str(e):
        return os.strerror(code)
  return None


def _disk_space(directory: epath.Path) -> str:
  if "://" in str(directory):
    return ""
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    return ""
  return f" ({free / 2**20:.1f} MiB free there)"


def _stored_shapes(step_dir: epath.Path) -> dict[str, trees.Shape]:
  """The flat shapes of the arrays in a step; {} when its metadata is unreadable (then restoring it fails
  and it is set aside)."""
  try:
    return trees.shapes(trees.flatten(ocp.StandardCheckpointHandler().metadata(step_dir / "default")))
  except Exception:  # pylint: disable=broad-except
    return {}


def _checkpoints(workdir: str | epath.PathLike) -> epath.Path:
  """The checkpoints folder of a workdir, absolute: orbax refuses relative paths."""
  path = epath.Path(workdir)
  return (epath.Path(os.path.abspath(path)) if workdir_lib.is_local(path) else path) / CHECKPOINTS


def read_variables(workdir: str | epath.PathLike) -> tuple[int, dict[str, Any]]:
  """(step, {'params', 'batch_stats'} as numpy) of a workdir's newest readable step, for inference.

  Raises:
    FileNotFoundError: no checkpoints folder, or no committed step in it.
  """
  directory = _checkpoints(workdir)
  if not directory.is_dir():
    raise FileNotFoundError(f"{workdir} holds no {CHECKPOINTS}/ folder: not a training workdir")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as manager:
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        # Untargeted: the saved tree (TrainState fields as dict keys) onto the default device.
        restored = manager.restore(step, args=ocp.args.StandardRestore())
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"step {step}: {type(e).__name__}")
        logging.warning("Checkpoint %s/%d is unreadable (%s); trying the step before it.", directory, step,
                        str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
        continue
      variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
      return step, jax.tree.map(np.asarray, jax.device_get(variables))
  unreadable = f" ({', '.join(failures)} unreadable)" if failures else ""
  raise FileNotFoundError(f"workdir {workdir} holds no committed checkpoint in {directory}{unreadable}")


class StopFlag:
  """Set by SIGTERM (preemption) or SIGINT in a single-process run; the loop saves and stops when set.

  Multi-process runs install no handler: JAX's preemption notifier owns SIGTERM there and
  `Checkpointer.reached_preemption` makes every process stop at the same step.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopFlag:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
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
