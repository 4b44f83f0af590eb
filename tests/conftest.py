"""Test set-up: several CPU devices so that the sharding code runs for real, and TF kept off any GPU."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only by design
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
