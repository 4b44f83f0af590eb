"""Benchmark cvt_jax against PyTorch (eager and torch.compile) on this machine, side by side.

Every case (model, resolution, batch, inference or training step) builds all contenders first, each in a
process of its own, times their compilation apart, warms them up, then times them in interleaved rounds (the
order rotates each round) so that a noisy, shared machine slows every contender alike; the table reports
medians and the ratio of cvt_jax to the faster PyTorch configuration of the same case.

  cvt-jax bench                        # CPU: CvT-13 @224/384, inference b1/8/32, training step b32, fp32
  cvt-jax bench --quick                # CvT-13 @224, inference b8 + training b32, 3 rounds (~10 min, 2 cores)
  cvt-jax bench --models cvt-13 --res 224 --infer_batches 8 --train_batches 32 --rounds 5
  cvt-jax bench --xla_flags=--xla_cpu_use_onednn=true   # try XLA flags (set before jax starts)

On a GPU the defaults become bf16 (PyTorch: AMP bf16 + fused AdamW), CvT-13/21/W24, batch 256 and the
largest batch that fits both frameworks. Every run also measures a large matmul (the GEMM ceiling: no
model's FLOPs run faster, so each case gets a roofline img/s) and the input side of training on generated
JPEGs: host decode + crop + flip on 1..all cores, the on-device augmentation alone, and the trainer's whole
loop on the JPEG folder tree against its bare step. Results go to bench/results/local/<time>.{json,md}.
PyTorch (and transformers) are needed: `pip install 'cvt-jax[test]'` or `./run.sh bench`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import os
import pathlib
import platform
import signal
import statistics
import tempfile
import time
import types
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags

from cvt_jax import cli

FRAMEWORKS = ("jax", "torch-eager", "torch-compile")
RESULTS_DIR = pathlib.Path("bench") / "results" / "local"

# Dense peak FLOP/s by device-kind substring (first match wins) and compute dtype; MFU divides by these.
GPU_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51.2e12}),
    ("H100", {"bfloat16": 989e12, "float32": 66.9e12}),
    ("H200", {"bfloat16": 989e12, "float32": 66.9e12}),
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
    ("L4", {"bfloat16": 121e12, "float32": 30.3e12}),
)


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  res: int
  batch: int
  mode: str  # 'infer' or 'train'


# ----------------------------------------------------------------------------------------------- machine


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
  for key, peaks in GPU_PEAKS:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype), f"datasheet dense {dtype} peak of {key}"
  return None, f"no peak known for {device_kind!r}"


def machine_info() -> dict[str, Any]:
  import flax
  import jax
  import jaxlib
  import optax
  import torch
  import transformers
  dev = jax.devices()[0]
  return {
      "host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
      "cpu": cpu_info(), "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
      "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__, "numpy": np.__version__},
  }


def gemm_ceiling(dtype: str) -> float:
  """FLOP/s of a large square matmul in jax on the default device, best of 5.

  No model can run its FLOPs faster than its GEMMs, so this bounds every contender from above; on a CPU
  it is the honest peak (the nominal clock in /proc/cpuinfo ignores boost).
  """
  import jax
  import jax.numpy as jnp
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


# ----------------------------------------------------------------------------------------------- timing


class Contender:
  """One framework's compiled case: `compile_s` seconds to build; `step()` runs once and returns seconds."""

  def __init__(self, compile_s: float, run: Callable[[], None]):
    self.compile_s = compile_s
    self._run = run

  def step(self) -> float:
    start = time.perf_counter()
    self._run()
    return time.perf_counter() - start


class ContenderProcess:
  """A `Contender` built and stepped in a process of its own.

  Sharing one process (threads, heap), cvt_jax measured 12-15 % slower and torch.compile's training step
  12 % slower than in processes of their own (bench/README.md, fourth round); here each framework has its
  own and sits idle while another steps.
  """

  def __init__(self, framework: str, case: Case, dtype: str, kernels: str):
    context = multiprocessing.get_context("spawn")
    self._name = framework
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_serve_contender, daemon=True,
                                    args=(child, framework, case, dtype, kernels))
    self._process.start()
    child.close()
    self.compile_s = self._receive()

  def _died(self) -> RuntimeError:
    self._process.join(timeout=60)
    code = self._process.exitcode
    why = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
    return RuntimeError(f"the {self._name} bench process died, exit code {code}{why}")

  def _receive(self) -> float:
    try:
      status, value = self._conn.recv()
    except (EOFError, OSError):
      raise self._died() from None
    if status == "error":
      self.close()
      raise RuntimeError(f"{self._name} failed in its bench process:\n{value}")
    return value

  def step(self) -> float:
    try:
      self._conn.send("step")
    except OSError:
      raise self._died() from None
    return self._receive()

  def close(self) -> None:
    try:
      self._conn.send("stop")
    except OSError:  # the worker has exited already (after an error)
      pass
    self._process.join(timeout=60)
    if self._process.is_alive():
      self._process.kill()
    self._conn.close()


