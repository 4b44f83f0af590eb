"""Per-device facts that reports compare against: memory, dense peak FLOP/s and memory bandwidth (the
vendors' datasheets), and this host's CPU. One table for `cvt-jax compile` (fit, modelled step times) and
`cvt-jax bench` (MFU, rooflines)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import time
from typing import Any

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """What XLA's GPU compiler needs to know of a device it cannot see (a `GpuTargetConfigProto`)."""

  device_name: str  # as CUDA names it: the compiled devices' `device_kind`
  compute_capability: tuple[int, int]
  sms: int
  fp32_units_per_sm: int
  clock_ghz: float  # boost clock
  l2_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator device as the datasheet gives it."""

  name: str
  hbm: int  # bytes of device memory
  peak_flops: dict[str, float]  # dense FLOP/s by compute dtype
  bandwidth: float  # device-memory bytes/s
  gpu: GpuSpec | None = None  # NVIDIA GPUs that `cvt-jax compile --topology` can compile for

  def peak(self, dtype: str = "bfloat16") -> float | None:
    return self.peak_flops.get(dtype)

  def gpu_target_config(self, cudnn_version: tuple[int, int, int]) -> str:
    """The `GpuTargetConfigProto` text of this GPU for a deviceless compile (`cudnn_version`: the
    plugin's)."""
    g = self.gpu
    if g is None:
      raise ValueError(f"{self.name}: no GPU description to compile for")
    fields = {"threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
              "shared_memory_per_core": g.shared_memory_per_sm, "threads_per_core_limit": 2048,
              "core_count": g.sms, "fpus_per_core": g.fp32_units_per_sm, "block_dim_limit_x": 2**31 - 1,
              "block_dim_limit_y": 65535, "block_dim_limit_z": 65535, "memory_bandwidth": int(self.bandwidth),
              "l2_cache_size": g.l2_bytes, "clock_rate_ghz": g.clock_ghz, "device_memory_size": self.hbm,
              "shared_memory_per_block_optin": g.shared_memory_per_block_optin,
              "registers_per_core_limit": 65536, "registers_per_block_limit": 65536}
    major, minor = g.compute_capability
    info = "\n".join(f"  {k}: {v}" for k, v in fields.items())
    cudnn = " ".join(f"{k}: {v}" for k, v in zip(("major", "minor", "patch"), cudnn_version))
    return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ {cudnn} }}\ndevice_description_str: "{g.device_name}"\n')


# By `device_kind` as libtpu names the chip.
TPU_CHIPS = {
    "TPU v4": Chip("TPU v4", 32 * GiB, {"bfloat16": 275e12}, 1.2e12),
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, {"bfloat16": 197e12}, 8.2e11),
    "TPU v5": Chip("TPU v5p", 95 * GiB, {"bfloat16": 459e12}, 2.76e12),
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, {"bfloat16": 918e12}, 1.64e12),
}
# The TPU generations `cvt-jax compile --topology NAME:LAYOUT` compiles for (libtpu's topology names).
TPU_TOPOLOGIES = {"v4": TPU_CHIPS["TPU v4"], "v5e": TPU_CHIPS["TPU v5 lite"], "v5p": TPU_CHIPS["TPU v5"],
                  "v6e": TPU_CHIPS["TPU v6 lite"]}
# Memory as the CUDA driver reports it usable.
H100 = Chip("H100 SXM", 84_942_979_072, {"bfloat16": 989e12, "float32": 66.9e12}, 3.35e12,
            GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 1.98, 50 * 2**20, 228 * 1024, 227 * 1024))
H200 = Chip("H200 SXM", 151_397_597_184, {"bfloat16": 989e12, "float32": 66.9e12}, 4.8e12,
            GpuSpec("NVIDIA H200", (9, 0), 132, 128, 1.98, 50 * 2**20, 228 * 1024, 227 * 1024))
A100 = Chip("A100 SXM 80 GB", 85_100_068_864, {"bfloat16": 312e12, "float32": 19.5e12}, 2.04e12,
            GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 1.41, 40 * 2**20, 164 * 1024, 163 * 1024))
