"""The input side of training next to the step it feeds, on photo-like 500x375 JPEGs (`./run.sh bench`).

The same images as a folder tree and as ArrayRecord shards (`cvt-jax prepare`): `train_batches` (decode +
pixel-exact random-resized crop + flip) in 1 and in all worker processes, per source; the on-device
augmentation alone; and the trainer's whole loop on the ArrayRecord shards against the same step fed one
fixed batch.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np


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


def _pipeline_rate(spec: Any, batch: int, steps: int) -> float:
  """img/s of `train_batches` over `steps` batches, after the first (the workers' start)."""
  from cvt_jax.data import input_pipeline
  batches = input_pipeline.train_batches(spec, batch, seed=0)
  try:
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
      next(batches)
    return steps * batch / (time.perf_counter() - start)
  finally:
    batches.close()


def _decode_rates(specs: dict[str, Any], batch: int, steps: int) -> dict[str, Any]:
  """Per source: `train_batches` in this process (threads), in one worker process and in one per core."""
  cores = os.cpu_count() or 1
  rates = {}
  for source, spec in specs.items():
    scaling = []
    for workers in sorted({1, cores}):
      rate = _pipeline_rate(dataclasses.replace(spec, num_workers=workers), batch, steps)
      scaling.append({"workers": workers, "img_per_s": rate, "img_per_s_per_core": rate / workers})
      print(f"   {source}: {rate:.0f} img/s in {workers} worker process(es)", flush=True)
    rates[source] = {"scaling": scaling,
                     "scaling_efficiency": scaling[-1]["img_per_s"] / (scaling[-1]["workers"]
                                                                        * scaling[0]["img_per_s"])}
  return rates


def _device_augment_rate(batch: int, res: int, rounds: int) -> float:
  """img/s of the on-device training augmentation alone (RandAugment, erasing, mixup/cutmix, smoothing)."""
  import jax
  import jax.numpy as jnp

  from cvt_jax.data import augment
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
  ('bare') and fed by the real loop: `train_batches` -> `Prefetcher` ('loop').

  Blocks of `steps` steps run bare, loop, bare again (each after untimed steps), every step timed alone:
  the rates come from median step times, and the loop is compared with the mean of the two bare blocks,
  so a machine whose speed drifts, or that stalls for a step, cannot make either side look better.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from cvt_jax import parallel
  from cvt_jax.data import augment
  from cvt_jax.data import input_pipeline
  from cvt_jax.model import CvT
  from cvt_jax.train import trainer
  mesh = parallel.make_mesh()
  model = CvT.from_variant(model_name, dtype=getattr(jnp, dtype))
  schedule = optax.constant_schedule(1e-3)
  tx = optax.adamw(schedule, weight_decay=0.05)
  state = trainer.create_train_state(model.init_variables(jax.random.key(0), spec.image_size), tx, mesh)
  step = trainer.shard_train_step(
      trainer.make_train_step(model, tx, schedule, augment.default_config(), jax.random.key(1)), mesh)
  first = input_pipeline.train_batches(spec, batch, seed=1)
  fixed = parallel.global_batch({k: v for k, v in next(first).items() if k != "skipped"}, mesh)
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
  """The input side of training next to the step it feeds (see the module docstring)."""
  from cvt_jax.data import input_pipeline
  from cvt_jax.data import prepare
  cores = os.cpu_count() or 1
  batch = min(batch, num_images // 4)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    _write_jpeg_tree(root / "tree", num_images)
    prepare.prepare(str(root / "tree"), str(root / "records"), splits=["train"], log=lambda _: None)
    specs = {source: input_pipeline.DataSpec(source=source, name="", data_dir=str(root / folder),
                                             train_split="train", eval_split="train", image_size=res)
             for source, folder in (("array_record", "records"), ("folder", "tree"))}
    print(f"\n== input pipeline: {num_images} 500x375 JPEGs, random-resized crop {res} + flip, batch {batch}",
          flush=True)
    result = {"what": f"decode 500x375 JPEG + random-resized crop {res} + flip (cvt_jax.data.preprocess."
                      "train_image) through input_pipeline.train_batches",
              "images": num_images, "cores": cores, "batch": batch, "model": model, "res": res,
              "sources": _decode_rates(specs, batch, steps=max(1, num_images // batch - 1))}
    result["img_per_s_device_augment"] = _device_augment_rate(batch, res, rounds=5)
    print(f"   device augmentation: {result['img_per_s_device_augment']:.0f} img/s", flush=True)
    if loop_steps:
      result.update(_training_loop_rates(specs["array_record"], model, dtype, batch, loop_steps))
      print(f"   training loop on ArrayRecord: {result['img_per_s_loop']:.2f} img/s vs "
            f"{result['img_per_s_bare_step']:.2f} img/s for the bare step "
            f"({result['img_per_s_loop'] / result['img_per_s_bare_step']:.2f}x)", flush=True)
  return result


def markdown(p: dict[str, Any]) -> list[str]:
  """The input-side lines of the benchmark report."""
  lines = ["", f"Input pipeline ({p['what']}, {p['images']} images, batch {p['batch']}, {p['cores']} cores): "
           + "; ".join(f"{source}: " + ", ".join(f"{r['workers']} worker(s) {r['img_per_s']:.0f} img/s "
                                               f"({r['img_per_s_per_core']:.0f} per core)" for r in s["scaling"])
                       + f" ({100 * s['scaling_efficiency']:.0f}% of linear)"
                       for source, s in p["sources"].items())
           + f"; on-device augmentation alone {p['img_per_s_device_augment']:.0f} img/s."]
  if "img_per_s_loop" in p:
    lines += ["", f"Training loop on ArrayRecord shards ({p['model']} @{p['res']}, batch {p['batch']}, the "
              f"trainer's sharded step with augmentation; median of {p['loop_steps']} steps per block): "
              f"{p['img_per_s_loop']:.2f} img/s vs {p['img_per_s_bare_step']:.2f} img/s for the same step fed "
              f"one fixed batch (mean of a block before and one after the loop) = "
              f"{p['img_per_s_loop'] / p['img_per_s_bare_step']:.2f}x (goal >= 0.90x)."]
  return lines
