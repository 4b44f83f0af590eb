"""Reliability of training runs (issue 7): kills, preemption, bad input, determinism.

The kill/resume chain runs the real command line (`train.py --config configs/demo.py ...`, a CvT of widths
8/16/24 on ArrayRecord shards of a generated 32 px tree, read by grain worker processes) as subprocesses and
interrupts it with SIGKILL while a checkpoint is being written, SIGKILL at a random step and SIGTERM at a
random step, restarting the same command each time; the final train state and every logged loss must be bit-
identical to those of an uninterrupted run. Subprocesses share a persistent compilation cache, so only the
first one compiles the train step.
"""

from __future__ import annotations

import glob
import io
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from cvt_jax import checkpointing
from cvt_jax import model as model_lib
from cvt_jax.configs import demo
from cvt_jax.data import prepare
from cvt_jax.train import optim
from cvt_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 4
STEPS_PER_EPOCH = 6  # 50 training images (one of them broken) // global batch 8
EPOCHS = 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
CONFIG_ARG = f"epochs={EPOCHS},batch=8,res=32"
OVERRIDES = {
    "model.dims": (8, 16, 24), "model.depths": (1, 1, 1), "model.heads": (1, 2, 3),
    "model.num_classes": CLASSES, "model.drop_path_rate": 0.1,
    "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0,  # exercise every per-step random draw
    "eval_batch_size": 8, "checkpoint_every_steps": 4, "keep_checkpoints": 2, "log_every_steps": 1,
    # Decoded in the training process: the same batches as with workers (tests/test_input_pipeline.py), and
    # none of the workers' start-up in each of the many runs below.
    "data.num_workers": 0,
}
RUN_TIMEOUT_S = 900  # one subprocess, on 2 shared cores
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_STEP_LINE = re.compile(r"\bstep (\d+)/\d+ \(epoch")