# By a substring of the CUDA device name, first match wins.
GPU_CHIPS = (
    ("H100 PCIe", Chip("H100 PCIe", 80 * 10**9, {"bfloat16": 756e12, "float32": 51.2e12}, 2.0e12)),
    ("H100", H100),
    ("H200", H200),
    ("A100", A100),
    ("L4", Chip("L4", 24 * 10**9, {"bfloat16": 121e12, "float32": 30.3e12}, 3.0e11)),
)
# The GPUs `cvt-jax compile --topology NAME[:N]` compiles for.
GPU_TOPOLOGIES = {"h100": H100, "h200": H200, "a100": A100}


def chip(device_kind: str) -> Chip | None:
  """The datasheet entry of a TPU or GPU `device_kind`; None for CPUs and unknown devices."""
  if device_kind in TPU_CHIPS:
    return TPU_CHIPS[device_kind]
  return next((c for key, c in GPU_CHIPS if key.lower() in device_kind.lower()), None)


# ------------------------------------------------------------------------------------------------- CPU --


def cpu_info() -> dict[str, Any]:
  """CPU model, cores, clock and SIMD width from /proc/cpuinfo (Linux); best effort elsewhere."""
  info = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(), "mhz": None,
          "simd": "unknown", "fp32_flops_per_cycle": None}
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return info
  fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  info["model"] = fields.get("model name", info["model"])
  info["mhz"] = float(fields["cpu MHz"]) if "cpu MHz" in fields else None
  flags = fields.get("flags", "").split()
  info["simd"] = "avx512" if "avx512f" in flags else "avx2+fma" if "fma" in flags else "sse"
  info["fp32_flops_per_cycle"] = fp32_flops_per_cycle(info["simd"], fields.get("vendor_id", ""),
                                                      fields.get("cpu family", ""))
  return info


def fp32_flops_per_cycle(simd: str, vendor: str, family: str) -> int | None:
  """fp32 FLOP per cycle and core: two FMA pipes x vector lanes x 2.

  AMD Zen 4 (family 25) has AVX-512 but runs each 512-bit FMA as two 256-bit halves: AVX2's rate.
  """
  if simd == "avx512" and not (vendor == "AuthenticAMD" and family == "25"):
    return 64
  return {"avx512": 32, "avx2+fma": 32, "sse": 8}.get(simd)


def peak_flops(device_kind: str, dtype: str, cpu: dict[str, Any]) -> tuple[float | None, str]:
  """(peak FLOP/s, where the number comes from) for MFU; CPU peaks are cores x clock x FMA width."""
  if device_kind.lower() == "cpu":
    per_cycle = cpu.get("fp32_flops_per_cycle")
    if not cpu["mhz"] or not per_cycle:
      return None, "unknown CPU clock or SIMD width"
    peak = cpu["cores"] * cpu["mhz"] * 1e6 * per_cycle
    return peak, f"{cpu['cores']} cores x {cpu['mhz']:.0f} MHz x {per_cycle} fp32 FLOP/cycle ({cpu['simd']})"
  known = chip(device_kind)
  if known and known.peak(dtype):
    return known.peak(dtype), f"datasheet dense {dtype} peak of {known.name}"
  return None, f"no {dtype} peak known for {device_kind!r}"


def gemm_ceiling(dtype: str) -> float:
  """FLOP/s of a large square matmul in jax on the default device, best of 5.

  No model can run its FLOPs faster than its GEMMs, so this bounds every contender from above; on a CPU
  it is the honest peak (the nominal clock in /proc/cpuinfo ignores boost).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 4096 if jax.default_backend() == "cpu" else 16384
  a = jnp.ones((n, n), getattr(jnp, dtype))
  matmul = jax.jit(jnp.dot)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def available_host_memory() -> int | None:
  """Bytes this process may still allocate: MemAvailable, or less where a container's cgroup limit is
  nearer; None off Linux."""
  try:
    with open("/proc/meminfo") as f:
      available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration):
    return None
  for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                       ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
    try:
      room = int(pathlib.Path(f"/sys/fs/cgroup/{limit}").read_text()) - int(
          pathlib.Path(f"/sys/fs/cgroup/{usage}").read_text())
    except (OSError, ValueError):  # no such cgroup, or v2's "max": no limit
      continue
    available = min(available, room)
  return available