def _serve_contender(conn: Any, framework: str, case: Case, dtype: str, kernels: str) -> None:
  """Worker loop of `ContenderProcess`: build, report the compile time, then one step per request."""
  import traceback
  try:
    if framework != "jax":  # the jax process never loads torch
      import torch
      torch.set_num_threads(os.cpu_count() or 1)
    contender = build(framework, case, dtype, kernels)
    conn.send(("ok", contender.compile_s))
    while conn.recv() == "step":
      conn.send(("ok", contender.step()))
  except Exception:  # noqa: BLE001 -- reported to the parent, which raises it with the framework's name
    conn.send(("error", traceback.format_exc()))


def jax_contender(case: Case, dtype: str, kernels: str) -> Contender:
  import jax
  import jax.numpy as jnp
  import optax

  from cvt_jax.model import CvT
  model = CvT.from_variant(case.model, dtype=getattr(jnp, dtype), kernels=kernels)
  variables = model.init_variables(jax.random.key(0), case.res)
  images = jax.random.normal(jax.random.key(1), (case.batch, case.res, case.res, 3), jnp.float32)
  labels = jax.random.randint(jax.random.key(2), (case.batch,), 0, 1000)

  if case.mode == "infer":
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    start = time.perf_counter()
    compiled = fn.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    return Contender(compile_s, lambda: compiled(variables, images).block_until_ready())

  tx = optax.adamw(1e-3, weight_decay=0.05)

  def loss_fn(params, batch_stats, rng, images, labels):
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                   mutable=["batch_stats"], rngs={"drop_path": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_vars["batch_stats"]

  def train_step(state, images, labels):
    params, batch_stats, opt_state, rng = state
    rng, sub = jax.random.split(rng)
    (loss, batch_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, batch_stats, sub, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state, rng), loss

  state = [(variables["params"], variables["batch_stats"], tx.init(variables["params"]), jax.random.key(3))]
  start = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0).lower(state[0], images, labels).compile()
  compile_s = time.perf_counter() - start

  def step():
    state[0], loss = compiled(state[0], images, labels)
    loss.block_until_ready()

  return Contender(compile_s, step)


def torch_contender(case: Case, dtype: str, compiled: bool) -> Contender:
  import torch

  from cvt_jax.torch_reference import build_torch_cvt
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = build_torch_cvt(case.model).to(device)
  images = torch.randn(case.batch, 3, case.res, case.res, device=device)
  labels = torch.randint(0, 1000, (case.batch,), device=device)
  amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  net = torch.compile(model) if compiled else model

  if case.mode == "infer":
    model.eval()

    def step():
      with torch.inference_mode(), amp:
        net(images).logits.float()
      sync()
  else:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)

    def step():
      opt.zero_grad(set_to_none=True)
      with amp:
        logits = net(images).logits
      torch.nn.functional.cross_entropy(logits.float(), labels).backward()
      opt.step()
      sync()

  # torch compiles lazily: the first call's time (compilation plus one step) is reported as compile time.
  start = time.perf_counter()
  step()
  return Contender(time.perf_counter() - start, step)


def build(framework: str, case: Case, dtype: str, kernels: str) -> Contender:
  if framework == "jax":
    return jax_contender(case, dtype, kernels)
  return torch_contender(case, dtype, compiled=framework == "torch-compile")


def time_interleaved(contenders: dict[str, Contender | ContenderProcess], warmup: int,
                     rounds: int) -> dict[str, list[float]]:
  """Seconds per step of each contender over `rounds` rounds, the running order rotated every round."""
  names = list(contenders)
  for name in names:
    for _ in range(warmup):
      contenders[name].step()
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(contenders[name].step())
  return times


