"""Data parallelism over every device of every process: a 1-D ('data',) mesh, replicated state."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(heartbeat_timeout_s: int = 100) -> None:
  """`jax.distributed.initialize` in which a dead process stops the others instead of hanging them.

  TPU pods, SLURM, Open MPI and Kubernetes are detected by jax; elsewhere set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.

  Args:
    heartbeat_timeout_s: a process silent this long is declared dead; the coordination service then
      aborts every other process with "the JAX distributed service detected fatal errors ... another task
      died" rather than leaving them blocked in a collective. Also bounds the start-up and shutdown waits.
  """
  env = {k: os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  if any(env.values()) and not all(env.values()):
    raise ValueError(f"Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither (got {env}).")
  jax.distributed.initialize(
      num_processes=int(env["JAX_NUM_PROCESSES"]) if env["JAX_NUM_PROCESSES"] else None,
      process_id=int(env["JAX_PROCESS_ID"]) if env["JAX_PROCESS_ID"] else None,
      initialization_timeout=max(heartbeat_timeout_s, 60), heartbeat_timeout_seconds=heartbeat_timeout_s,
      shutdown_timeout_seconds=heartbeat_timeout_s)


def make_mesh() -> Mesh:
  """A ('data',) mesh over all devices of all processes (`jax.devices()`, not `jax.local_devices()`).

  The axis is 'Auto' (jit propagates shardings from the inputs), not the newer default 'Explicit', under
  which every op of the model would need its sharding spelt out.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device (parameters, optimiser state, metrics)."""
  return NamedSharding(mesh, P())


def check_global_batch_size(global_batch_size: int, what: str = "global_batch_size") -> None:
  """Fails clearly unless the batch splits evenly over devices (and hence over processes)."""
  devices = jax.device_count()
  if global_batch_size <= 0 or global_batch_size % devices:
    raise ValueError(f"{what}={global_batch_size} must be a positive multiple of the device count "
                     f"({devices} devices over {jax.process_count()} processes).")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice (B / process_count rows) into one global, batch-sharded array."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}

