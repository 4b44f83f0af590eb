"""The TPU fit table: every CvT variant at 224 and 384 on TPU v4, v5e and v5p, from compiles on any host.

  python -m bench.fit_table bench/results/fit-table --jobs 2   # hours on a small CPU host


For each variant and resolution the train step is compiled for v5e at two per-chip batches, plain and with
model.remat=block: memory = fixed + per image x batch. That gives each chip's largest per-chip batch (its HBM
over the same per-chip memory: the layouts differ a little between generations, so the v4 and v5p columns
are predictions). The official recipe (global batch 2048, full augmentation) is then compiled on the
smallest standard slice of each chip where the prediction says it fits, plain if possible, else with
remat: those are compiler verdicts. Every compile is kept in PREFIX.json at once, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
from typing import Any, Sequence

from absl import flags
from etils import epath

from cvt_jax.aot import devices
from cvt_jax.aot import hardware
from cvt_jax.aot import steps
from cvt_jax.cli import runner
from cvt_jax.configs import common, cvt13, cvt21, cvtw24
from cvt_jax.text import gib

FLAGS = flags.FlagValues()
_JOBS = flags.DEFINE_integer("jobs", 1, "Compiles at a time, one process and core each.", lower_bound=1,
                             flag_values=FLAGS)

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
FIT_TOPOLOGY = "v5e:2x2"


def config_for(model: str, res: int, switch: str) -> Any:
  config = MODELS[model].get_config(f"res={res}")
  for key, value in SWITCHES[switch].items():
    section, field = key.split(".")
    config[section][field] = value
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
  reports = steps.compile_steps(config_for(model, res, switch), devices.Target(topology), per_chip, with_eval)
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
    fits = {switch: steps.MemoryModel.fit(*[_report(p[0]) for p in probes[switch]]) for switch in SWITCHES}
    row["fits"] = {k: dataclasses.asdict(v) for k, v in fits.items()}
    for chip, slices in SLICES.items():
      hbm = hardware.TPU_TOPOLOGIES[chip].hbm
      largest = {switch: fit.largest_batch(hbm) for switch, fit in fits.items()}
      row["largest"][chip] = largest
      choice = next(((topology, chips, switch) for topology, chips in slices for switch in SWITCHES
                     if common.OFFICIAL_BATCH // chips <= largest[switch]), None)
      if choice:
        topology, chips, switch = choice
        key = f"{model}@{res} {switch} {topology} official"
        row["official"][chip] = {"key": key, "topology": topology, "switch": switch,
                                 "per_chip": common.OFFICIAL_BATCH // chips, "hbm": hbm}
        if key in data:
          row["official"][chip]["train"], row["official"][chip]["eval"] = data[key]
  return rows


def _report(data: dict) -> steps.StepReport:
  return steps.StepReport(**{k: v for k, v in data.items() if k != "total"})


def _official_cell(official: dict) -> str:
  head = f"{official['topology']} ({official['switch']}): {official['per_chip']}/chip"
  if "train" not in official:
    return f"{head}, not compiled yet"
  train = official["train"]
  verdict = "" if train["fits"] and train["total"] <= official["hbm"] else " (does NOT fit)"
  return f"{head}, train {gib(train['total'])}{verdict}, eval {gib(official['eval']['total'])}"


def markdown(rows: list[dict]) -> str:
  """The fit table as Markdown."""
  lines = [
      "# Fit table: CvT on TPU v4 (32 GiB), v5e (16 GiB), v5p (95 GiB), compiled for each chip on a CPU host",
      "",
      "`python -m bench.fit_table` (bench/fit_table.py). Per-chip train-step memory = fixed + per image x "
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
        f"{fits['remat']['per_image'] / 2**20:.0f} | {fits['plain']['fixed'] / 2**30:.2f} | "
        + " / ".join(str(largest[c]["plain"]) for c in SLICES) + " | "
        + " / ".join(str(largest[c]["remat"]) for c in SLICES) + " | "
        + "; ".join(_official_cell(o) for o in row["official"].values()) + " |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise runner.UsageError("expected one argument, the output prefix (bench/results/fit-table)")
  write_table(argv[1], _JOBS.value)


def run(argv: Sequence[str] | None = None) -> None:
  runner.run(main, argv, __doc__, FLAGS)


if __name__ == "__main__":
  run()