def fits(framework: str, case: Case, dtype: str, kernels: str) -> bool:
  """Whether one step of `case` runs without running out of accelerator memory (in a process alone)."""
  try:
    contender = ContenderProcess(framework, case, dtype, kernels)
  except RuntimeError as e:  # XLA and torch word their out-of-memory errors differently
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return False
    raise
  contender.close()
  return True


def largest_batch(case: Case, frameworks: list[str], dtype: str, kernels: str, limit: int) -> int:
  """Largest power-of-two batch >= case.batch (at most `limit`) with which every framework fits."""
  batch = case.batch
  while batch * 2 <= limit:
    trial = dataclasses.replace(case, batch=batch * 2)
    if not all(fits(f, trial, dtype, kernels) for f in frameworks):
      break
    batch *= 2
    print(f"  batch {batch} fits", flush=True)
  return batch


def run_case(case: Case, args: argparse.Namespace, macs: int, peak: float | None) -> dict[str, Any]:
  print(f"\n== {case.model} @{case.res} {case.mode} batch {case.batch}", flush=True)
  contenders = {}
  try:
    for framework in args.frameworks:
      contenders[framework] = ContenderProcess(framework, case, args.dtype, args.kernels)
      print(f"  {framework}: compiled in {contenders[framework].compile_s:.1f} s", flush=True)
    times = time_interleaved(contenders, args.warmup, args.rounds)
  finally:
    for contender in contenders.values():
      contender.close()
  flops_per_image = 2 * macs * (3 if case.mode == "train" else 1)  # backward = 2x forward
  rows = {}
  for name, secs in times.items():
    median = statistics.median(secs)
    flops = flops_per_image * case.batch / median
    rows[name] = {"compile_s": contenders[name].compile_s, "step_s": secs, "median_s": median,
                  "img_per_s": case.batch / median, "tflops": flops / 1e12,
                  "mfu": flops / peak if peak else None}
    print(f"  {name}: {case.batch / median:8.2f} img/s  (median of {[round(s, 3) for s in secs]})",
          flush=True)
  torch_best = max((n for n in rows if n.startswith("torch")), key=lambda n: rows[n]["img_per_s"],
                   default=None)
  result = {**dataclasses.asdict(case), "macs_per_image": macs, "flops_per_image": flops_per_image,
            "results": rows, "torch_best": torch_best}
  if "jax" in rows:
    for name in rows:
      if name.startswith("torch"):
        result[f"ratio_vs_{name}"] = rows["jax"]["img_per_s"] / rows[name]["img_per_s"]
    if torch_best:
      result["ratio_vs_best_torch"] = rows["jax"]["img_per_s"] / rows[torch_best]["img_per_s"]
      print(f"  jax / {torch_best} = {result['ratio_vs_best_torch']:.2f}x", flush=True)
  return result


# --------------------------------------------------------------------------------------- input pipeline


