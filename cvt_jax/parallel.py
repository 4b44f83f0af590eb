"""Data parallelism over every device of every process: a 1-D ('data',) mesh, state replicated or sharded.

The batch is always split over 'data'. Parameters and optimiser state are replicated by default; with
`fsdp` every large array is split over 'data' along one of its axes (ZeRO-3 / FSDP style), and XLA gathers
the parameters where the step needs them and reduce-scatters their gradients. Checkpoints store whole
arrays, so a run can resume on another device count with either layout.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Arrays below this many elements stay replicated under FSDP: sharding them saves nothing worth a collective.
FSDP_MIN_SIZE = 2**14


def initialize_distributed(heartbeat_timeout_s: int = 100, initialization_timeout_s: int = 300) -> None:
  """`jax.distributed.initialize` in which a dead process stops the others instead of hanging them.

  TPU pods, SLURM, Open MPI and Kubernetes are detected by jax; elsewhere set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.

  Args:
    heartbeat_timeout_s: a process silent this long is declared dead; the coordination service then
      aborts every other process with "the JAX distributed service detected fatal errors ... another task
      died" rather than leaving them blocked in a collective. Also bounds the shutdown wait.
    initialization_timeout_s: how long the processes wait for each other at start-up (hosts of a large
      slice can start minutes apart).
  """
  env = {k: os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  if any(env.values()) and not all(env.values()):
    raise ValueError(f"Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither (got {env}).")
  jax.distributed.initialize(
      num_processes=int(env["JAX_NUM_PROCESSES"]) if env["JAX_NUM_PROCESSES"] else None,
      process_id=int(env["JAX_PROCESS_ID"]) if env["JAX_PROCESS_ID"] else None,
      initialization_timeout=initialization_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s,
      shutdown_timeout_seconds=heartbeat_timeout_s)


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data',) mesh over `devices` (default: all devices of all processes, `jax.devices()`).

  The axis is 'Auto' (jit propagates shardings from the inputs), not the newer default 'Explicit', under
  which every op of the model would need its sharding spelt out.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def platform(mesh: Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': what the mesh's devices are (not necessarily the default backend)."""
  return mesh.devices.flat[0].platform


def traced_on(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`fn` traced with `mesh` as the abstract mesh: kernels XLA cannot partition (Pallas) split the batch
  themselves with shard_map over it (`cvt_jax.ops_pallas`)."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device (metrics, small arrays)."""
  return NamedSharding(mesh, P())


def fsdp_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """Split over 'data' along the largest axis that divides evenly; replicated if small or indivisible."""
  devices = mesh.shape[DATA_AXIS]
  if int(np.prod(shape)) < FSDP_MIN_SIZE or devices == 1:
    return replicated(mesh)
  divisible = [axis for axis, n in enumerate(shape) if n % devices == 0]
  if not divisible:
    return replicated(mesh)
  axis = max(divisible, key=lambda a: shape[a])
  return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
  """Shardings for a tree of arrays (or `ShapeDtypeStruct`s): replicated, or FSDP-split if `fsdp`."""
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return jax.tree.map(lambda x: fsdp_sharding(x.shape, mesh), abstract_state)


def check_global_batch_size(global_batch_size: int, what: str = "global_batch_size",
                            devices: int | None = None) -> None:
  """Fails clearly unless the batch splits evenly over devices (and hence over processes)."""
  devices = jax.device_count() if devices is None else devices
  if global_batch_size <= 0 or global_batch_size % devices:
    raise ValueError(f"{what}={global_batch_size} must be a positive multiple of the device count "
                     f"({devices} devices over {jax.process_count()} processes).")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice (B / process_count rows) into one global, batch-sharded array."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
