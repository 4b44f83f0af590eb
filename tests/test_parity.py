"""Full-size parity with PyTorch: CvT-13, CvT-21 and CvT-W24 at 224 and 384, through the real converter.

Reference: transformers' CvtForImageClassification with QuickGELU (identical to microsoft/CvT), random
unit-gain weights and perturbed norms (bench/torch_models.py), eval mode, fp32. Its state dict
is saved to disk in one format per variant, converted by `cvt_jax.convert`, written to and reloaded from
the project's `.npz` format (`cvt_jax.weights`) and run by `cvt_jax.model`.
Needs torch + transformers (installed by `./run.sh test`); in CI (CI=true) their absence is a failure.
"""

import os
import time

import pytest

try:
  import safetensors.torch
  import torch
  import transformers  # noqa: F401 - only checked for: torch_models needs it
except ImportError as e:
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    raise ImportError(f"CI must run the parity tests, but {e.name!r} is missing: install "
                      "requirements-test.txt (./run.sh test does)") from e
  pytest.skip(f"parity tests need torch + transformers ({e.name!r} is missing; ./run.sh test installs them)",
              allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from bench import torch_models  # noqa: E402
from cvt_jax import torch_weights  # noqa: E402
from cvt_jax import weights  # noqa: E402
from cvt_jax.model import VARIANTS  # noqa: E402
from cvt_jax.model import make_variant  # noqa: E402

pytestmark = pytest.mark.slow

LOGIT_ATOL = 1e-5  # fp32, O(1) logits
# bf16 compute (params, norms, softmax and logits stay fp32) vs fp32, on logits of max |logit| ~3.5:
# measured max |Δ| 0.028 (CvT-13) and 0.041 (CvT-W24) on CPU; the bound leaves ~3.5x headroom.
BF16_LOGIT_ATOL = 0.15
BATCH = {224: 2, 384: 1}
NUM_CLASSES = 1000

# One on-disk format per variant, so every reader runs at full size.
FORMATS = {"cvt-13": "official .pth", "cvt-21": "HF pytorch_model.bin", "cvt-w24": "HF model.safetensors"}


class Pair:
  """The PyTorch reference and the converted cvt_jax model of one variant."""

  def __init__(self, name: str, tmp_dir: str):
    start = time.perf_counter()
    self.torch_model = torch_models.build_reference(name, NUM_CLASSES, seed=13)
    fmt = FORMATS[name]
    if fmt == "official .pth":
      state_dict = torch_models.official_state_dict(self.torch_model)
      path = os.path.join(tmp_dir, f"{name}.pth")
      torch.save(state_dict, path)
      self.num_keys = len(state_dict)
    elif fmt == "HF pytorch_model.bin":
      path = os.path.join(tmp_dir, "pytorch_model.bin")
      torch.save(self.torch_model.state_dict(), path)
    else:
      path = os.path.join(tmp_dir, "model.safetensors")
      safetensors.torch.save_file(self.torch_model.state_dict(), path)
    converted = torch_weights.convert_file(path)
    # Through the project's own format, as training/eval/predict will load it.
    npz = os.path.join(tmp_dir, f"{name}.npz")
    weights.save(weights.Checkpoint(*converted, source=path), npz)
    self.loaded = weights.load(npz)
    assert (self.loaded.variant, self.loaded.num_classes) == (converted.variant, converted.num_classes)
    os.remove(path)
    os.remove(npz)
    print(f"\n[{name}] built + saved ({fmt}) + converted + npz round trip in "
          f"{time.perf_counter() - start:.1f}s")
    self.forwards = {}

  def jax_outputs(self, images: np.ndarray, dtype=jnp.float32, kernels: str = "auto") -> dict[str, np.ndarray]:
    if (dtype, kernels) not in self.forwards:
      model = self.loaded.model(dtype=dtype, kernels=kernels)
      self.forwards[dtype, kernels] = jax.jit(
          lambda v, x: {"logits": model.apply(v, x), **model.apply(v, x, method="features")})
    out = self.forwards[dtype, kernels](self.loaded.variables, images)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


@pytest.fixture(scope="module", params=list(FORMATS))
def pair(request, tmp_path_factory) -> Pair:
  return Pair(request.param, str(tmp_path_factory.mktemp(request.param)))


def images_for(res: int) -> np.ndarray:
  return np.random.default_rng(res).standard_normal((BATCH[res], res, res, 3), dtype=np.float32)


def test_converter_recognises_the_variant(pair):
  name = pair.loaded.variant.name
  assert pair.loaded.variant is VARIANTS[name]
  assert pair.loaded.num_classes == NUM_CLASSES
  assert pair.loaded.num_params == sum(p.numel() for p in pair.torch_model.parameters())
  if name == "cvt-13":
    buffers = dict(pair.torch_model.named_buffers())
    assert (pair.num_keys, len(list(pair.torch_model.parameters())), len(buffers)) == (459, 342, 117)


@pytest.mark.parametrize("res", [224, 384])
def test_fp32_parity(pair, res):
  check_parity(pair, res, "auto")


# What TPUs run (the fused Pallas attention), in Pallas's TPU interpret mode on this CPU.
@pytest.mark.parametrize("pair", ["cvt-13"], indirect=True)
def test_fp32_parity_of_the_tpu_kernels(pair):
  with pltpu.force_tpu_interpret_mode():
    check_parity(pair, 224, "tpu")


def check_parity(pair: Pair, res: int, kernels: str) -> None:
  images = images_for(res)
  start = time.perf_counter()
  want = torch_models.reference_outputs(pair.torch_model, images)
  t_torch = time.perf_counter() - start
  got = pair.jax_outputs(images, kernels=kernels)
  t_jax = time.perf_counter() - start - t_torch
  logit_delta = np.abs(got["logits"] - want["logits"]).max()
  stage_delta = {k: float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max())
                 for k in ("stage0", "stage1", "stage2", "cls")}
  print(f"\n[{pair.loaded.variant.name} @{res}, kernels {kernels}] max|Δlogit| {logit_delta:.2e} (|logit| max "
        f"{np.abs(want['logits']).max():.2f}); stage max|Δ|/max|ref| "
        + ", ".join(f"{k} {v:.1e}" for k, v in stage_delta.items())
        + f"; torch {t_torch:.1f}s, jax (incl. compile) {t_jax:.1f}s")
  assert np.abs(want["logits"]).max() > 0.5  # O(1) logits: the bound below is meaningful
  assert logit_delta <= LOGIT_ATOL
  for k, delta in stage_delta.items():
    assert got[k].shape == want[k].shape, k
    assert delta <= 1e-5, k
  assert (got["logits"].argmax(-1) == want["logits"].argmax(-1)).all()


