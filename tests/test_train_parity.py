"""One training step of cvt_jax equals the official CvT's (microsoft/CvT + timm, bench/torch_training.py).

The same tiny CvT (widths 16/32/48, 32 px, 10 classes) starts from the same weights in both: the PyTorch
model's official state dict, converted by `cvt_jax.weights`. Both take the same uint8 batches for a few
steps across an epoch boundary of the per-epoch schedule, on cvt_jax's sharded train step over the suite's
4 CPU devices (synchronised BatchNorm: one PyTorch process sees the same whole batch). Per step the loss,
the learning rate, every gradient, AdamW's moments, the parameters and the BatchNorm running statistics are
compared, each tensor within a bound relative to its own largest magnitude (fp32 rounding through a
different order of operations; the figures measured here on AVX-512 and with --xla_cpu_max_isa=AVX2 are
given with the bounds). Two recipes: 'crop' mixes nothing (smoothing 0.1: the official
LabelSmoothingCrossEntropy on the uint8 batch); 'full' augments on cvt_jax's device (RandAugment, erasing,
mixup/cutmix within each device's quarter) and feeds the official step those images and soft targets
(SoftTargetCrossEntropy), replayed from the step's rng. Mixup and cutmix themselves are compared apart, as
timm's Mixup replaying cvt_jax's draws; so are the schedule over the recipe's 300 epochs, the weight-decay
groups of CvT-13 and drop path. Most of the time is compiling the two 4-device steps.
"""

import os
import tempfile
import types
from typing import Any

import pytest

try:
  import torch
except ImportError as e:
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    raise ImportError("CI must run the training parity tests, but torch is missing: install the test extra "
                      "(./run.sh test does)") from e
  pytest.skip("training parity tests need torch (./run.sh test installs it)", allow_module_level=True)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import torch_models  # noqa: E402
from bench import torch_training  # noqa: E402
from cvt_jax import model as model_lib  # noqa: E402
from cvt_jax import parallel  # noqa: E402
from cvt_jax import torch_weights  # noqa: E402
from cvt_jax import trees  # noqa: E402
from cvt_jax import weights  # noqa: E402
from cvt_jax.configs import common, demo  # noqa: E402
from cvt_jax.data import augment  # noqa: E402
from cvt_jax.train import optim  # noqa: E402
from cvt_jax.train import trainer  # noqa: E402

NUM_CLASSES = 10
RES = 32
BATCH = 8  # 2 per device
STEPS_PER_EPOCH = 2
STEPS = 4  # epochs 0 (warm-up lr) and 1 (cosine)
DIMS, DEPTHS, HEADS = (16, 32, 48), (1, 1, 2), (1, 2, 3)
# Worst relative errors measured with AVX-512 (Xeon family 6 model 106) / --xla_cpu_max_isa=AVX2 and
# ATEN_CPU_CAPABILITY=avx2: loss 2.7e-7 / 3.7e-7; gradients and Adam moments 8.8e-6 / 3.2e-5 of their
# tensor's scale; parameters 2.3e-6 / 2.3e-6; BatchNorm statistics 1.0e-6 / 3.9e-6.
LOSS_RTOL = 2e-6
TENSOR_RTOL = 1e-4
PARAM_RTOL = 2e-5


@pytest.fixture(scope="module")
def timm(torchvision_transforms):  # pylint: disable=unused-argument
  """timm over the torchvision transforms of conftest.py (removed again after the module)."""
  try:
    module = torch_training.import_timm()
  except ImportError:
    pytest.fail(f"timm is missing at {torch_training.TIMM_DIR}: run ./run.sh test, which unpacks it "
                f"(pip install --no-deps --target ... timm=={torch_training.TIMM_VERSION})")
  yield module
  torch_training.forget_timm()


def parity_config():
  """configs/demo.py shrunk: mixing off, smoothing 0.1 (the official LabelSmoothingCrossEntropy path)."""
  config = demo.get_config(f"epochs=3,batch={BATCH},res={RES}")
  config.model.dims, config.model.depths, config.model.heads = DIMS, DEPTHS, HEADS
  config.model.num_classes = NUM_CLASSES
  config.schedule.per_step = False  # the official loop steps timm's scheduler once per epoch
  config.schedule.warmup_epochs = 1
  config.schedule.warmup_lr = 5e-4  # large enough that epoch 0's updates show
  config.optim.lr_batch_size = BATCH
  return config