def _write_jpeg_tree(root: pathlib.Path, count: int, classes: int = 4) -> None:
  """`count` photo-like 500x375 JPEGs (ImageNet's median size, quality 90) under root/train/<class>/."""
  from PIL import Image
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:375, 0:500]
  for i in range(count):
    base = np.stack([np.sin(xx / (20 + 7 * c + i % 5)) * np.cos(yy / (30 + 5 * c)) for c in range(3)], -1)
    pixels = np.clip(127 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    folder = root / "train" / f"class{i % classes}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def _pool_rate(paths: list[str], workers: int, size: int, batch: int) -> float:
  """img/s of `host_decode.DecodePool` with `workers` processes: decode + random-resized crop + flip of
  `paths` in batches, as the folder pipeline submits them (after one untimed batch)."""
  from cvt_jax import host_decode
  jobs = [host_decode.Job((path,), (0, 0, i)) for i, path in enumerate(paths)]
  batches = [jobs[i:i + batch] for i in range(0, len(jobs) - batch + 1, batch)]
  with host_decode.DecodePool(workers, batch, size, {}) as pool:
    pool.submit(batches[0])
    pool.result()
    start = time.perf_counter()
    for jobs_ in batches[1:]:
      if len(pool) == 2:  # two batches in flight, as the pipeline keeps them
        pool.result()
      pool.submit(jobs_)
    while len(pool):
      pool.result()
    return batch * (len(batches) - 1) / (time.perf_counter() - start)


def _host_decode_rates(root: pathlib.Path, spec: Any, batch: int) -> dict[str, Any]:
  """The folder path's decode processes on 1..all cores, its scaling, and `train_batches` end to end."""
  from cvt_jax import input_pipeline
  paths = [str(p) for p in sorted(root.glob("train/*/*.jpg"))]
  cores = os.cpu_count() or 1
  scaling = []
  for workers in sorted({1, cores // 2, cores} - {0}):
    rate = _pool_rate(paths, workers, spec.image_size, batch)
    scaling.append({"workers": workers, "img_per_s": rate, "img_per_s_per_core": rate / workers})
  efficiency = scaling[-1]["img_per_s"] / (scaling[-1]["workers"] * scaling[0]["img_per_s"])
  batches = input_pipeline.train_batches(spec, batch, seed=0)
  next(batches)
  steps = max(1, len(paths) // batch - 1)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  folder = steps * batch / (time.perf_counter() - start)
  batches.close()
  return {"decode_scaling": scaling, "scaling_efficiency": efficiency, "img_per_s_train_batches": folder,
          "img_per_s_one_process": scaling[0]["img_per_s"], "img_per_s_all_cores": scaling[-1]["img_per_s"]}


def _device_augment_rate(batch: int, res: int, rounds: int) -> float:
  """img/s of the on-device training augmentation alone (RandAugment, erasing, mixup/cutmix, smoothing)."""
  import jax
  import jax.numpy as jnp

  from cvt_jax import augment
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
  chain = jax.jit(lambda key, x, y: augment.train_augment(key, x, y, 1000, augment.default_config()))
  jax.block_until_ready(chain(jax.random.key(0), images, labels))
  times = []
  for r in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(chain(jax.random.key(r + 1), images, labels))
    times.append(time.perf_counter() - start)
  return batch / statistics.median(times)


def _training_loop_rates(spec: Any, model_name: str, dtype: str, batch: int, steps: int) -> dict[str, Any]:
  """Step times of the trainer's own sharded step (on-device augmentation included) fed one fixed batch
  ('bare') and fed by the real loop: folder tree of JPEGs -> `train_batches` -> `Prefetcher` ('loop').

  Blocks of `steps` steps run bare, loop, bare again (each after untimed steps), every step timed alone:
  the rates come from median step times, and the loop is compared with the mean of the two bare blocks,
  so a machine whose speed drifts, or that stalls for a step, cannot make either side look better.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from cvt_jax import augment, input_pipeline, parallel, train_lib
  from cvt_jax.model import CvT
  mesh = parallel.make_mesh()
  model = CvT.from_variant(model_name, dtype=getattr(jnp, dtype))
  schedule = optax.constant_schedule(1e-3)
  tx = optax.adamw(schedule, weight_decay=0.05)
  state = train_lib.create_train_state(model.init_variables(jax.random.key(0), spec.image_size), tx, mesh)
  step = train_lib.shard_train_step(
      train_lib.make_train_step(model, tx, schedule, 1000, augment.default_config(), jax.random.key(1)), mesh)
  first = input_pipeline.train_batches(spec, batch, seed=1)
  fixed = parallel.global_batch(next(first), mesh)
  first.close()

  def step_times(feed: Callable[[], Any], untimed: int) -> list[float]:
    nonlocal state
    times = []
    for i in range(untimed + steps):  # untimed: compilation, the pipeline's first batches, heap growth
      start = time.perf_counter()
      state, metrics = step(state, feed())
      jax.block_until_ready(metrics)
      if i >= untimed:
        times.append(time.perf_counter() - start)
    return times

  bare_before = step_times(lambda: fixed, untimed=2)
  batches = input_pipeline.Prefetcher(input_pipeline.train_batches(spec, batch, seed=0), mesh)
  try:
    loop = step_times(lambda: next(batches), untimed=2)
  finally:
    batches.close()
  bare_after = step_times(lambda: fixed, untimed=1)
  bare_s = (statistics.median(bare_before) + statistics.median(bare_after)) / 2
  return {"img_per_s_bare_step": batch / bare_s, "img_per_s_loop": batch / statistics.median(loop),
          "loop_steps": steps, "step_s": {"bare_before": bare_before, "loop": loop, "bare_after": bare_after}}


def bench_input_pipeline(num_images: int, batch: int, model: str, res: int, dtype: str,
                         loop_steps: int) -> dict[str, Any]:
  """The input side of training next to the step it feeds, on photo-like 500x375 JPEGs.

  Host decode + crop + flip (`cvt_jax.preprocess`) on one process, on every core and through
  `input_pipeline.train_batches`; the on-device augmentation alone; and the whole training loop on the
  JPEG folder tree against the same step fed one fixed batch (the goal: loop within 10% of bare).
  """
  from cvt_jax import input_pipeline
  cores = os.cpu_count() or 1
  batch = min(batch, num_images // 2)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    _write_jpeg_tree(root, num_images)
    spec = input_pipeline.DataSpec(source="folder", name="", data_dir=str(root), train_split="train",
                                   eval_split="train", image_size=res, num_workers=cores)
    result = {"what": f"decode 500x375 JPEG + random-resized crop {res} + flip "
                      "(cvt_jax.preprocess.train_image)",
              "images": num_images, "cores": cores, "batch": batch, "model": model, "res": res,
              **_host_decode_rates(root, spec, batch)}
    print(f"\n== input pipeline: {result['img_per_s_one_process']:.0f} img/s one process, "
          f"{result['img_per_s_all_cores']:.0f} img/s on {cores} processes "
          f"({100 * result['scaling_efficiency']:.0f}% of linear), "
          f"{result['img_per_s_train_batches']:.0f} img/s from input_pipeline.train_batches", flush=True)
    result["img_per_s_device_augment"] = _device_augment_rate(batch, res, rounds=5)
    print(f"   device augmentation: {result['img_per_s_device_augment']:.0f} img/s", flush=True)
    if loop_steps:
      result.update(_training_loop_rates(spec, model, dtype, batch, loop_steps))
      print(f"   training loop on JPEGs: {result['img_per_s_loop']:.2f} img/s vs "
            f"{result['img_per_s_bare_step']:.2f} img/s for the bare step "
            f"({result['img_per_s_loop'] / result['img_per_s_bare_step']:.2f}x)", flush=True)
  return result


# ------------------------------------------------------------------------------------------------ report


def markdown(report: dict[str, Any]) -> str:
  m = report["machine"]
  lines = [
      f"# cvt_jax benchmark, {report['date']}", "",
      f"- machine: {m['cpu']['model']}, {m['cpu']['cores']} cores ({m['cpu']['simd']}), "
      f"device kind {m['device_kind']} x{m['device_count']}, torch device {m['torch_device']}, "
      f"torch threads {m['torch_threads']}",
      f"- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
      f"- dtype {report['args']['dtype']}, kernels {report['args']['kernels']}, "
      f"XLA_FLAGS '{m['xla_flags']}', GLIBC_TUNABLES '{m['glibc_tunables']}', "
      f"rounds {report['args']['rounds']} (medians), "
      f"peak {report['peak_source']}",
      f"- measured GEMM ceiling {report['gemm_ceiling'] / 1e12:.3f} TFLOP/s (large square matmul, jax, "
      f"best of {', '.join(f'{c / 1e12:.3f}' for c in report['gemm_ceiling_runs'])} before and after the "
      "cases); "
      "roofline = the img/s of a model whose every FLOP ran at that rate", "",
      "| model | res | mode | batch | GMACs/img | framework | img/s | compile s | TFLOP/s | MFU | of roofline "
      "| jax ratio |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for case in report["cases"]:
    for name, row in case["results"].items():
      best = " (best torch)" if name == case["torch_best"] else ""
      ratio = (f"{case['ratio_vs_' + name]:.2f}x" if "ratio_vs_" + name in case else "")
      mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "n/a"
      lines.append(f"| {case['model']} | {case['res']} | {case['mode']} | {case['batch']} | "
                   f"{case['macs_per_image'] / 1e9:.3f} | {name}{best} | {row['img_per_s']:.2f} | "
                   f"{row['compile_s']:.1f} | {row['tflops']:.3f} | {mfu} | "
                   f"{100 * row['img_per_s'] * case['flops_per_image'] / report['gemm_ceiling']:.0f}% | "
                   f"{ratio} |")
  if report.get("input_pipeline"):
    p = report["input_pipeline"]
    per_core = p["img_per_s_all_cores"] / p["cores"]
    lines += ["", f"Input pipeline ({p['what']}, {p['images']} images): decode processes "
              + ", ".join(f"{r['workers']}: {r['img_per_s']:.0f} img/s ({r['img_per_s_per_core']:.0f} per core)"
                          for r in p["decode_scaling"])
              + f"; {100 * p['scaling_efficiency']:.0f}% of linear scaling, so about {16 * per_core:.0f} img/s "
              f"on a 16-core host and {96 * per_core:.0f} on a 96-core one if it stays linear (an estimate); "
              f"{p['img_per_s_train_batches']:.0f} img/s through `input_pipeline.train_batches` "
              f"(folder tree, batch {p['batch']}, the training loop's own process included); on-device "
              "augmentation (RandAugment, erasing, mixup/cutmix) alone "
              f"{p['img_per_s_device_augment']:.0f} img/s."]
    if "img_per_s_loop" in p:
      lines += ["", f"Training loop on those JPEGs ({p['model']} @{p['res']}, batch {p['batch']}, "
                f"the trainer's sharded step with augmentation; median of {p['loop_steps']} steps per block): "
                f"{p['img_per_s_loop']:.2f} img/s vs {p['img_per_s_bare_step']:.2f} img/s for the same step "
                f"fed one fixed batch (mean of a block before and one after the loop) = "
                f"{p['img_per_s_loop'] / p['img_per_s_bare_step']:.2f}x (goal >= 0.90x)."]
  for failed in report.get("failed_cases", []):
    error = failed["error"].strip().splitlines()  # a worker's traceback: its first and last lines say it
    lines += ["", f"**Failed:** {failed['model']} @{failed['res']} {failed['mode']} batch {failed['batch']}: "
              + (error[0] if len(error) == 1 else f"{error[0]} {error[-1]}")]
  lines += ["", "jax ratio = cvt_jax img/s / that PyTorch configuration's img/s, same run, interleaved rounds."]
  return "\n".join(lines) + "\n"


FLAGS = flags.FlagValues()
flags.DEFINE_list("models", None, "Variants (default: cvt-13 on CPU; cvt-13,cvt-21,cvt-w24 on GPU).",
                  flag_values=FLAGS)
flags.DEFINE_multi_integer("res", [224, 384], "Image sizes (repeat the flag: --res 224 --res 384).",
                           lower_bound=32, flag_values=FLAGS)
flags.DEFINE_list("infer_batches", None, "Inference batches (default: 1,8,32 on CPU, 256 on GPU; '' none).",
                  flag_values=FLAGS)
flags.DEFINE_list("train_batches", None, "Training-step batches: forward, backward, AdamW (default: 32 on "
                  "CPU, 256 on GPU; '' none).", flag_values=FLAGS)
flags.DEFINE_integer("max_batch", 0, "GPU: also run the largest power-of-two batch up to this that fits "
                     "both frameworks (default 4096 on GPU, off on CPU; 0 = off).", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_multi_enum("frameworks", list(FRAMEWORKS), FRAMEWORKS, "Contenders (repeat the flag).",
                        flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype: cvt_jax dtype / torch AMP "
                  "(default float32 on CPU, bfloat16 on GPU).", flag_values=FLAGS)
flags.DEFINE_enum("kernels", "auto", ["auto", "plain", "cpu"], "cvt_jax kernel formulations (cvt_jax.ops; "
                  "auto: the backend's).", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 5, "Timed interleaved rounds per case.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("warmup", 2, "Untimed steps per contender after compiling.", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_integer("pipeline_images", 256, "JPEGs for the input-pipeline measurement (0 skips it).",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("loop_steps", None, "Timed steps of the training loop on JPEG files and of each of the "
                     "two bare-step blocks around it (default 3 on CPU, 20 on GPU; 0 skips them).",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS before jax starts.", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Short run: first model @224 only, inference b8 + training b32 (GPU: "
                  "b256), 3 rounds, 1 warm-up, 64 pipeline images, 3 loop steps (GPU: 10).", flag_values=FLAGS)
flags.DEFINE_string("out", str(RESULTS_DIR), "Output folder.", flag_values=FLAGS)


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """Parses `argv` ([program, flags...]) into the namespace `main` works with."""
  FLAGS.unparse_flags()
  FLAGS(list(argv))
  return _namespace()


def _namespace() -> types.SimpleNamespace:
  """The parsed flags as attributes (batches as int lists, `out` as a Path)."""
  args = types.SimpleNamespace(**{name: FLAGS[name].value for name in FLAGS})
  for name in ("infer_batches", "train_batches"):
    values = getattr(args, name)
    try:
      setattr(args, name, None if values is None else [int(v) for v in values if v])
    except ValueError:
      raise cli.UsageError(f"--{name}={','.join(values)}: expected integers") from None
  args.out = pathlib.Path(args.out)
  return args


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  args = _namespace()
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  # On a GPU this process and the contenders' processes share the device: none may grab 75 % of it up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # jax and torch are imported only now, so that --xla-flags reaches XLA before it starts.
  import jax
  import torch

  from cvt_jax.model import get_variant
  from cvt_jax.summary import count_macs
  torch.set_num_threads(os.cpu_count() or 1)
  gpu = jax.default_backend() == "gpu"
  if gpu != torch.cuda.is_available():
    raise cli.UsageError(f"jax backend {jax.default_backend()!r} but torch.cuda.is_available() is "
                         f"{torch.cuda.is_available()}: both frameworks must run on the same device")
  args.models = args.models or (["cvt-13", "cvt-21", "cvt-w24"] if gpu else ["cvt-13"])
  for name in args.models:
    try:
      get_variant(name)
    except ValueError as e:
      raise cli.UsageError(f"--models: {e}") from e
  args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
  if args.infer_batches is None:
    args.infer_batches = [256] if gpu else [1, 8, 32]
  if args.train_batches is None:
    args.train_batches = [256] if gpu else [32]
  if args.loop_steps is None:
    args.loop_steps = 20 if gpu else 3
  if gpu and not args.max_batch:
    args.max_batch = 4096
  if args.quick:
    args.models, args.res = args.models[:1], [224]
    args.infer_batches, args.train_batches = ([256], [256]) if gpu else ([8], [32])
    args.rounds, args.warmup, args.pipeline_images = 3, 1, min(args.pipeline_images, 64)
    args.loop_steps = min(args.loop_steps, 3 if not gpu else 10)

  machine = machine_info()
  peak, peak_source = peak_flops(machine["device_kind"], args.dtype, machine["cpu"])
  ceilings = [gemm_ceiling(args.dtype)]
  print(f"bench on {machine['cpu']['model']} ({machine['cpu']['cores']} cores), "
        f"device {machine['device_kind']},"
        f" dtype {args.dtype}; peak {peak_source}; measured GEMM ceiling {ceilings[0] / 1e12:.3f} TFLOP/s",
        flush=True)
  cases = []
  for model in args.models:
    for res in args.res:
      for mode, batches in (("infer", args.infer_batches), ("train", args.train_batches)):
        for batch in batches:
          cases.append(Case(model, res, batch, mode))
        if args.max_batch and batches:
          top = largest_batch(Case(model, res, max(batches), mode), args.frameworks, args.dtype,
                              args.kernels, args.max_batch)
          if top > max(batches):
            cases.append(Case(model, res, top, mode))

  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "peak_flops": peak, "peak_source": peak_source,
            "gemm_ceiling": ceilings[0], "gemm_ceiling_runs": ceilings,
            "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
            "cases": [], "failed_cases": []}
  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

  def save() -> None:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))

  for case in cases:
    try:
      report["cases"].append(run_case(case, args, count_macs(case.model, case.res), peak))
    except RuntimeError as e:  # a contender failed or died (e.g. out of memory): report it, go on
      print(f"  case failed: {e}", flush=True)
      report["failed_cases"].append({**dataclasses.asdict(case), "error": str(e)})
    save()  # partial results survive an interrupted run
  # Measured again, the best of both: one disturbed measurement would misplace every roofline.
  ceilings.append(gemm_ceiling(args.dtype))
  report["gemm_ceiling"] = max(ceilings)
  if args.pipeline_images:
    report["input_pipeline"] = bench_input_pipeline(args.pipeline_images, max(args.train_batches or [32]),
                                                    args.models[0], args.res[0], args.dtype, args.loop_steps)
  save()
  print("\n" + markdown(report))
  print(f"wrote {stem}.json and {stem}.md")
  if report["failed_cases"]:
    raise RuntimeError(f"{len(report['failed_cases'])} case(s) failed, see above and the report")


def run(argv: Sequence[str] | None = None) -> None:
  cli.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