def make_tree(root: str) -> str:
  """4 colour classes x (12 train, 2 val) JPEGs at 32 px, plus a broken JPEG and a CMYK file in train."""
  rng = np.random.default_rng(0)
  for split, count in (("train", 12), ("val", 2)):
    for c in range(CLASSES):
      folder = os.path.join(root, split, f"class{c}")
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        pixels = np.full((32, 32, 3), 40.0)
        pixels[..., c % 3] += 50 * (c + 1)
        pixels += rng.normal(0, 30, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"))
  # A JPEG cut short: its header reads (prepare keeps it), its pixels do not (training replaces it).
  whole = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(whole, format="JPEG")
  with open(os.path.join(root, "train", "class0", "broken.jpg"), "wb") as f:
    f.write(whole.getvalue()[:-100])  # most of a 32 px JPEG is its header: the scan is cut short
  Image.new("CMYK", (32, 32), (0, 90, 90, 0)).save(os.path.join(root, "train", "class1", "cmyk.jpg"))
  return root


def make_shards(tree: str, root: str) -> str:
  """The tree as ArrayRecord shards (50 training images, the broken and the CMYK JPEG among them)."""
  prepare.prepare(tree, root, records_per_shard=16, log=lambda _: None)
  return root


def make_config(shards: str, **changes):
  config = demo.get_config(CONFIG_ARG)
  for key, value in {**OVERRIDES, "data.data_dir": shards, **changes}.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  return config


def command(workdir: str, tree: str) -> list[str]:
  def text(v):
    return "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)
  return [sys.executable, "train.py", "--config", f"configs/demo.py:{CONFIG_ARG}", f"--workdir={workdir}",
          f"--config.data.data_dir={tree}", *(f"--config.{k}={text(v)}" for k, v in OVERRIDES.items())]


class Run:
  """`train.py` as a subprocess whose log (stderr) is collected line by line on a thread."""

  def __init__(self, workdir: str, tree: str, cache_dir: str, *args: str, **env: str):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4", "CUDA_VISIBLE_DEVICES": "",
           "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           **env}
    self.workdir = workdir
    self.started = time.time()
    self.proc = subprocess.Popen([*command(workdir, tree), *args], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    self.lines: list[str] = []
    self.steps: list[int] = []  # every "step k/N" progress line, parsed as it arrives
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    with open(os.path.join(os.path.dirname(self.workdir), f"train-{self.proc.pid}.log"), "w",
              buffering=1) as f:
      for line in self.proc.stderr:  # kept next to the workdir for post-mortems
        self.lines.append(line)
        f.write(line)
        if progress := _STEP_LINE.search(line):
          self.steps.append(int(progress.group(1)))

  @property
  def log(self) -> str:
    return "".join(self.lines)

  def wait_for(self, ready, what: str) -> None:
    """Polls `ready()` every 2 ms until it holds; fails if the process ends or times out first."""
    deadline = self.started + RUN_TIMEOUT_S
    while not ready():
      ended = self.proc.poll()
      assert ended is None, f"train.py ended (rc {ended}) before {what}:\n{self.tail()}"
      assert time.time() < deadline, f"timed out waiting for {what}:\n{self.tail()}"
      time.sleep(0.002)

  def finish(self) -> int:
    try:
      rc = self.proc.wait(timeout=max(1.0, self.started + RUN_TIMEOUT_S - time.time()))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise AssertionError(f"train.py did not finish in {RUN_TIMEOUT_S}s:\n{self.tail()}") from None
    self._reader.join(timeout=30)
    return rc

  def kill(self, sig: int) -> int:
    self.proc.send_signal(sig)
    return self.finish()

  def resumed_from(self) -> int:
    found = re.findall(r"Resuming from step (\d+) of", self.log)
    return int(found[0]) if found else 0

  def tail(self, lines: int = 40) -> str:
    return "".join(self.lines[-lines:])


def committed_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def writing_checkpoints(workdir: str) -> list[str]:
  folder = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(folder) if TMP_SUFFIX in n] if os.path.isdir(folder) else []


def logged_losses(workdir: str) -> dict[int, list[float]]:
  """Every `train/loss` value in the workdir's TensorBoard files, by step (a resumed run repeats steps)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  losses: dict[int, list[float]] = {}
  for path in glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True):
    with open(path, "rb") as f:
      while len(header := f.read(12)) == 12:  # TFRecord framing: length, its CRC, data, its CRC
        length = int.from_bytes(header[:8], "little")
        data = f.read(length)
        if len(data) < length or len(f.read(4)) < 4:
          break  # the tail of a file written by a killed process
        event = event_pb2.Event.FromString(data)
        for value in event.summary.value:
          if value.tag == "train/loss":
            losses.setdefault(event.step, []).append(value.simple_value)
  return losses


def leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
  """ArrayRecord shards of the generated tree (the name keeps the tests short)."""
  root = tmp_path_factory.mktemp("data")
  return make_shards(make_tree(str(root / "tree")), str(root / "shards"))


@pytest.fixture(scope="module")
def jax_cache() -> str:
  """The suite's persistent compilation cache (tests/conftest.py): the subprocesses find the steps this
  process compiled for the reference run."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> tuple[trainer.TrainState, str]:
  """The final state and the workdir of an uninterrupted run (in this process: the same program as
  `train.py`'s, bit for bit)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  state, result = trainer.train_and_evaluate(make_config(tree), workdir)
  assert result["count"] == 2 * CLASSES and int(state.step) == TOTAL_STEPS
  return final_state(workdir, _zero_state(make_config(tree))), workdir


def final_state(workdir: str, like: trainer.TrainState) -> trainer.TrainState:
  ckpt = checkpointing.Checkpointer(workdir, 4, 2)
  try:
    step, state = ckpt.restore_latest(like)
    assert step == TOTAL_STEPS
    return state
  finally:
    ckpt.close()


def test_kills_and_preemption_resume_to_the_uninterrupted_result(tree, reference, jax_cache, tmp_path):
  workdir, cache = str(tmp_path / "chain"), jax_cache
  pick = random.Random(7)

  # 1. SIGKILL while orbax writes a checkpoint (its tmp dir exists); retried if the write won the race.
  for _ in range(3):
    run = Run(workdir, tree, cache)
    run.wait_for(lambda: writing_checkpoints(workdir), "a checkpoint write")
    assert run.kill(signal.SIGKILL) == -signal.SIGKILL
    half_written = writing_checkpoints(workdir)
    if half_written:
      break
  assert half_written, "never killed during a checkpoint write"
  interrupted = int(half_written[0].split(".")[0])
  assert interrupted not in committed_steps(workdir)

  # 2. SIGKILL 1-3 steps after the run committed a new checkpoint; 3. SIGTERM at a random step; 4. the rest.
  for sig in (signal.SIGKILL, signal.SIGTERM, None):
    expected_start = (committed_steps(workdir) or [0])[-1]
    run = Run(workdir, tree, cache)
    if sig is None:
      assert run.finish() == 0, run.tail()
    else:
      if sig == signal.SIGKILL:
        run.wait_for(lambda: (committed_steps(workdir) or [0])[-1] > expected_start, "a new checkpoint")
        stop_at = max(run.steps, default=expected_start) + pick.randint(1, 3)
      else:
        stop_at = pick.randint(expected_start + 1, expected_start + 4)
      run.wait_for(lambda: stop_at in run.steps, f"step {stop_at}")
      rc = run.kill(sig)
    # The half-written step is never picked up: restarts resume from the newest committed one.
    assert run.resumed_from() == expected_start, run.tail()
    if sig == signal.SIGTERM:
      stopped = int(re.search(r"Stopped at step (\d+); checkpoint saved", run.log).group(1))
      assert rc == 0, run.tail()
      assert stopped >= stop_at and committed_steps(workdir)[-1] == stopped
      preempted_from = expected_start
  assert committed_steps(workdir)[-1] == TOTAL_STEPS
  assert not writing_checkpoints(workdir)
  assert re.search(rf"eval @ step {TOTAL_STEPS} .* over {2 * CLASSES}/{2 * CLASSES} images", run.log)
  assert ".cc:" not in run.log, "native libraries' notices belong in train.log, not on the console"

  state, reference_dir = reference
  want, got = leaves(state), leaves(final_state(workdir, state))
  assert want.keys() == got.keys()
  different = [k for k in want if not np.array_equal(want[k], got[k])]
  assert not different, f"resumed run differs from the uninterrupted one in {different}"

  # Same config and seed: the same loss at every step. Killed runs lose their unflushed TensorBoard
  # events; the preempted and the final run close theirs, so their steps must all be there.
  curve, resumed_curve = logged_losses(reference_dir), logged_losses(workdir)
  assert sorted(curve) == list(range(1, TOTAL_STEPS + 1)) and all(len(v) == 1 for v in curve.values())
  assert set(range(preempted_from + 1, TOTAL_STEPS + 1)) <= set(resumed_curve)
  for step, values in resumed_curve.items():
    assert values == curve[step] * len(values), f"step {step}: {values} vs {curve[step]}"
  assert all(math.isfinite(v[0]) for v in curve.values())


def _zero_state(config) -> trainer.TrainState:
  """A train state of zeros with the structure train_and_evaluate builds for `config` (nothing compiled)."""
  model = model_lib.from_config(config.model, config.model.num_classes)
  tx = optim.make_optimizer(config.optim, optim.make_schedule(config.schedule, 1e-3, EPOCHS, STEPS_PER_EPOCH))
  abstract = trainer.abstract_train_state(model, tx, 32)
  return jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype)), abstract)


def test_resuming_a_workdir_of_another_model_names_the_arrays(tree, tmp_path):
  workdir = str(tmp_path / "other")
  ckpt = checkpointing.Checkpointer(workdir, 4, 2)
  ckpt.save(4, _zero_state(make_config(tree)))
  ckpt.close()
  wider_and_deeper = make_config(tree, **{"model.dims": (8, 16, 30), "model.depths": (1, 1, 2)})
  with pytest.raises(ValueError) as err:
    trainer.train_and_evaluate(wider_and_deeper, workdir)
  message = str(err.value)
  assert f"checkpoint {os.path.join(workdir, 'checkpoints', '4')} does not fit" in message
  assert "81 missing (batch_stats/stages_2/blocks_1/attn/conv_proj_k/bn/mean (30,), " in message
  assert ("105 mis-shaped (batch_stats/stages_2/blocks_0/attn/conv_proj_k/bn/mean (24,) instead of (30,)"
          in message)
  assert "new --workdir" in message and "\n" not in message
  assert committed_steps(workdir) == [4]


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_resuming_with_scan_blocks_flipped_names_the_switch(tree, tmp_path, saved_scanned):
  workdir = str(tmp_path / "other")
  ckpt = checkpointing.Checkpointer(workdir, 4, 2)
  ckpt.save(4, _zero_state(make_config(tree, **{"model.scan_blocks": saved_scanned})))
  ckpt.close()
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    trainer.train_and_evaluate(make_config(tree, **{"model.scan_blocks": not saved_scanned}), workdir)
  message = str(err.value)
  assert "does not fit" in message and "\n" not in message
  assert message.endswith(f"it was written with --config.model.scan_blocks={saved_scanned})")
  assert committed_steps(workdir) == [4]


def test_class_count_of_the_head_must_match_the_data(tree, tmp_path):
  with pytest.raises(ValueError, match=f"model.num_classes=5 but the prepared dataset {tree} has {CLASSES} classes: "
                                       f"give --config.model.num_classes={CLASSES}"):
    trainer.train_and_evaluate(make_config(tree, **{"model.num_classes": 5}), str(tmp_path / "w"))
  assert not committed_steps(str(tmp_path / "w"))


def test_unwritable_workdir_fails_before_any_work(tree, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  workdir = str(blocker / "run")
  with pytest.raises(ValueError, match=f"workdir {workdir} is not writable: Not a directory"):
    trainer.train_and_evaluate(make_config(tree), workdir)


HEARTBEAT_S = 10


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir: str, tree: str, cache_dir: str, *args: str, count: int = 2) -> list[Run]:
  """`train.py --jax_distributed` as `count` local processes of 4 // count CPU devices each.

  `cache_dir` starts empty: on CPU the first collective (gloo) gives up after 30 s, so a process that finds
  the train step cached must not run far ahead of one that compiles it. The first launch compiles in every
  process (process 0 writes the cache), and every later one finds the steps cached in every process.
  """
  port = free_port()
  return [Run(workdir, tree, cache_dir, "--jax_distributed", f"--heartbeat_timeout={HEARTBEAT_S}", *args,
              JAX_NUM_CPU_DEVICES=str(4 // count), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
              JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(i)) for i in range(count)]


def finish_all(runs: list[Run]) -> list[int]:
  try:
    return [run.finish() for run in runs]
  finally:
    for run in runs:
      if run.proc.poll() is None:
        run.proc.kill()


def test_two_processes_preempt_together_resume_bit_identically_and_stop_when_one_dies(tree, tmp_path):
  """Two processes (2 CPU devices each), progress logged only every 100 steps (the default):

  1. uninterrupted: every eval example counted once, both processes agree;
  2. SIGTERM to process 1 alone: JAX's preemption sync point stops both after the same step, both save it
     together and exit 0;
  3. resumed, then process 1 is killed: process 0 stops with an error within the heartbeat timeout;
  4. resumed again to the end: the final state equals the uninterrupted run's, bit for bit.
  """
  quiet = "--config.log_every_steps=100"
  cache = str(tmp_path / "jax_cache")
  straight = str(tmp_path / "straight")
  runs = start_processes(straight, tree, cache, quiet)
  assert finish_all(runs) == [0, 0], runs[0].tail() + runs[1].tail()
  for run in runs:  # each process reports the global result: every one of the 8 eval images, once
    assert re.search(rf"eval @ step {TOTAL_STEPS} .* over {2 * CLASSES}/{2 * CLASSES} images", run.log)
  assert ".cc:" not in run.log, "native libraries' notices belong in train.log, not on the console"

  workdir = str(tmp_path / "work")
  runs = start_processes(workdir, tree, cache, quiet)
  try:
    runs[0].wait_for(lambda: committed_steps(workdir), "the first checkpoint")
    assert "JAX process 0 of 2, 2 local / 4 global devices" in runs[0].log
    runs[1].proc.send_signal(signal.SIGTERM)  # the cloud preempts one host
  finally:
    rcs = finish_all(runs)
  assert rcs == [0, 0], runs[0].tail() + runs[1].tail()
  stopped = {int(re.search(r"Stopped at step (\d+); checkpoint saved", run.log).group(1)) for run in runs}
  assert len(stopped) == 1, stopped
  preempted = stopped.pop()
  assert committed_steps(workdir)[-1] == preempted < TOTAL_STEPS
  assert preempted - committed_steps(workdir)[0] <= 4  # within a few steps of the signal

  runs = start_processes(workdir, tree, cache, quiet)
  try:
    runs[1].wait_for(lambda: all(f"Resuming from step {preempted} of {TOTAL_STEPS}" in r.log for r in runs),
                     "both processes resuming")
    runs[1].kill(signal.SIGKILL)
    killed = time.time()
    rc = runs[0].finish()
    waited = time.time() - killed
  finally:
    finish_all(runs)
  assert rc != 0, runs[0].tail()
  assert waited < HEARTBEAT_S + 60, f"the surviving process took {waited:.0f}s to stop"
  assert "another task died" in runs[0].log or "Connection closed by peer" in runs[0].log, runs[0].tail()

  assert finish_all(start_processes(workdir, tree, cache, quiet)) == [0, 0]
  like = _zero_state(make_config(tree))
  want, got = leaves(final_state(straight, like)), leaves(final_state(workdir, like))
  different = [k for k in want if not np.array_equal(want[k], got[k])]
  assert not different, f"the preempted and resumed run differs from the uninterrupted one in {different}"