# bf16 on the smallest and the widest/deepest variant only: XLA:CPU bf16 is slow to compile and run.
@pytest.mark.parametrize("pair", ["cvt-13", "cvt-w24"], indirect=True)
def test_bf16_logits_close_to_fp32(pair):
  images = images_for(224)
  fp32 = pair.jax_outputs(images)["logits"]
  bf16 = pair.jax_outputs(images, jnp.bfloat16)["logits"]
  delta = np.abs(bf16 - fp32).max()
  print(f"\n[{pair.loaded.variant.name} @224] bf16 vs fp32 max|Δlogit| {delta:.3f} "
        f"(|logit| max {np.abs(fp32).max():.2f}, tolerance {BF16_LOGIT_ATOL})")
  assert np.isfinite(bf16).all()
  assert delta <= BF16_LOGIT_ATOL


def test_torch_reference_is_cvt13_with_quickgelu():
  net = torch_models.build_torch_cvt("cvt-13")
  assert sum(p.numel() for p in net.parameters()) == 19_997_480
  activations = [m.activation for m in net.modules() if hasattr(m, "activation")]
  assert len(activations) == 13 and all(isinstance(a, torch_models.QuickGELU) for a in activations)
  x = torch.linspace(-3, 3, 7)
  torch.testing.assert_close(activations[0](x), x * torch.sigmoid(1.702 * x))


def test_the_plain_torch_port_loads_official_weights_and_gives_hugging_faces_logits():
  """The bench's PyTorch contender without transformers: official names, the same numbers."""
  variant = make_variant("tiny", (16, 32, 48), (1, 2, 3), (1, 2, 3), 0.0)  # HF needs depth > stage
  reference = torch_models.build_reference(variant, 10, seed=3)
  port = torch_models.CvT(variant, 10).eval()
  port.load_state_dict(torch_models.official_state_dict(reference), strict=True)
  images = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    torch.testing.assert_close(port(images), reference(images).logits, atol=1e-5, rtol=0)
