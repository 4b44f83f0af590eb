"""Benchmark cvt_jax against PyTorch (eager and torch.compile) on this machine, side by side.

Every case (model, resolution, batch, inference or training step) builds all contenders first, each in a
process of its own, times their compilation apart, warms them up, then times them in interleaved rounds (the
order rotates each round) so that a noisy, shared machine slows every contender alike; the table reports
medians and the ratio of cvt_jax to the faster PyTorch configuration of the same case.

  ./run.sh bench                        # CPU: CvT-13 @224/384, inference b1/8/32, training step b32, fp32
  ./run.sh bench --quick                # CvT-13 @224, inference b8 + training b32, 3 rounds (~10 min, 2 cores)
  ./run.sh bench --models cvt-13 --res 224 --infer_batches 8 --train_batches 32 --rounds 5
  ./run.sh bench --xla_flags=--xla_cpu_use_onednn=true   # try XLA flags (set before jax starts)

On a GPU the defaults become bf16 (PyTorch: AMP bf16 + fused AdamW), CvT-13/21/W24, batch 256 and the
largest batch that fits both frameworks. Every run also measures a large matmul (the GEMM ceiling: no
model's FLOPs run faster, so each case gets a roofline img/s) and the input side of training on generated
JPEGs: `train_batches` from a folder tree and from ArrayRecord shards in 1 and all worker processes, the
on-device augmentation alone, and the trainer's whole loop on the shards against its bare step. Results go
to bench/results/local/<time>.{json,md}. PyTorch is needed (`pip install
'cvt-jax[test]'` or `./run.sh bench`); the PyTorch side is Hugging Face's CvT where transformers is installed,
else `bench.torch_models.CvT` (the official model in plain PyTorch).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import pathlib
import platform
import signal
import statistics
import time
import types
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags

from bench import host_input
from cvt_jax import ops
from cvt_jax.aot import hardware
from cvt_jax.cli import runner

FRAMEWORKS = ("jax", "torch-eager", "torch-compile")
RESULTS_DIR = pathlib.Path("bench") / "results" / "local"

@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  res: int
  batch: int
  mode: str  # 'infer' or 'train'


# ----------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
  import flax
  import jax
  import jaxlib
  import optax
  import torch
  dev = jax.devices()[0]
  return {
      "host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
      "cpu": hardware.cpu_info(), "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
      "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "torch": torch.__version__,
                   "transformers": _version("transformers"), "numpy": np.__version__},
      "torch_cvt": _torch_cvt_source(),
  }


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _torch_cvt_source() -> str:
  """Hugging Face's CvT (QuickGELU patched in) where transformers is installed: the strongest maintained
  PyTorch CvT; else `bench.torch_models.CvT`, the official model's computation in plain PyTorch."""
  return "transformers" if importlib.util.find_spec("transformers") else "bench.torch_models"


def build_torch_model(variant: str) -> Any:
  """The PyTorch CvT the bench races (see `_torch_cvt_source`)."""
  if _torch_cvt_source() == "transformers":
    from bench.torch_models import build_torch_cvt
    return build_torch_cvt(variant)
  from bench import torch_models
  return torch_models.CvT(variant)


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

  Sharing one process (threads, heap) slowed both frameworks measurably (bench/README.md, fourth round);
  here each framework has its own and sits idle while another steps.
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

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = build_torch_model(case.model).to(device)
  logits_of = lambda out: getattr(out, "logits", out)  # Hugging Face returns an output object
  images = torch.randn(case.batch, 3, case.res, case.res, device=device)
  labels = torch.randint(0, 1000, (case.batch,), device=device)
  amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  net = torch.compile(model) if compiled else model

  if case.mode == "infer":
    model.eval()

    def step():
      with torch.inference_mode(), amp:
        logits_of(net(images)).float()
      sync()
  else:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)

    def step():
      opt.zero_grad(set_to_none=True)
      with amp:
        logits = logits_of(net(images))
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


def run_case(case: Case, args: types.SimpleNamespace, macs: int, peak: float | None) -> dict[str, Any]:
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
  from cvt_jax import complexity  # pylint: disable=g-import-not-at-top  # jax starts after --xla_flags (main)
  flops_per_image = complexity.model_flops(macs, train=case.mode == "train")
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


# ------------------------------------------------------------------------------------------------ report


def markdown(report: dict[str, Any]) -> str:
  m = report["machine"]
  lines = [
      f"# cvt_jax benchmark, {report['date']}", "",
      f"- machine: {m['cpu']['model']}, {m['cpu']['cores']} cores ({m['cpu']['simd']}), "
      f"device kind {m['device_kind']} x{m['device_count']}, torch device {m['torch_device']}, "
      f"torch threads {m['torch_threads']}, PyTorch CvT from {m.get('torch_cvt', 'transformers')}",
      "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
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
    lines += host_input.markdown(report["input_pipeline"])
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
flags.DEFINE_enum("kernels", "auto", list(ops.KERNEL_CHOICES), "cvt_jax kernel formulations (cvt_jax.ops; "
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
      raise runner.UsageError(f"--{name}={','.join(values)}: expected integers") from None
  args.out = pathlib.Path(args.out)
  return args


def main(argv: Sequence[str]) -> None:
  runner.no_arguments(argv)
  args = _namespace()
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  # On a GPU this process and the contenders' processes share the device: none may grab 75 % of it up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # jax and torch are imported only now, so that --xla-flags reaches XLA before it starts.
  import jax
  import torch

  from cvt_jax import complexity
  from cvt_jax.model import get_variant
  torch.set_num_threads(os.cpu_count() or 1)
  gpu = jax.default_backend() == "gpu"
  if gpu != torch.cuda.is_available():
    raise runner.UsageError(f"jax backend {jax.default_backend()!r} but torch.cuda.is_available() is "
                            f"{torch.cuda.is_available()}: both frameworks must run on the same device")
  args.models = args.models or (["cvt-13", "cvt-21", "cvt-w24"] if gpu else ["cvt-13"])
  for name in args.models:
    try:
      get_variant(name)
    except ValueError as e:
      raise runner.UsageError(f"--models: {e}") from e
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
  peak, peak_source = hardware.peak_flops(machine["device_kind"], args.dtype, machine["cpu"])
  ceilings = [hardware.gemm_ceiling(args.dtype)]
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
      report["cases"].append(run_case(case, args, complexity.count_macs(case.model, case.res), peak))
    except RuntimeError as e:  # a contender failed or died (e.g. out of memory): report it, go on
      print(f"  case failed: {e}", flush=True)
      report["failed_cases"].append({**dataclasses.asdict(case), "error": str(e)})
    save()  # partial results survive an interrupted run
  # Measured again, the best of both: one disturbed measurement would misplace every roofline.
  ceilings.append(hardware.gemm_ceiling(args.dtype))
  report["gemm_ceiling"] = max(ceilings)
  if args.pipeline_images:
    report["input_pipeline"] = host_input.bench_input_pipeline(
        args.pipeline_images, max(args.train_batches or [32]), args.models[0], args.res[0], args.dtype,
        args.loop_steps)
  save()
  print("\n" + markdown(report))
  print(f"wrote {stem}.json and {stem}.md")
  if report["failed_cases"]:
    raise RuntimeError(f"{len(report['failed_cases'])} case(s) failed, see above and the report")


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
