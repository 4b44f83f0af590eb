"""The input side of training next to the step it feeds, on photo-like 500x375 JPEGs (`cvt-jax bench`).

Host decode + crop + flip in the decode processes on 1..all cores and through `train_batches`; the
on-device augmentation alone; and the trainer's whole loop on a JPEG folder tree against the same step
fed one fixed batch.
"""

from __future__ import annotations

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


def _pool_rate(paths: list[str], workers: int, size: int, batch: int) -> float:
  """img/s of `decode.DecodePool` with `workers` processes: decode + random-resized crop + flip of
  `paths` in batches, as the folder pipeline submits them (after one untimed batch)."""
  from cvt_jax.data import decode
  jobs = [decode.Job((path,), (0, 0, i)) for i, path in enumerate(paths)]
  batches = [jobs[i:i + batch] for i in range(0, len(jobs) - batch + 1, batch)]
  with decode.DecodePool(workers, batch, size, {}) as pool:
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
  from cvt_jax.data import input_pipeline
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
  ('bare') and fed by the real loop: folder tree of JPEGs -> `train_batches` -> `Prefetcher` ('loop').

  Blocks of `steps` steps run bare, loop, bare again (each after untimed steps), every step timed alone:
  the rates come from median step times, and the loop is compared with the mean of the two bare blocks,
  so a machine whose speed drifts, or that stalls for a step, cannot make either side look better.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from cvt_jax import parallel
  from cvt_jax import train_lib
  from cvt_jax.data import augment
  from cvt_jax.data import input_pipeline
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

  Host decode + crop + flip (`cvt_jax.data.preprocess`) on one process, on every core and through
  `input_pipeline.train_batches`; the on-device augmentation alone; and the whole training loop on the
  JPEG folder tree against the same step fed one fixed batch (the goal: loop within 10% of bare).
  """
  from cvt_jax.data import input_pipeline
  cores = os.cpu_count() or 1
  batch = min(batch, num_images // 2)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    _write_jpeg_tree(root, num_images)
    spec = input_pipeline.DataSpec(source="folder", name="", data_dir=str(root), train_split="train",
                                   eval_split="train", image_size=res, num_workers=cores)
    result = {"what": f"decode 500x375 JPEG + random-resized crop {res} + flip "
                      "(cvt_jax.data.preprocess.train_image)",
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
