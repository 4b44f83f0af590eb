"""CPU serving of CvT side by side: cvt_jax under `jax.jit`, its StableHLO and ONNX artefacts, PyTorch.

  PYTHONPATH=. python -m bench.serving                          # CvT-13 @224, batch 1 and 8, 15 rounds
  PYTHONPATH=. taskset -c 0-3 python -m bench.serving --rounds 30 --out bench/results/serving-mine

Every contender serves uint8 (b, S, S, 3) images already cropped (the artefacts' contract) in a process of its
own, in fp32, with as many threads as the process may use cores (`taskset` picks them): "cvt_jax" (the
model under `jax.jit`, weights as arguments), "stablehlo" (`cvt-jax export`'s model.stablehlo through
`jax.export.deserialize`), "onnxruntime" (`--format onnx`'s model.onnx in ONNX Runtime's CPU provider; the
process imports neither jax nor cvt_jax), "openvino" (the same model.onnx in OpenVINO's CPU plugin, fp32;
skipped unless `pip install openvino`), "torch-eager" and "torch-compile" (`bench.torch_models.CvT`: the
official model's computation, weights random). Each is compiled and warmed up, then all are timed in
interleaved rounds (the order rotates each round) so that a shared machine slows them alike; medians are
reported. Results: OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import multiprocessing
import os
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

CONTENDERS = ("cvt_jax", "stablehlo", "onnxruntime", "openvino", "torch-eager", "torch-compile")


def threads() -> int:
  """The cores this process may run on (`taskset`), the thread count of every contender."""
  return len(os.sched_getaffinity(0))


def _cvt_jax(folder: str, batch: int) -> Callable[[np.ndarray], Any]:
  import jax

  from cvt_jax import model as model_lib
  from cvt_jax import weights
  checkpoint = weights.load(os.path.join(folder, "cvt.npz"))
  model, variables = checkpoint.model(), jax.device_put(checkpoint.variables)
  forward = jax.jit(lambda v, x: model.apply(v, model_lib.normalize(x)))
  return lambda images: forward(variables, images).block_until_ready()


def _stablehlo(folder: str, batch: int) -> Callable[[np.ndarray], Any]:
  import jax
  exported = jax.export.deserialize(bytearray(pathlib.Path(folder, "stablehlo", "model.stablehlo").read_bytes()))
  forward = jax.jit(exported.call)
  return lambda images: forward(images).block_until_ready()


def _onnxruntime(folder: str, batch: int) -> Callable[[np.ndarray], Any]:
  import onnxruntime
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads()
  session = onnxruntime.InferenceSession(os.path.join(folder, "onnx", "model.onnx"), options,
                                         providers=["CPUExecutionProvider"])
  return lambda images: session.run(None, {"images": images})


def _openvino(folder: str, batch: int) -> Callable[[np.ndarray], Any]:
  import openvino
  model = openvino.Core().compile_model(os.path.join(folder, "onnx", "model.onnx"), "CPU", {
      "INFERENCE_NUM_THREADS": threads(), "INFERENCE_PRECISION_HINT": "f32"})  # no bf16 on AMX/AVX512-BF16
  return lambda images: model(images)


def _torch(compiled: bool) -> Callable[[str, int], Callable[[np.ndarray], Any]]:
  def build(folder: str, batch: int) -> Callable[[np.ndarray], Any]:
    import torch

    from bench import torch_models
    from cvt_jax import model as model_lib
    torch.set_num_threads(threads())
    model = torch_models.CvT("cvt-13").eval()
    net = torch.compile(model) if compiled else model
    mean = torch.tensor(model_lib.MEAN_RGB).reshape(1, 3, 1, 1) * 255
    std = torch.tensor(model_lib.STD_RGB).reshape(1, 3, 1, 1) * 255

    def forward(images: np.ndarray) -> Any:
      with torch.inference_mode():  # the same work as the artefacts: uint8 NHWC in, normalised inside
        return net((torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std)
    return forward
  return build


BUILDERS = {"cvt_jax": _cvt_jax, "stablehlo": _stablehlo, "onnxruntime": _onnxruntime, "openvino": _openvino,
            "torch-eager": _torch(False), "torch-compile": _torch(True)}


def _serve(conn: Any, name: str, folder: str, batch: int, size: int) -> None:
  """A contender's process: build, time the first call (compilation), then one timed call per request."""
  import traceback
  try:
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
    start = time.perf_counter()
    forward = BUILDERS[name](folder, batch)
    forward(images)
    conn.send(("ok", time.perf_counter() - start))
    while conn.recv() == "step":
      start = time.perf_counter()
      forward(images)
      conn.send(("ok", time.perf_counter() - start))
  except Exception:  # noqa: BLE001 -- the parent reports it with the contender's name
    conn.send(("error", traceback.format_exc()))


