"""The devices a step is compiled for: a TPU slice or NVIDIA GPUs that need not be here, or this host's.

TPU topologies come from libtpu (`jax[tpu]`, or the copy `./run.sh` unpacks beside the venv) and GPU nodes from
XLA's CUDA plugin without a GPU (`./run.sh compile` unpacks it), both through `jax.experimental.topologies`:
compile-only devices that nothing runs on. `Target` holds them with the datasheet figures reports compare
against.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Any

import jax

from cvt_jax.aot import hardware
from cvt_jax.aot import stderr
from cvt_jax.text import gib

_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, deployed as one device per chip


def _bundled_libtpu() -> str | None:
  """The libtpu.so that `./run.sh` unpacks beside the virtual environment (`<venv>/libtpu`), if any."""
  found = glob.glob(os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so"))
  return found[0] if found else None


def _prepare_libtpu() -> None:
  """libtpu asks the cloud metadata server and the environment about the host it runs on: a compile-only
  run answers for it (any values do), so nothing is looked up and nothing is printed. Without an
  installed libtpu, the one `./run.sh` unpacked beside the venv is used."""
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  if not os.environ.get("TPU_LIBRARY_PATH"):  # set but empty counts as unset, as in a shell's `if`
    os.environ.pop("TPU_LIBRARY_PATH", None)
    if bundled := _bundled_libtpu():
      os.environ["TPU_LIBRARY_PATH"] = bundled


_GPU_TOPOLOGY = re.compile(r"^(?P<chip>[a-z0-9]+)(?::(?:(?P<nodes>\d+)x)?(?P<gpus>\d+))?$")
# libtpu's slice names: 2-D tori for the 'lite' chips, 3-D for the others.
_TPU_TOPOLOGY = re.compile(r"^(?P<chip>v5e|v6e):[1-9]\d*x[1-9]\d*$|^(?P<chip3>v4|v5p):[1-9]\d*x[1-9]\d*x[1-9]\d*$")
TOPOLOGY_FORMS = ("a TPU slice v5e:AxB or v6e:AxB (v5e:4x4), v4:AxBxC or v5p:AxBxC (v4:2x2x2), or NVIDIA GPUs "
                  "h100, h200 or a100 as NAME[:[NODESx]GPUS] (h100, h100:8, a100:4x8)")
# No GPU is there to autotune on; XLA's Triton GEMMs then fail to pick tile sizes ("Couldn't find output
# tile sizes"), so dots go to cuBLAS.
_DEVICELESS_GPU_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
_CUDA_WHEELS = ("jax-cuda12-plugin", "jax-cuda12-pjrt")


def cuda_compiler_dir() -> str:
  """Where `./run.sh` unpacks the CUDA PJRT plugin beside the venv; $CVT_JAX_CUDA_COMPILER overrides it."""
  return os.environ.get("CVT_JAX_CUDA_COMPILER") or os.path.join(sys.prefix, "cuda-compiler")


def _cuda_install_hint() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  wheels = " ".join(f"{w}=={jaxlib.__version__}" for w in _CUDA_WHEELS)
  return f"./run.sh compile installs it, or: pip install --no-deps --target {cuda_compiler_dir()} {wheels}"


def _load_cuda_plugin() -> None:
  """Makes XLA's CUDA compiler available on a host without a GPU: the plugin `./run.sh` unpacked (or an
  installed jax[cuda12]). JAX looks for plugins once, when its first backend starts, hence the checks."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if "cuda" in xla_bridge._backend_factories:  # pylint: disable=protected-access
    return
  if xla_bridge._plugins_registered:  # pylint: disable=protected-access
    raise ValueError("compiling for a GPU needs the CUDA plugin, and JAX started its backends without it; "
                     + _cuda_install_hint())
  directory = cuda_compiler_dir()
  if not os.path.isdir(os.path.join(directory, "jax_plugins", "xla_cuda12")):
    raise ValueError(f"compiling for a GPU needs XLA's CUDA plugin, not found in {directory}; "
                     + _cuda_install_hint())
  sys.path.insert(0, directory)
  # Without a GPU the plugin's version checks of the CUDA libraries would fail: only its compiler is used.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")  # local work stays on the CPU: no CUDA runtime came with it


