r"""Compile the train and eval steps for a TPU slice (or this host), and report memory and fit per chip.

  cvt-jax compile --config cvt13 --topology v5e:2x2              # the config's global batch over 4 chips
  cvt-jax compile --config cvtw24 --topology v5e:16x16            # W24 @384, global batch 2048, 256 chips
  cvt-jax compile --config cvt13 --topology v5e:2x2 --per_chip_batch 128
  cvt-jax compile --config cvt13 --topology v5e:2x2 --find_batch --config.model.remat=block
  cvt-jax compile --config cvt13                                  # this host's devices (a GPU, say)
  cvt-jax compile --table bench/results/fit-table --jobs 2        # every variant, v4 / v5e / v5p

Nothing runs and no data is read: the real sharded train step (on-device augmentation, forward, backward,
AdamW) and eval step are lowered with abstract inputs and compiled ahead of time (as MaxText's
train_compile.py does), for compile-only devices of a TPU topology (libtpu: `pip install 'jax[tpu]'`, on
any host) or for the local devices. Per chip it prints the arguments (parameters, optimiser state, batch),
the temporaries, the total against the chip's HBM, and fits / does not fit; then the step's FLOPs, bytes
accessed, and the step time and MFU they imply at the chip's peak and bandwidth, labelled modelled: a
compile is no measurement (XLA's cost analysis also counts a loop body once). A step that does not fit
exits 1 naming the biggest consumer and the switches that help. Memory is linear in the per-chip batch:
`--find_batch` compiles two batches, solves for the largest one that fits and compiles it to check.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import re
import time
from typing import Any, Callable, Sequence

from absl import flags
from etils import epath

from cvt_jax import cli
from cvt_jax.configs import cvt13, cvt21, cvtw24

# Per chip: HBM bytes, dense bf16 FLOP/s, HBM bytes/s (device_kind as libtpu names it).
TPU_CHIPS = {
    "TPU v4": (32 * 2**30, 275e12, 1.2e12),
    "TPU v5 lite": (16 * 2**30, 197e12, 8.2e11),
    "TPU v5": (95 * 2**30, 459e12, 2.76e12),
    "TPU v6 lite": (32 * 2**30, 918e12, 1.64e12),
}
_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, deployed as one device per chip
_OOM = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\).*?HBM \(([\d.]+)([KMGT])\)", re.S)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

FLAGS = flags.FlagValues()
_CONFIG = cli.define_config_flag(
    FLAGS, "Config name or file with its argument: cvtw24:res=384.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology to compile for (v4:2x2x2, v5e:16x16, "
                                "v5p:4x4x4, ...); default: this host's devices.", flag_values=FLAGS)
_PER_CHIP_BATCH = flags.DEFINE_integer("per_chip_batch", None, "Images per chip per step (default: the "
                                       "config's global_batch_size over the chips).", lower_bound=1,
                                       flag_values=FLAGS)
_FIND_BATCH = flags.DEFINE_bool("find_batch", False, "Find the largest per-chip batch that fits.",
                                flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", None, "Also write the report to this .json file.", flag_values=FLAGS)
_TABLE = flags.DEFINE_string("table", None, "Write the fit table of every variant at 224 and 384 on v4, v5e "
                             "and v5p to <this>.json and .md (hours on a small CPU host).", flag_values=FLAGS)
_JOBS = flags.DEFINE_integer("jobs", 1, "With --table: compiles at a time, one process and core each.",
                             lower_bound=1, flag_values=FLAGS)


class DoesNotFit(ValueError):
  """A step that needs more memory than a chip has."""


@dataclasses.dataclass
class StepReport:
  """What one compile says about one step, per chip (bytes)."""

  name: str
  per_chip_batch: int
  fits: bool
  arguments: int = 0  # parameters, optimiser state and the batch, as the step receives them
  outputs: int = 0
  aliased: int = 0  # outputs written in place of donated arguments
  temporaries: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  compile_seconds: float = 0.0
  error: str = ""

  @property
  def total(self) -> int:
    """Peak HBM of the step: arguments, the outputs not written in place, and the temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def _quiet_libtpu() -> None:
  """libtpu asks the cloud metadata server and the environment about the host it runs on: a compile-only
  run answers for it (any values do), so nothing is looked up and nothing is printed."""
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)