class Process:
  """A contender in a spawned process: `first_s` (build and first call), `step()` -> seconds of one call."""

  def __init__(self, name: str, folder: str, batch: int, size: int):
    self.name = name
    self._conn, child = multiprocessing.get_context("spawn").Pipe()
    self._process = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(child, name, folder, batch, size), daemon=True)
    self._process.start()
    child.close()
    self.first_s = self._receive()

  def _receive(self) -> float:
    status, value = self._conn.recv()
    if status == "error":
      raise RuntimeError(f"{self.name} failed:\n{value}")
    return value

  def step(self) -> float:
    self._conn.send("step")
    return self._receive()

  def close(self) -> None:
    self._conn.send("stop")
    self._process.join(timeout=60)
    if self._process.is_alive():
      self._process.kill()


def write_artefacts(folder: str, size: int) -> None:
  """cvt.npz (CvT-13, the official random initialisation) and both exports of it in `folder`."""
  import jax

  from cvt_jax import export
  from cvt_jax import export_onnx
  from cvt_jax import model as model_lib
  from cvt_jax import weights
  model = model_lib.CvT.from_variant("cvt-13")
  variables = jax.tree.map(np.asarray, model.init_variables(jax.random.key(0), size))
  checkpoint = weights.Checkpoint(variables, model.spec, 1000, source="cvt-13, random init")
  weights.save(checkpoint, os.path.join(folder, "cvt.npz"))
  export.save(export.export(checkpoint, size), checkpoint, os.path.join(folder, "stablehlo"), "float32")
  export_onnx.save(export_onnx.export(checkpoint, size), checkpoint, os.path.join(folder, "onnx"), "float32")


def versions() -> dict[str, str]:
  import importlib.metadata
  out = {}
  for package in ("jax", "jaxlib", "onnxruntime", "openvino", "jax2onnx", "torch", "numpy"):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = "not installed"
  return out


def markdown(report: dict[str, Any]) -> str:
  cpu = report["cpu"]
  lines = [f"# CPU serving of CvT-13 @{report['image_size']}, {report['date']}", "",
           f"- {cpu['model']}, {cpu['cores']} cores visible ({cpu['simd']}), {report['threads']} threads per "
           f"contender, {report['rounds']} interleaved rounds (medians), fp32, uint8 images in",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
           "| batch | contender | img/s | ms per call | first call s | vs best torch |", "|---|---|---|---|---|---|"]
  for case in report["cases"]:
    rows = case["results"]
    torch_best = max((rows[n]["img_per_s"] for n in rows if n.startswith("torch")), default=None)
    for name, row in rows.items():
      ratio = f"{row['img_per_s'] / torch_best:.2f}x" if torch_best else ""
      lines.append(f"| {case['batch']} | {name} | {row['img_per_s']:.2f} | {1000 * row['median_s']:.1f} | "
                   f"{row['first_s']:.1f} | {ratio} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--contenders", default=",".join(CONTENDERS))
  parser.add_argument("--out", default=None, help="OUT.json and OUT.md (default bench/results/local/serving-<time>)")
  args = parser.parse_args()
  from bench.run import time_interleaved
  from cvt_jax.aot import hardware
  names = [n for n in args.contenders.split(",") if n != "openvino" or importlib.util.find_spec("openvino")]
  out = pathlib.Path(args.out or f"bench/results/local/serving-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  out.parent.mkdir(parents=True, exist_ok=True)
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": hardware.cpu_info(), "host": platform.node(), "threads": threads(), "rounds": args.rounds,
            "image_size": args.image_size, "versions": versions(), "cases": []}
  with tempfile.TemporaryDirectory() as folder:
    print(f"exporting CvT-13 @{args.image_size} (StableHLO and ONNX)", flush=True)
    write_artefacts(folder, args.image_size)
    for batch in map(int, args.batches.split(",")):
      print(f"\n== batch {batch}, {threads()} threads", flush=True)
      contenders = {}
      try:
        for name in names:
          contenders[name] = Process(name, folder, batch, args.image_size)
          print(f"  {name}: first call {contenders[name].first_s:.1f} s", flush=True)
        times = time_interleaved(contenders, args.warmup, args.rounds)
      finally:
        for contender in contenders.values():
          contender.close()
      rows = {}
      for name, secs in times.items():
        median = statistics.median(secs)
        rows[name] = {"img_per_s": batch / median, "median_s": median, "first_s": contenders[name].first_s,
                      "step_s": secs}
        print(f"  {name}: {batch / median:7.2f} img/s", flush=True)
      report["cases"].append({"batch": batch, "results": rows})
      out.with_suffix(".json").write_text(json.dumps(report, indent=1))
      out.with_suffix(".md").write_text(markdown(report))
  print("\n" + markdown(report))
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  main()
