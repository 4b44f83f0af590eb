"""Test set-up: several CPU devices so that the sharding code runs for real, and TF kept off any GPU."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only by design
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
  """A real prepared TFDS dataset 'cvt_tiny_shapes': JPEGs whose red channel is 8 x a unique id, 4 classes,
  22 train and 9 validation examples."""
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

  root = str(tmp_path_factory.mktemp("tiny_tfds"))
  CvtTinyShapes(data_dir=root).download_and_prepare()
  return root