def keep_gradients() -> optax.GradientTransformation:
  """Passes the updates on unchanged and keeps them in its state: the step's gradients, to compare."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


def as_variables(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """Tensors under official names (a state dict, or per-parameter gradients or moments with the buffers)
  in cvt_jax's layout, by the weight converter."""
  return torch_weights.convert_state_dict(tensors, heads=HEADS).variables


def run_both(recipe: str) -> list[dict[str, Any]]:
  """STEPS steps of both; per step (cvt_jax, official) loss and lr, and 'got' and 'want' trees of the
  gradients, Adam's moments ('mu', 'nu'), the parameters and the BatchNorm statistics.

  recipe 'crop': the official step takes the uint8 batch (LabelSmoothingCrossEntropy). 'full': cvt_jax's
  train step augments on the device (RandAugment, erasing, mixup/cutmix per device's quarter); the official
  step takes those images and soft targets, replayed from the step's rng (SoftTargetCrossEntropy).
  """
  config = parity_config()
  if recipe == "full":
    config.augment.update(augment.default_config())
  variant = model_lib.variant_from_config(config.model)
  torch_model = torch_models.CvT(variant, NUM_CLASSES)
  torch_models.randomize_(torch_model, seed=0)  # perturbed norms and running statistics
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "start.pth")
    torch.save(torch_model.state_dict(), path)
    start = weights.load(path, heads=HEADS)

  mesh = parallel.make_mesh()
  model = model_lib.from_config(config.model, NUM_CLASSES, "cpu")
  base_lr = optim.scaled_lr(config.optim.lr, config.optim.lr_batch_size, config.global_batch_size)
  schedule = optim.make_schedule(config.schedule, base_lr, config.num_epochs, STEPS_PER_EPOCH)
  tx = optax.chain(keep_gradients(), optim.make_optimizer(config.optim, schedule))
  state_sharding = parallel.state_shardings(trainer.abstract_train_state(model, tx, RES), mesh, False)
  state = trainer.create_train_state(jax.device_put(start.variables), tx, mesh)
  setup = trainer.Setup(model, base_lr, schedule, tx, state_sharding)  # tx also keeps each step's gradients
  base_rng = jax.random.key(0)
  train_step, _ = trainer.build_steps(config, setup, mesh, base_rng)

  official = torch_training.OfficialTrainer(
      torch_model, lr=base_lr, weight_decay=config.optim.weight_decay, epochs=config.num_epochs,
      warmup_epochs=config.schedule.warmup_epochs, warmup_lr=config.schedule.warmup_lr,
      min_lr=config.schedule.min_lr, num_classes=NUM_CLASSES, label_smoothing=config.augment.label_smoothing)
  params = dict(torch_model.named_parameters())
  rng = np.random.default_rng(0)
  results = []
  for step in range(STEPS):
    images = rng.integers(0, 256, (BATCH, RES, RES, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)
    if recipe == "full":
      aug_rng, _ = trainer.step_rngs(base_rng, step)
      augmented, targets = (torch.from_numpy(np.array(a)) for a in augment.train_augment(
          aug_rng, images, labels, NUM_CLASSES, config.augment, shards=mesh.size))
    state, metrics = train_step(state, parallel.global_batch({"image": images, "label": labels}, mesh))
    lr = official.lr
    if recipe == "full":
      loss = official.step_on_targets(augmented.permute(0, 3, 1, 2), targets)
    else:
      loss = official.step(torch_training.normalize(images), torch.from_numpy(labels).long())
    if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
      official.end_epoch(step // STEPS_PER_EPOCH)

    # Copies: the next step donates the state's buffers, and PyTorch updates its tensors in place.
    state_dict = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    buffers = {k: v for k, v in state_dict.items() if k not in params}
    per_param = lambda f: as_variables({k: f(p).numpy().copy() for k, p in params.items()} | buffers)["params"]
    adam = state.opt_state[1][0]
    results.append({
        "loss": (float(metrics["loss"]), loss),
        "lr": (float(metrics["lr"]), lr),
        "got": jax.tree.map(np.array, {"grads": state.opt_state[0], "mu": adam.mu, "nu": adam.nu,
                                       "params": state.params, "batch_stats": state.batch_stats}),
        "want": {"grads": per_param(lambda p: p.grad),
                 "mu": per_param(lambda p: official.optimizer.state[p]["exp_avg"]),
                 "nu": per_param(lambda p: official.optimizer.state[p]["exp_avg_sq"]),
                 **as_variables(state_dict)},
    })
  return results


@pytest.fixture(scope="module", params=["crop", "full"])
def steps(request, timm):  # pylint: disable=redefined-outer-name,unused-argument
  return run_both(request.param)


def test_loss_and_learning_rate_of_every_step_equal_the_official_ones(steps):
  assert [round(s["lr"][1], 9) for s in steps] == [5e-4, 5e-4, 1.5025e-3, 1.5025e-3]  # across the epoch boundary
  for step in steps:
    np.testing.assert_allclose(step["lr"][0], step["lr"][1], rtol=1e-6)
    np.testing.assert_allclose(step["loss"][0], step["loss"][1], rtol=LOSS_RTOL)


@pytest.mark.parametrize("quantity", ["grads", "mu", "nu", "batch_stats"])
def test_gradients_adam_moments_and_batchnorm_statistics_equal_the_official_ones(steps, quantity):
  for i, step in enumerate(steps):
    got, want = trees.flatten(step["got"][quantity]), trees.flatten(step["want"][quantity])
    assert got.keys() == want.keys()
    largest = max(np.abs(v).max() for v in want.values())
    for key, value in want.items():
      # A tensor whose values are all near zero (the keys' biases: softmax ignores a shift of every key, so
      # their gradients are rounding noise) is held to a share of the largest tensor's scale.
      scale = max(np.abs(value).max(), 1e-2 * largest)
      assert np.abs(got[key] - value).max() <= TENSOR_RTOL * scale, (i, quantity, key)


def test_updated_parameters_equal_the_official_ones(steps):
  lr_sum = 0.0
  noise = {}
  for i, step in enumerate(steps):
    lr_sum += step["lr"][1]
    grads = trees.flatten(step["want"]["grads"])
    largest = max(np.abs(v).max() for v in grads.values())
    for key, g in grads.items():
      # Adam scales a gradient to a step of about +-lr whatever its size: one at the rounding noise of the
      # largest gradient gets a step of either sign in either framework (the keys' biases, stray elements).
      noise[key] = noise.get(key, False) | (np.abs(g) <= 1e-6 * largest)
    got, want = trees.flatten(step["got"]["params"]), trees.flatten(step["want"]["params"])
    for key, value in want.items():
      error = np.abs(got[key] - value)
      assert error[~noise[key]].max(initial=0) <= PARAM_RTOL * np.abs(value).max(), (i, key)
      assert error[noise[key]].max(initial=0) <= 2 * lr_sum, (i, key)
  # Those are few: the keys' biases, the taps of the last stage's stride-2 convs that only see padding, the
  # last block's query projection (only the cls token reaches the head, and its query bypasses the conv).
  assert 0 < sum(n.sum() for n in noise.values()) < 0.03 * sum(n.size for n in noise.values())


def test_per_epoch_schedule_equals_timms_as_the_official_loop_steps_it(timm):  # pylint: disable=unused-argument
  """The recipe's 300 epochs (and a few past the end) at 3 steps per epoch against timm's scheduler."""
  config = common.get_config()
  sched = config.schedule
  base_lr, steps_per_epoch = 2e-3, 3
  schedule = jax.jit(jax.vmap(optim.make_schedule(sched, base_lr, config.num_epochs, steps_per_epoch)))
  got = np.asarray(schedule(jnp.arange((config.num_epochs + 5) * steps_per_epoch)))
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
  scheduler = torch_training.build_scheduler(optimizer, config.num_epochs, sched.warmup_epochs, sched.warmup_lr,
                                             sched.min_lr)
  want = []
  for epoch in range(config.num_epochs + 5):
    want += [optimizer.param_groups[0]["lr"]] * steps_per_epoch
    scheduler.step(epoch + 1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want[0] == sched.warmup_lr and want[-1] == sched.min_lr


def test_weight_decay_mask_equals_the_official_set_wd_groups():
  net = torch_models.CvT("cvt-13")
  decayed = {id(p) for p in torch_training.set_wd(net)[0]["params"]}
  flags = {name: np.full(p.shape, float(id(p) in decayed), np.float32) for name, p in net.named_parameters()}
  flags |= {name: np.zeros(b.shape, np.float32) for name, b in net.named_buffers()}
  official = torch_weights.convert_state_dict(flags).variables["params"]
  mask = optim.decay_mask(official)
  for key, value in trees.flatten(official).items():
    assert np.all(value == float(trees.flatten(mask)[key])), key
  counts = [sum(m == d for m in jax.tree.leaves(mask)) for d in (True, False)]
  assert counts == [121, 221]  # cvt-spec.md: 121 decayed tensors, 221 not


class _TwoBranches(nn.Module):
  """Calls one DropPath twice, as a Block does for its two residual branches."""

  @nn.compact
  def __call__(self, x: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
    drop_path = model_lib.DropPath()
    return drop_path(x, rate, True), drop_path(x, rate, True)


def test_drop_path_keeps_or_drops_whole_samples_at_timms_rate_and_scale(timm):
  rate, samples = 0.3, 4000
  x = np.ones((samples, 5, 4), np.float32)
  first, second = _TwoBranches().apply({}, x, rate, rngs={"drop_path": jax.random.key(0)})
  reference = timm.layers.drop_path(torch.from_numpy(x), rate, training=True).numpy()
  for out in (np.asarray(first), np.asarray(second), reference):
    per_sample = out.reshape(samples, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / (1 - rate)], rtol=1e-6)
    kept = np.mean(per_sample[:, 0] > 0)
    assert abs(kept - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / samples)  # 4 sigma
  assert np.any(np.asarray(first) != np.asarray(second))  # each branch draws its own mask


class _NumpyReplaying:
  """numpy, but with `random` replaying given draws: timm's Mixup and rand_bbox draw from np.random."""

  def __init__(self, rand: list[float], beta: float, randint: list[int]):
    rands, ints = iter(rand), iter(randint)
    self.random = types.SimpleNamespace(rand=lambda: next(rands), beta=lambda a, b: beta,
                                        randint=lambda low, high, size=None: next(ints))

  def __getattr__(self, name: str) -> Any:
    return getattr(np, name)


@pytest.mark.parametrize("cutmix", [False, True])
def test_mixup_and_cutmix_give_timms_images_and_targets_for_the_same_draws(timm, monkeypatch, cutmix):
  """cvt_jax's decision (lambda, mixup or cutmix, box), read off its output, replayed in timm's Mixup."""
  batch, size, classes, smoothing = 4, 12, 10, 0.1
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
  labels = np.arange(batch, dtype=np.int32)  # distinct: lambda is readable from the targets
  for seed in range(100):  # the first draw of the wanted kind whose box lies inside the image
    mixed, targets = (np.asarray(a) for a in augment.mixup_cutmix(
        jax.random.key(seed), images, labels, classes, 0.8, 1.0, 0.5, smoothing, 1))
    box = np.argwhere(np.all(mixed == images[::-1], axis=(0, 1)) & ~np.all(mixed == images, axis=(0, 1)))
    is_cutmix = np.all((mixed == images) | (mixed == images[::-1]))
    if is_cutmix == cutmix and (not cutmix or (box.min() > 0 and box.max() < size - 1)):
      break
  else:
    pytest.fail("no such draw in 100 seeds")
  off = smoothing / classes
  lam = (targets[0, labels[0]] - off) / (1 - smoothing)
  if cutmix:  # timm 0.3.2's box: centre +- cut // 2, cut = int(size * sqrt(1 - lambda))
    (top, left), (bottom, _) = box.min(0), box.max(0) + 1
    half = (bottom - top) // 2
    # An odd cut, where newer timm's box (to centre + (cut + 1) // 2) is a pixel larger than the official.
    draws = _NumpyReplaying([0.0, 0.0], 1 - ((2 * half + 1.5) / size) ** 2, [top + half, left + half])
  else:
    draws = _NumpyReplaying([0.0, 0.99], lam, [])
  monkeypatch.setattr(timm.data.mixup, "np", draws)
  mixup = torch_training.build_mixup(classes, 0.8, 1.0, 0.5, smoothing)
  want_images, want_targets = mixup(torch.from_numpy(images.copy()), torch.from_numpy(labels).long())
  np.testing.assert_allclose(mixed, want_images.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(targets, want_targets.numpy(), rtol=0, atol=1e-6)