class Target:
  """The devices to compile for, and the per-chip figures a report compares against."""

  def __init__(self, topology: str | None):
    import jax  # pylint: disable=g-import-not-at-top

    self.topology = topology
    if topology:
      _quiet_libtpu()
      from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
      kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in _MEGACORE else {}
      try:
        self.devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
      except RuntimeError as e:
        if "TPU support not installed" in str(e):
          raise RuntimeError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' (any host), "
                             "or point TPU_LIBRARY_PATH at a libtpu.so") from None
        raise ValueError(f"--topology {topology}: {cli.one_line(e)}") from None
    else:
      self.devices = jax.devices()
    self.kind = self.devices[0].device_kind
    self.platform = self.devices[0].platform
    known = TPU_CHIPS.get(self.kind)
    self.hbm, self.peak_flops, self.bandwidth = known if known else (self._local_memory(), None, None)

  def _local_memory(self) -> int | None:
    try:
      return (self.devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # pylint: disable=broad-except  # CPUs report none
      return None

  @property
  def chips(self) -> int:
    return len(self.devices)

  def describe(self) -> str:
    hbm = f"{_gib(self.hbm)} each" if self.hbm else "memory unknown"
    return f"{self.topology or 'this host'}: {self.chips} x {self.kind} ({hbm})"


def _compile(name: str, jitted: Any, args: Sequence[Any], per_chip_batch: int) -> StepReport:
  """Compiles `jitted` for abstract `args`; a step that does not fit HBM reports the sizes libtpu gave."""
  started = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except  # libtpu says RESOURCE_EXHAUSTED in several types
    match = _OOM.search(str(e))
    if not match:
      raise
    return StepReport(name, per_chip_batch, fits=False, temporaries=int(float(match[1]) * _UNITS[match[2]]),
                      compile_seconds=time.perf_counter() - started,
                      error=f"temporaries {match[1]}{match[2]} exceed the HBM ({match[3]}{match[4]})")
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return StepReport(name, per_chip_batch, True, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                    stats.alias_size_in_bytes, stats.temp_size_in_bytes, float(cost.get("flops", 0.0)),
                    float(cost.get("bytes accessed", 0.0)), time.perf_counter() - started)


def compile_steps(config: Any, target: Target, per_chip_batch: int,
                  with_eval: bool = True) -> list[StepReport]:
  """The train step (and the eval step) of `config`, compiled for `target` at `per_chip_batch` images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cvt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from cvt_jax import optim  # pylint: disable=g-import-not-at-top
  from cvt_jax import parallel  # pylint: disable=g-import-not-at-top
  from cvt_jax import train_lib  # pylint: disable=g-import-not-at-top

  num_classes = config.model.num_classes
  mesh = parallel.make_mesh(target.devices)
  model = model_lib.from_config(config.model, num_classes, target.platform)
  schedule = optim.make_schedule(config.schedule, config.optim.lr, config.num_epochs, steps_per_epoch=1000)
  tx = optim.make_optimizer(config.optim, schedule)
  abstract = train_lib.abstract_train_state(model, tx, config.data.image_size)
  shardings = parallel.state_shardings(abstract, mesh, config.fsdp)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  size, batch = config.data.image_size, per_chip_batch * target.chips
  on_batch = parallel.batch_sharding(mesh)
  data = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=on_batch),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=on_batch)}
  step = train_lib.shard_train_step(train_lib.make_train_step(
      model, tx, schedule, num_classes, config.augment, jax.random.key(0), target.chips,
      config.optim.grad_accum_steps), mesh, shardings)
  reports = [_compile("train step", step, (state, data), per_chip_batch)]
  if with_eval:
    eval_model = model.clone(dtype=model_lib.compute_dtype(config.model.eval_dtype, target.platform),
                             remat="none")
    eval_step = train_lib.shard_eval_step(train_lib.make_eval_step(eval_model), mesh,
                                          {"params": shardings.params, "batch_stats": shardings.batch_stats})
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    data["mask"] = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=on_batch)
    reports.append(_compile("eval step", eval_step, (variables, data), per_chip_batch))
  return reports


@dataclasses.dataclass(frozen=True)
class MemoryModel:
  """Train-step memory per chip = fixed + per_image x per-chip batch, from two compiles."""

  fixed: float
  per_image: float

  @classmethod
  def fit(cls, a: StepReport, b: StepReport) -> MemoryModel:
    per_image = (b.total - a.total) / (b.per_chip_batch - a.per_chip_batch)
    return cls(a.total - per_image * a.per_chip_batch, per_image)

  def largest_batch(self, hbm: float) -> int:
    """The largest per-chip batch under `hbm`: a multiple of 8 when 8 or more fit."""
    room = int((hbm - self.fixed) // self.per_image)
    return room // 8 * 8 if room >= 8 else max(room, 0)


def find_batch(config: Any, target: Target, probes: tuple[int, int] = (8, 16),
               log: Callable[[str], None] = print) -> tuple[int, MemoryModel, list[StepReport]]:
  """The largest per-chip batch whose train step fits `target`, the memory model and the compiles behind it.

  Two compiles fit the memory model; the predicted batch is compiled to check it, and lowered by a tenth
  while it does not fit.
  """
  if not target.hbm:
    raise ValueError(f"{target.kind}: its memory is unknown, so no batch can be fitted to it")
  reports = [compile_steps(config, target, b, with_eval=False)[0] for b in probes]
  for r in reports:
    log(f"  probe: {r.per_chip_batch} per chip -> {_gib(r.total) if r.fits else r.error} "
        f"({r.compile_seconds:.0f} s to compile)")
  if not all(r.fits for r in reports):
    smaller = tuple(max(1, b // 4) for b in probes)
    if smaller == probes:
      return 0, MemoryModel(math.inf, math.inf), reports
    return find_batch(config, target, smaller, log)
  model = MemoryModel.fit(*reports)
  batch = model.largest_batch(target.hbm)
  while batch > 0:
    check = compile_steps(config, target, batch, with_eval=False)[0]
    reports.append(check)
    log(f"  check: {batch} per chip -> {_gib(check.total) if check.fits else check.error}")
    if check.fits and check.total <= target.hbm:
      return batch, model, reports
    batch = int(batch * 0.9) // 8 * 8 if batch > 8 else batch - 1
  return 0, model, reports


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def report_lines(reports: list[StepReport], target: Target, config: Any) -> list[str]:
  """The human-readable report: memory per chip, fit, and the cost model's figures (modelled)."""
  from cvt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from cvt_jax import summary  # pylint: disable=g-import-not-at-top

  lines = []
  for r in reports:
    head = f"{r.name}, {r.per_chip_batch} images per chip"
    if not r.fits:
      lines.append(f"{head}: does NOT fit ({r.error})")
      continue
    fits = "fits" if r.total <= (target.hbm or math.inf) else "does NOT fit"
    verdict = f" of {_gib(target.hbm)}: {fits}" if target.hbm else ""
    lines.append(f"{head}: arguments {_gib(r.arguments)} (parameters, optimiser state, batch) + temporaries "
                 f"{_gib(r.temporaries)} + outputs {_gib(r.outputs - r.aliased)} = {_gib(r.total)}{verdict} "
                 f"(compiled in {r.compile_seconds:.0f} s)")
    if r.name == "train step" and target.peak_flops and r.flops:
      macs = summary.count_macs(model_lib.variant_from_config(config.model), config.data.image_size,
                                config.model.num_classes)
      seconds = max(r.flops / target.peak_flops, r.bytes_accessed / target.bandwidth)
      mfu = 6 * macs * r.per_chip_batch / seconds / target.peak_flops
      lines.append(f"  modelled, not measured (XLA cost analysis, loop bodies counted once): "
                   f"{r.flops / 1e12:.2f} TFLOP and {r.bytes_accessed / 1e9:.1f} GB accessed per chip and step "
                   f"-> {seconds * 1e3:.1f} ms at the chip's peak and bandwidth, "
                   f"{r.per_chip_batch / seconds:.0f} img/s per chip, MFU {mfu:.0%}")
  return lines


def advice(report: StepReport, config: Any) -> str:
  """What would make `report` fit, naming its biggest consumer."""
  biggest = ("the temporaries (activations kept for the backward pass, the augmentation)"
             if report.temporaries >= report.arguments else "the arguments (parameters and AdamW moments)")
  switches = []
  if config.model.remat == "none":
    switches.append("--config.model.remat=block (recompute each block in the backward pass)")
  if config.optim.grad_accum_steps == 1 and report.per_chip_batch % 2 == 0:
    switches.append("--config.optim.grad_accum_steps=2 or more (micro-batches of the same global batch)")
  if not config.fsdp:
    switches.append("--config.fsdp=True (parameters and optimiser state split over the chips)")
  switches.append("a larger slice (fewer images per chip)")
  return f"the biggest consumer is {biggest}; try {'; '.join(switches)}"


# ------------------------------------------------------------------------------------------ fit table --
# Every variant at 224 and 384 on TPU v4, v5e and v5p (`--table PREFIX`). For each variant and resolution the
# train step is compiled for v5e at two per-chip batches, plain and with model.remat=block: memory = fixed +
# per image x batch. That gives each chip's largest per-chip batch (its HBM over the same per-chip memory:
# the layouts differ a little between generations, so the v4 and v5p columns are predictions). The
# official recipe (global batch 2048, full augmentation) is then compiled on the smallest standard slice
# of each chip where the prediction says it fits, plain if possible, else with remat: those are compiler
# verdicts. Every compile is kept in PREFIX.json at once, so an interrupted run resumes where it stopped.

MODELS = {"cvt-13": cvt13, "cvt-21": cvt21, "cvt-w24": cvtw24}
RESOLUTIONS = (224, 384)
# Per-chip batches of the two fitting compiles (they must fit a v5e chip).
PROBES = {("cvt-w24", 224): (4, 8), ("cvt-w24", 384): (2, 4)}
DEFAULT_PROBES = (8, 16)
SWITCHES = {"plain": {}, "remat": {"model.remat": "block"}}
# Standard slices by chip, smallest first: (topology, chips).
SLICES = {
    "v4": [("v4:2x2x1", 4), ("v4:2x2x2", 8), ("v4:2x2x4", 16), ("v4:2x4x4", 32), ("v4:4x4x4", 64),
           ("v4:4x4x8", 128), ("v4:4x8x8", 256)],
    "v5e": [("v5e:2x2", 4), ("v5e:2x4", 8), ("v5e:4x4", 16), ("v5e:4x8", 32), ("v5e:8x8", 64),
            ("v5e:8x16", 128), ("v5e:16x16", 256)],
    "v5p": [("v5p:2x2x1", 4), ("v5p:2x2x2", 8), ("v5p:2x2x4", 16), ("v5p:4x4x2", 32), ("v5p:4x4x4", 64),
            ("v5p:4x4x8", 128)],
}
CHIP_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5"}
FIT_TOPOLOGY = "v5e:2x2"
OFFICIAL_BATCH = 2048


def config_for(model: str, res: int, switch: str) -> Any:
  config = MODELS[model].get_config(f"res={res}")
  config.unlock()
  for key, value in SWITCHES[switch].items():
    section, field = key.split(".")
    config[section][field] = value
  config.lock()
  return config


class Results:
  """PREFIX.json: every compile's report under its key, read back on a rerun."""

  def __init__(self, prefix: str):
    self.path = epath.Path(prefix + ".json")
    self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

  def run(self, jobs: dict[str, tuple], workers: int) -> None:
    """Compiles every job (key: `_compile_job` arguments) not yet in the file, `workers` at a time, each in
    its own process (a compile uses one core), saving each report as it comes."""
    todo = {key: job for key, job in jobs.items() if key not in self.data}
    if not todo:
      return
    for key, job in todo.items():
      print(f"{key}: compiling {job[3]} per chip for {job[2]}", flush=True)
    if workers == 1:
      for key, job in todo.items():
        self._save(key, _compile_job(*job))
      return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      running = {pool.submit(_compile_job, *job): key for key, job in todo.items()}
      for done in concurrent.futures.as_completed(running):
        self._save(running[done], done.result())

  def _save(self, key: str, reports: list[dict]) -> None:
    self.data[key] = reports
    self.data["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    self.path.write_text(json.dumps(self.data, indent=1))


def _compile_job(model: str, res: int, topology: str, per_chip: int, switch: str,
                 with_eval: bool) -> list[dict]:
  reports = compile_steps(config_for(model, res, switch), Target(topology), per_chip, with_eval)
  return [{**dataclasses.asdict(r), "total": r.total} for r in reports]


def write_table(prefix: str, workers: int = 1) -> None:
  """Runs (or resumes) every compile of the table and writes PREFIX.json and PREFIX.md.

  Ctrl-C stops it and still writes the table of what has been compiled; a rerun compiles the rest.
  """
  epath.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
  results = Results(prefix)
  cells = [(model, res) for model in MODELS for res in RESOLUTIONS]
  try:
    for model, res in cells:  # row by row, so that a partial table has whole rows
      results.run({_probe_key(model, res, switch, b): (model, res, FIT_TOPOLOGY, b, switch, False)
                   for switch in SWITCHES for b in PROBES.get((model, res), DEFAULT_PROBES)}, workers)
      [row] = _rows(results.data, [(model, res)])
      results.run({o["key"]: (model, res, o["topology"], o["per_chip"], o["switch"], True)
                   for o in row["official"].values()}, workers)
  except KeyboardInterrupt:
    print("interrupted: the table below holds what was compiled; rerun the same command to compile the rest")
  rows = _rows(results.data, cells)
  results.data["rows"] = rows
  results.path.write_text(json.dumps(results.data, indent=1))
  epath.Path(prefix + ".md").write_text(markdown(rows))


def _probe_key(model: str, res: int, switch: str, per_chip: int) -> str:
  return f"{model}@{res} {switch} {FIT_TOPOLOGY} b{per_chip}"


def _rows(data: dict, cells: list[tuple[str, int]]) -> list[dict]:
  """One row per variant and resolution: its memory fits, largest batches and official-recipe compiles, as
  far as `data` holds the compiles they need."""
  rows = []
  for model, res in cells:
    row = {"model": model, "res": res, "fits": {}, "largest": {}, "official": {}}
    rows.append(row)
    probes = {switch: [data.get(_probe_key(model, res, switch, b)) for b in PROBES.get((model, res), DEFAULT_PROBES)]
              for switch in SWITCHES}
    if not all(all(probes[switch]) for switch in SWITCHES):
      continue
    fits = {switch: MemoryModel.fit(*[_report(p[0]) for p in probes[switch]]) for switch in SWITCHES}
    row["fits"] = {k: dataclasses.asdict(v) for k, v in fits.items()}
    for chip, slices in SLICES.items():
      hbm = TPU_CHIPS[CHIP_KINDS[chip]][0]
      largest = {switch: fit.largest_batch(hbm) for switch, fit in fits.items()}
      row["largest"][chip] = largest
      choice = next(((topology, chips, switch) for topology, chips in slices for switch in SWITCHES
                     if OFFICIAL_BATCH // chips <= largest[switch]), None)
      if choice:
        topology, chips, switch = choice
        key = f"{model}@{res} {switch} {topology} official"
        row["official"][chip] = {"key": key, "topology": topology, "switch": switch,
                                 "per_chip": OFFICIAL_BATCH // chips, "hbm": hbm}
        if key in data:
          row["official"][chip]["train"], row["official"][chip]["eval"] = data[key]
  return rows


def _report(data: dict) -> StepReport:
  return StepReport(**{k: v for k, v in data.items() if k != "total"})


def _official_cell(official: dict) -> str:
  head = f"{official['topology']} ({official['switch']}): {official['per_chip']}/chip"
  if "train" not in official:
    return f"{head}, not compiled yet"
  train = official["train"]
  verdict = "" if train["fits"] and train["total"] <= official["hbm"] else " (does NOT fit)"
  return f"{head}, train {train['total'] / 2**30:.2f} GiB{verdict}, eval {official['eval']['total'] / 2**30:.2f} GiB"


def markdown(rows: list[dict]) -> str:
  """The fit table as Markdown."""
  gib = lambda n: f"{n / 2**30:.2f}"
  lines = [
      "# Fit table: CvT on TPU v4 (32 GiB), v5e (16 GiB), v5p (95 GiB), compiled for each chip on a CPU host",
      "",
      "`cvt-jax compile --table` (cvt_jax/compile.py). Per-chip train-step memory = fixed + per image x "
      f"batch, fitted from two compiles on {FIT_TOPOLOGY} (bf16, full augmentation, AdamW, replicated "
      "state); 'remat' = `--config.model.remat=block`. Largest batch = the largest multiple of 8 under the "
      "chip's HBM by that fit (v4 and v5p: predicted from the v5e compiles). Official recipe = global batch "
      "2048 compiled on the smallest standard slice the fit allows: the compiler's own per-chip memory.",
      "",
      "| variant | MiB per image (plain / remat) | fixed GiB | largest per-chip batch v4 / v5e / v5p, plain "
      "| same, remat | official recipe (2048): slice, per-chip batch, compiled train + eval memory per chip |",
      "|---|---|---|---|---|---|",
  ]
  for row in rows:
    fits, largest = row["fits"], row["largest"]
    if not fits:
      lines.append(f"| {row['model']} @{row['res']} | not compiled yet | | | | |")
      continue
    lines.append(
        f"| {row['model']} @{row['res']} | {fits['plain']['per_image'] / 2**20:.0f} / "
        f"{fits['remat']['per_image'] / 2**20:.0f} | {gib(fits['plain']['fixed'])} | "
        + " / ".join(str(largest[c]["plain"]) for c in SLICES) + " | "
        + " / ".join(str(largest[c]["remat"]) for c in SLICES) + " | "
        + "; ".join(_official_cell(o) for o in row["official"].values()) + " |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _TABLE.value:
    write_table(_TABLE.value, _JOBS.value)
    return
  if _CONFIG.value is None:
    raise cli.UsageError("--config is required (or --table)")
  if _JSON.value:
    cli.check_output(_JSON.value, ".json")
  config = _CONFIG.value
  target = Target(_TOPOLOGY.value)
  print(f"compiling {config.model.variant} @{config.data.image_size} for {target.describe()}", flush=True)
  if _FIND_BATCH.value:
    per_chip, memory, _ = find_batch(config, target)
    print(f"largest per-chip batch that fits: {per_chip} ({per_chip * target.chips} on {target.chips} chips); "
          f"memory ~ {_gib(memory.fixed)} + {memory.per_image / 2**20:.1f} MiB per image")
  else:
    per_chip = _PER_CHIP_BATCH.value or config.global_batch_size // target.chips
    if not _PER_CHIP_BATCH.value and config.global_batch_size % target.chips:
      raise cli.UsageError(f"global_batch_size={config.global_batch_size} does not split over {target.chips} "
                           "chips: pass --per_chip_batch")
  if per_chip and config.optim.grad_accum_steps > 1 and per_chip % config.optim.grad_accum_steps:
    raise cli.UsageError(f"optim.grad_accum_steps={config.optim.grad_accum_steps} must divide the per-chip "
                         f"batch {per_chip}")
  reports = compile_steps(config, target, per_chip) if per_chip else []
  for line in report_lines(reports, target, config):
    print(line)
  if _JSON.value:
    epath.Path(_JSON.value).write_text(json.dumps(
        {"target": target.describe(), "hbm_per_chip": target.hbm, "config": config.to_dict(),
         "reports": [{**dataclasses.asdict(r), "total": r.total} for r in reports]}, indent=1, default=str))
  failed = [r for r in reports if not r.fits or (target.hbm and r.total > target.hbm)]
  if not reports:
    raise DoesNotFit(f"not even one image per chip fits {target.describe()}")
  if failed:
    raise DoesNotFit(f"{failed[0].name} does not fit {target.describe()}: {advice(failed[0], config)}")


def run(argv: Sequence[str] | None = None) -> None:
  cli.run(main, argv, __doc__, FLAGS, cli.config_fields_help)


if __name__ == "__main__":
  run()
