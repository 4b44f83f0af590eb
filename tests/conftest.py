"""Test set-up: several CPU devices so that the sharding code runs for real, and compiles kept cheap.

The suite compiles hundreds of small programs and runs each a few times, so XLA:CPU compiles them quickly
rather than well: LLVM at -O0 and XLA's older loop emitters (the same computation, rounded the same way or
within the tolerances the tests give), which compile a tiny CvT's train step in about half the time
(bench/README.md, "The test suite"). A test whose program's run is its cost compiles it with
OPTIMISED. One persistent compilation cache, shared with pytest-xdist's workers and the subprocesses the tests
start, serves the programs several tests compile alike. All of it is set before JAX starts.
"""

import atexit
import functools
import os
import shutil
import tempfile

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
OPTIMISED = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only by design
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TEST_XLA_FLAGS]).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # else a parent (pytest-xdist's) made it and removes it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cvt_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)


import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# torchvision's Python transforms, unpacked from its wheel by ./run.sh test (PyPI's wheel is built against
# CUDA torch: its C extension does not load next to the CPU torch of the tests, and its package __init__
# fails on that, so the package is assembled without running it: the transforms need no C extension).
TORCHVISION_DIR = os.path.join(sys.prefix, "torchvision-transforms", "torchvision")


@functools.cache
def _tiny_shapes_builder() -> type:
  """The TFDS builder of 'cvt_tiny_shapes' (a class TFDS registers once): JPEGs whose red channel is 8 x a
  unique id, 4 classes, 22 train and 9 validation examples."""
  import tensorflow_datasets as tfds

  class CvtTinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=["a", "b", "c", "d"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(22)),
              "validation": self._generate_examples(range(22, 31))}

    def _generate_examples(self, ids):
      for i in ids:
        image = np.full((24 + i, 30, 3), (8 * i, 100, 50), np.uint8)
        yield i, {"image": image, "label": i % 4}

  return CvtTinyShapes


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
  """cvt_tiny_shapes in TFRecord files, as most TFDS datasets are prepared (`cvt-jax prepare` converts them)."""
  root = str(tmp_path_factory.mktemp("tiny_tfds"))
  _tiny_shapes_builder()(data_dir=root, file_format="tfrecord").download_and_prepare()
  return root


@pytest.fixture(scope="session")
def tiny_tfds_array_record_dir(tmp_path_factory):
  """cvt_tiny_shapes in array_record files, which the pipeline reads directly (`tfds.data_source`)."""
  root = str(tmp_path_factory.mktemp("tiny_tfds_ar"))
  _tiny_shapes_builder()(data_dir=root, file_format="array_record").download_and_prepare()
  return root


@pytest.fixture(scope="module")
def torchvision_transforms():
  """`torchvision.transforms` (the reference of the pixel-parity tests), without torchvision's C ops.

  Removed from sys.modules afterwards: transformers probes for torchvision and must not find this one.
  """
  if not os.path.isdir(TORCHVISION_DIR):
    pytest.fail(f"torchvision's transforms are missing at {TORCHVISION_DIR}: run ./run.sh test, which "
                "unpacks them (pip install --no-deps --target ... torchvision==0.28.0)")
  package = types.ModuleType("torchvision")
  package.__path__ = [TORCHVISION_DIR]
  sys.modules["torchvision"] = package
  from torchvision import transforms  # pylint: disable=g-import-not-at-top
  yield transforms
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """The fine-tuned tiny checkpoint of tests/finetuned_tiny.py: built once per run, copied per test module."""
  import finetuned_tiny  # pylint: disable=g-import-not-at-top  # builds with the trainer: JAX is set up above
  return finetuned_tiny.shared(tmp_path_factory)
