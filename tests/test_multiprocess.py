"""Two JAX processes (2 CPU devices each) on a localhost coordinator train and evaluate together."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker(process_id: int, port: int, data_dir: str, workdir: str, out: str) -> None:
  """One process of the run: 2 of the 4 global devices, half of every global batch."""
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  from cvt_jax import train_lib
  from test_train import tiny_config

  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  state, result = train_lib.train_and_evaluate(tiny_config(data_dir, **{"num_epochs": 1, "schedule.warmup_epochs": 0}), workdir)
  leaves = jax.tree.leaves(jax.device_get(state.params))
  with open(out, "w") as f:
    json.dump({"step": int(state.step), "eval": result,
               "checksum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))}, f)
  jax.distributed.shutdown()


def test_two_processes_train_and_count_every_eval_example_once(tmp_path):
  from test_train import NUM_CLASSES, VAL_PER_CLASS, write_colour_tree

  data_dir = write_colour_tree(str(tmp_path / "data"))
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
             CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), data_dir, str(tmp_path / "work"),
                               str(tmp_path / f"out{i}.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  logs = []
  for worker in workers:
    try:
      logs.append(worker.communicate(timeout=1200)[0])
    finally:
      worker.kill()
  for i, (worker, log) in enumerate(zip(workers, logs)):
    assert worker.returncode == 0, f"process {i} failed:\n{log[-5000:]}"
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert results[0]["step"] == results[1]["step"] == 3  # 48 images // 16 per global batch
  for r in results:
    assert r["eval"]["count"] == NUM_CLASSES * VAL_PER_CLASS  # 15 over 2 batches of 8: padded, masked
    assert np.isfinite(r["checksum"])
  assert results[0] == results[1]  # replicated state and global metrics agree across processes
  assert os.path.isdir(tmp_path / "work" / "checkpoints" / "3")


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
