"""The training configs: presets, locking, argument parsing and validation before any work."""

import os
import subprocess
import sys

import pytest

from cvt_jax.configs import cvt13, cvt21, cvtw24, demo
from cvt_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module, variant, wd, res", [
    (cvt13, "cvt-13", 0.05, 224), (cvt21, "cvt-21", 0.1, 224), (cvtw24, "cvt-w24", 0.1, 384)])
def test_presets_follow_the_official_recipe(module, variant, wd, res):
  config = module.get_config()
  assert (config.model.variant, config.optim.weight_decay, config.data.image_size) == (variant, wd, res)
  assert (config.optim.lr, config.global_batch_size, config.num_epochs) == (2e-3, 2048, 300)
  assert config.augment.mixup_alpha == 0.8 and config.augment.cutmix_alpha == 1.0
  assert module.__doc__ and f"--config {module.__name__.rsplit('.', 1)[1]}" in module.__doc__
  assert "top-1" in module.__doc__
  trainer.validate_config(config)  # 2048 divides over the 4 test devices


def test_arg_string_selects_presets():
  config = cvt13.get_config("res=384,batch=512")
  assert (config.data.image_size, config.global_batch_size) == (384, 512)


@pytest.mark.parametrize("arg, message", [
    ("size=384", "Unknown config arg 'size'"), ("res", "not key=value"), ("res=big", "not a valid int")])
def test_bad_arg_strings_fail_clearly(arg, message):
  with pytest.raises(ValueError, match=message):
    cvt13.get_config(arg)


def test_configs_are_locked():
  config = cvt13.get_config()
  with pytest.raises(AttributeError):
    config.optim.learning_rate = 1.0


@pytest.mark.parametrize("key, value, message", [
    ("global_batch_size", 1022, "global_batch_size=1022 must be a positive multiple of the device count"),
    ("optim.lr", -1.0, "optim.lr=-1.0 must be positive"),
    ("model.variant", "cvt-99", "Unknown CvT variant"),
    ("data.image_size", 8, "data.image_size=8"),
    ("data.data_dir", "/no/such/dir", "data.data_dir='/no/such/dir' is not a directory"),
    ("model.dtype", "float8", "model.dtype='float8'"),
])
def test_validation_names_the_bad_value(key, value, message):
  config = cvt13.get_config()
  section, _, field = key.rpartition(".")
  (config[section] if section else config)[field] = value
  with pytest.raises(ValueError, match=message):
    trainer.validate_config(config)


def test_demo_config_validates_with_a_data_dir(tmp_path):
  config = demo.get_config()
  config.data.data_dir = str(tmp_path)
  trainer.validate_config(config)
  assert config.data.source == "array_record" and config.model.num_classes == 10


def test_train_py_rejects_unknown_override_before_any_work(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/cvt13.py", f"--workdir={tmp_path}",
       "--config.optim.lrr=1.0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip() == ("train.py: error: --config.optim.lrr: no such config field "
                                   "(Did you mean \"lr\" instead of \"lrr\"?)")
  assert not os.listdir(tmp_path)


def test_cvt21_at_224_follows_its_yaml_and_timm_elsewhere():
  yaml = cvt21.get_config()
  assert (yaml.data.interpolation, yaml.data.repeated_augmentation) == ("bilinear", 3)
  assert not yaml.augment.randaugment and yaml.augment.erasing_prob == 0.0
  assert (yaml.augment.mixup_alpha, yaml.augment.cutmix_alpha, yaml.augment.label_smoothing) == (0.8, 1.0, 0.1)
  for timm in (cvt21.get_config("res=384"), cvt21.get_config("aug=timm")):
    assert (timm.data.interpolation, timm.data.repeated_augmentation) == ("bicubic", 1)
    assert timm.augment.randaugment and timm.augment.erasing_prob == 0.25
  with pytest.raises(ValueError, match="aug='torchvision'"):
    cvt21.get_config("aug=torchvision")
