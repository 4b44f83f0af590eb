"""configs/finetune.py and the SGD switch: the paper's recipe, a new head, a new resolution, real training."""

import os

import finetuned_tiny
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cvt_jax import evaluate
from cvt_jax import trees
from cvt_jax import weights
from cvt_jax.configs import finetune
from cvt_jax.train import optim
from cvt_jax.train import trainer


def test_defaults_are_the_papers_recipe(tmp_path):
  init = tmp_path / "w.npz"
  init.write_bytes(b"")
  config = finetune.get_config(f"init={init},data={tmp_path},classes=37")
  assert (config.optim.name, config.optim.momentum, config.optim.weight_decay) == ("sgd", 0.9, 0.0)
  assert (config.global_batch_size, config.schedule.min_lr, config.model.num_classes) == (512, 0.0, 37)
  assert (config.data.source, config.data.data_dir, config.init_from) == ("folder", str(tmp_path), str(init))
  assert not config.augment.randaugment and config.augment.mixup_alpha == config.augment.cutmix_alpha == 0
  trainer.validate_config(config)

  adamw = finetune.get_config("opt=adamw,lr=1e-4,tfds=oxford_iiit_pet,classes=37,res=384")
  assert (adamw.optim.name, adamw.optim.lr, adamw.data.source, adamw.data.name, adamw.data.image_size) == (
      "adamw", 1e-4, "tfds", "oxford_iiit_pet", 384)


def test_missing_init_and_data_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="data.source='folder' needs data.data_dir"):
    trainer.validate_config(finetune.get_config("classes=5"))
  with pytest.raises(ValueError, match="init_from='/no/such.npz' does not exist"):
    trainer.validate_config(finetune.get_config(f"init=/no/such.npz,data={tmp_path},classes=5"))


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_one_epoch_from_a_checkpoint_takes_its_architecture(finetuned, tmp_path, scan_blocks):
  """`finetune:init=<an .npz of the demo's custom width>` needs no variant, dims, depths or heads, and a
  one-epoch run no `warmup=0`. With scanned blocks the run trains stacked variables, and its workdir loads
  as every checkpoint does (one module per block) and evaluates to the run's own figure."""
  config = finetune.get_config(f"init={finetuned.npz},data={finetuned.tree},classes=5,res=32,batch=64,"
                               "epochs=1")
  config.data.num_workers = 0
  config.model.scan_blocks = scan_blocks
  assert config.schedule.warmup_epochs == 0
  state, result = trainer.train_and_evaluate(config, str(tmp_path / "ft"))
  assert int(state.step) > 0 and result["count"] > 0
  assert ("blocks" in state.params["stages_2"]) == scan_blocks
  trained = weights.load(str(tmp_path / "ft"))
  assert trained.variant.architecture == weights.load(finetuned.npz).variant.architecture
  if scan_blocks:
    summary = evaluate.evaluate_checkpoint(config, str(tmp_path / "ft"))
    assert summary["count"] == result["count"]
    assert summary["top1"] == pytest.approx(result["top1"], abs=100 / result["count"])  # one image's rounding


def _optim_config(name: str, weight_decay: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name=name, momentum=0.9, weight_decay=weight_decay, b1=0.9, b2=0.999,
                                        eps=1e-8))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_is_torch_sgd_with_momentum_and_masked_decay(weight_decay):
  params = {"dense": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}}
  grads = [{"dense": {"kernel": jnp.array([0.3, 0.1]), "bias": jnp.array([-0.2])}},
           {"dense": {"kernel": jnp.array([-0.1, 0.4]), "bias": jnp.array([0.7])}}]
  tx = optim.make_optimizer(_optim_config("sgd", weight_decay), lambda step: 0.1)
  state, p = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  # torch.optim.SGD: d = g + wd * p (kernels only here), buf = 0.9 buf + d, p -= lr * buf.
  for name, decayed in (("kernel", True), ("bias", False)):
    expect, buf = np.asarray(params["dense"][name]), 0.0
    for g in grads:
      d = np.asarray(g["dense"][name]) + (weight_decay * expect if decayed else 0.0)
      buf = 0.9 * buf + d
      expect = expect - 0.1 * buf
    np.testing.assert_allclose(p["dense"][name], expect, rtol=1e-6)


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="optim.name='lamb'"):
    optim.make_optimizer(_optim_config("lamb", 0.0), lambda step: 0.1)


def test_finetune_from_a_converted_pytorch_checkpoint(finetuned):
  fixture = weights.load(finetuned_tiny.PTH_FIXTURE)
  assert fixture.num_classes == 10
  tuned = weights.load(finetuned.workdir)
  assert tuned.class_names == finetuned_tiny.CLASSES and tuned.image_size == finetuned_tiny.IMAGE_SIZE
  assert tuned.variables["params"]["head"]["kernel"].shape == (24, 5)  # the 10-class head was replaced
  # Training started from the fixture's weights: the body moved a little from them (0.07 measured),
  # while a fresh initialisation of the same model lies at 0.87 from them.
  moved = finetuned_tiny.relative_distance(trees.flatten(tuned.variables), trees.flatten(fixture.variables))
  assert moved < 0.3, moved
  # Every val image counted, and the 5-way classifier learnt something in two epochs (chance: 20 %).
  val_size = sum(len(os.listdir(os.path.join(finetuned.tree, "val", c))) for c in finetuned_tiny.CLASSES)
  assert finetuned.train_eval["count"] == val_size
  assert finetuned.train_eval["top1"] > 35.0


def test_finetune_at_a_new_resolution_needs_no_surgery(finetuned, tmp_path):
  # From the 32-px export to 48 px: the same variables fit, a train step runs, the workdir evaluates.
  config = finetuned_tiny.config(finetuned.tree, finetuned.npz, "epochs=1,warmup=0,batch=64,lr=0.01")
  config.data.image_size = 48
  trainer.train_and_evaluate(config, str(tmp_path / "ft48"), interrupt_at_step=1)
  config.data.image_size = 48
  summary = evaluate.evaluate_checkpoint(config, str(tmp_path / "ft48"))
  assert summary["image_size"] == 48 and summary["step"] == 1 and summary["count"] > 0


def test_headless_export_fine_tunes_with_a_fresh_head_even_for_the_same_class_count(finetuned, tmp_path):
  path = str(tmp_path / "backbone.npz")
  weights.save(weights.load(finetuned.workdir).without_head(), path)
  backbone = weights.load(path)
  assert backbone.num_classes == 0 and "head" not in backbone.variables["params"]
  assert not os.path.exists(tmp_path / "backbone.classes.txt")
  tuned = weights.load(finetuned.workdir)
  target = jax.tree.map(np.zeros_like, tuned.variables)  # stands for a fresh initialisation
  merged = weights.init_from(backbone, target, tuned.variant, 5, log=lambda _: None)
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], target["params"]["head"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["norm"]["scale"], tuned.variables["params"]["norm"]["scale"])