def _gpu_devices(topology: str) -> list[Any]:
  """Compile-only devices of `NAME[:[NODESx]GPUS]` (h100, h200:8, a100:4x8)."""
  match = _GPU_TOPOLOGY.match(topology)
  chip = hardware.GPU_TOPOLOGIES[match["chip"]]
  _load_cuda_plugin()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax_cuda12_plugin import _versions  # pylint: disable=g-import-not-at-top
  cudnn = _versions.cudnn_build_version()  # e.g. 90800
  config = chip.gpu_target_config((cudnn // 10000, cudnn // 100 % 100, cudnn % 100))
  layout = f"1x{match['nodes'] or 1}x{match['gpus'] or 1}"
  with stderr.redirected():  # the plugin's load prints absl and cudart notices there
    return topologies.get_topology_desc(platform="cuda", target_config=config, topology=layout).devices


def _tpu_devices(topology: str) -> list[Any]:
  _prepare_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in _MEGACORE else {}
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise ValueError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' (any host), "
                       "or set TPU_LIBRARY_PATH to a libtpu.so") from None
    raise ValueError(f"--topology {topology}: {' '.join(str(e).split())}") from None


def is_gpu_topology(topology: str) -> bool:
  match = _GPU_TOPOLOGY.match(topology)
  return bool(match) and match["chip"] in hardware.GPU_TOPOLOGIES and all(
      int(match[n] or 1) >= 1 for n in ("nodes", "gpus"))


def check_topology(topology: str) -> None:
  """Refuses a `--topology` that names no TPU slice or GPU node, before any compiler is loaded."""
  if not (is_gpu_topology(topology) or _TPU_TOPOLOGY.match(topology)):
    raise ValueError(f"--topology {topology}: expected {TOPOLOGY_FORMS}")


class Target:
  """The devices to compile for, and the per-device figures a report compares against.

  `topology`: a TPU slice (v5e:4x4, libtpu's names), NVIDIA GPUs (h100, h200:8, a100:4x8: nodes x GPUs per
  node), or None for this host's devices. On GPUs a step must fit the share of memory JAX's allocator takes
  (XLA_CLIENT_MEM_FRACTION, 75 % by default), `budget`; elsewhere the whole memory.
  """

  def __init__(self, topology: str | None):
    self.topology = topology
    self.compiler_options: dict[str, Any] = {}
    if topology:
      check_topology(topology)
    if topology and is_gpu_topology(topology):
      self.devices = _gpu_devices(topology)
      self.compiler_options = dict(_DEVICELESS_GPU_OPTIONS)
    elif topology:
      self.devices = _tpu_devices(topology)
    else:
      self.devices = jax.devices()
    self.kind = self.devices[0].device_kind
    self.platform = self.devices[0].platform
    self.unit = "GPU" if self.platform == "gpu" else "chip"
    self.chip = hardware.chip(self.kind)
    self.hbm = self.chip.hbm if self.chip else self._local_memory()
    self.memory_fraction = _gpu_memory_fraction() if self.platform == "gpu" else 1.0
    self.budget = self.hbm * self.memory_fraction if self.hbm else None

  def _local_memory(self) -> int | None:
    try:
      return (self.devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # pylint: disable=broad-except  # CPUs report none
      return None

  @property
  def chips(self) -> int:
    return len(self.devices)

  def describe(self) -> str:
    hbm = f"{gib(self.hbm)} each" if self.hbm else "memory unknown"
    return f"{self.topology or 'this host'}: {self.chips} x {self.kind} ({hbm})"


def _gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX's allocator may use (jaxlib's plugin options read the same variables)."""
  value = os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  return float(value) if value else 0.75
