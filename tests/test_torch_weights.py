"""PyTorch -> Flax conversion (cvt_jax.torch_weights, cvt_jax.pth) against the committed fixtures, torch-free.

The fixtures (tests/fixtures/make_fixtures.py) are a narrow transformers CvT with QuickGELU, random weights
and perturbed norms, saved by PyTorch in every supported format, with its outputs on a fixed batch.
"""

import os

import jax
import numpy as np
import pytest

from cvt_jax import pth
from cvt_jax import torch_weights
from cvt_jax import trees
from cvt_jax.model import VARIANTS

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny")
OFFICIAL = os.path.join(TINY, "official.pth")
HF_BIN = os.path.join(TINY, "hf", "pytorch_model.bin")
HF_SAFETENSORS = os.path.join(TINY, "hf", "model.safetensors")
TINY_HEADS = (1, 2, 3)  # the widths 8/16/24 are not multiples of 64: heads must be given for the .pth


@pytest.fixture(scope="module")
def converted() -> torch_weights.Converted:
  return torch_weights.convert_file(OFFICIAL, heads=TINY_HEADS)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
  with np.load(os.path.join(TINY, "reference.npz")) as f:
    return dict(f)


def official_state_dict() -> dict[str, np.ndarray]:
  return pth.load_state_dict(OFFICIAL)


def assert_same_variables(a: dict, b: dict) -> None:
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_every_format_gives_the_same_variables(converted):
  assert converted.variant.name == "custom"
  assert converted.variant.architecture == ((8, 16, 24), (1, 2, 3), TINY_HEADS)
  assert converted.num_classes == 10
  for path in (HF_BIN, HF_SAFETENSORS):  # heads come from the config.json beside them
    other = torch_weights.convert_file(path)
    assert (other.variant, other.num_classes) == (converted.variant, converted.num_classes)
    assert_same_variables(other.variables, converted.variables)


def test_converted_model_matches_pytorch(converted, reference):
  from cvt_jax.model import CvT
  model = CvT.from_variant(converted.variant, num_classes=converted.num_classes)
  forward = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="features")))
  logits, features = forward(converted.variables, reference["images"])
  assert np.abs(reference["logits"]).max() > 0.5  # perturbed weights give O(1) logits, not ~0
  np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-5)
  for name in ("stage0", "stage1", "stage2", "cls"):
    assert features[name].shape == reference[name].shape, name
    np.testing.assert_allclose(features[name], reference[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_layout_conversions(converted):
  sd = official_state_dict()
  np.testing.assert_array_equal(  # conv OIHW -> HWIO
      converted.variables["params"]["stages_1"]["patch_embed"]["proj"]["kernel"],
      sd["stage1.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  dw = converted.variables["params"]["stages_2"]["blocks_2"]["attn"]["conv_proj_k"]["conv"]["kernel"]
  assert dw.shape == (3, 3, 1, 24)  # depthwise (C,1,3,3) -> (3,3,1,C)
  np.testing.assert_array_equal(dw[1, 2, 0], sd["stage2.blocks.2.attn.conv_proj_k.conv.weight"][:, 0, 1, 2])
  np.testing.assert_array_equal(  # Linear (out, in) -> (in, out)
      converted.variables["params"]["stages_2"]["blocks_1"]["mlp"]["fc1"]["kernel"],
      sd["stage2.blocks.1.mlp.fc1.weight"].T)
  bn = converted.variables["batch_stats"]["stages_1"]["blocks_1"]["attn"]["conv_proj_v"]["bn"]
  np.testing.assert_array_equal(bn["var"], sd["stage1.blocks.1.attn.conv_proj_v.bn.running_var"])
  np.testing.assert_array_equal(bn["mean"], sd["stage1.blocks.1.attn.conv_proj_v.bn.running_mean"])
  assert not np.allclose(bn["var"], 1.0)  # the fixture's BN statistics are perturbed


def test_hf_keys_with_and_without_prefix_and_without_head(converted):
  hf = torch_weights.read_state_dict(HF_SAFETENSORS)
  assert all(k.startswith(("cvt.", "layernorm.", "classifier.")) for k in hf)
  bare = {k.removeprefix("cvt."): v for k, v in hf.items()}
  assert_same_variables(torch_weights.convert_state_dict(bare, TINY_HEADS).variables, converted.variables)
  headless = torch_weights.convert_state_dict(
      {k: v for k, v in bare.items() if not k.startswith("classifier.")}, TINY_HEADS)
  assert headless.num_classes == 0 and "head" not in headless.variables["params"]
  with pytest.raises(torch_weights.ConversionError, match="used more than once"):
    torch_weights.convert_state_dict({**hf, "encoder.stages.2.cls_token": hf["cvt.encoder.stages.2.cls_token"]},
                               TINY_HEADS)


def synthetic_official(dims, depths, classes) -> dict[str, np.ndarray]:
  """Zero tensors with the key names and shapes of an official state dict (the spec's key list)."""
  z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
  sd = {"norm.weight": z(dims[2]), "norm.bias": z(dims[2]), "stage2.cls_token": z(1, 1, dims[2]),
        "head.weight": z(classes, dims[2]), "head.bias": z(classes)}
  for s, (c, depth) in enumerate(zip(dims, depths)):
    k, c_in = (7, 3) if s == 0 else (3, dims[s - 1])
    sd |= {f"stage{s}.patch_embed.proj.weight": z(c, c_in, k, k), f"stage{s}.patch_embed.proj.bias": z(c),
           f"stage{s}.patch_embed.norm.weight": z(c), f"stage{s}.patch_embed.norm.bias": z(c)}
    for b in range(depth):
      p = f"stage{s}.blocks.{b}."
      sd |= {p + f"{n}.{w}": z(c) for n in ("norm1", "norm2") for w in ("weight", "bias")}
      for x in "qkv":
        sd[p + f"attn.conv_proj_{x}.conv.weight"] = z(c, 1, 3, 3)
        sd |= {p + f"attn.conv_proj_{x}.bn.{w}": z(c)
               for w in ("weight", "bias", "running_mean", "running_var")}
        sd[p + f"attn.conv_proj_{x}.bn.num_batches_tracked"] = np.array(0, np.int64)
      for n in ("proj_q", "proj_k", "proj_v", "proj"):
        sd |= {p + f"attn.{n}.weight": z(c, c), p + f"attn.{n}.bias": z(c)}
      sd |= {p + "mlp.fc1.weight": z(4 * c, c), p + "mlp.fc1.bias": z(4 * c),
             p + "mlp.fc2.weight": z(c, 4 * c), p + "mlp.fc2.bias": z(c)}
  return sd


@pytest.mark.parametrize("name,params", [("cvt-13", 19_997_480), ("cvt-21", 31_622_696)])
def test_detects_named_variants(name, params):
  dims, depths = (64, 192, 384), VARIANTS[name].stages
  sd = synthetic_official(dims, tuple(s.depth for s in depths), 1000)
  if name == "cvt-13":
    assert len(sd) == 459  # 342 params + 117 buffers, like CvT-13-224x224-IN-1k.pth
  loaded = torch_weights.convert_state_dict(sd)
  assert loaded.variant is VARIANTS[name]
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.variables["params"]))
  assert (loaded.num_classes, count) == (1000, params)


def test_not_a_cvt_checkpoint():
  path = os.path.join(FIXTURES, "pth_cases.pth")
  with pytest.raises(torch_weights.ConversionError, match=f"{path}: cannot detect the architecture: no stage0"):
    torch_weights.convert_file(path)


def test_heads_are_required_for_odd_widths():
  with pytest.raises(torch_weights.ConversionError, match="--heads"):
    torch_weights.convert_file(OFFICIAL)
  with pytest.raises(torch_weights.ConversionError, match="must be 3 positive numbers dividing"):
    torch_weights.convert_file(OFFICIAL, heads=(1, 3, 3))


@pytest.mark.parametrize("edit,expect", [
    (lambda sd: sd.pop("stage2.blocks.1.attn.conv_proj_k.bn.running_var"),
     "1 missing (batch_stats/stages_2/blocks_1/attn/conv_proj_k/bn/var (24,))"),
    (lambda sd: sd.update({"stage1.blocks.0.attn.extra.weight": np.zeros((2, 2), np.float32)}),
     "1 unused (stage1.blocks.0.attn.extra.weight (2, 2))"),
    (lambda sd: sd.update({"stage2.blocks.0.mlp.fc1.weight": np.zeros((96, 23), np.float32)}),
     "1 mis-shaped (params/stages_2/blocks_0/mlp/fc1/kernel (23, 96) instead of (24, 96))"),
    (lambda sd: sd.update({"stage3.patch_embed.proj.weight": np.zeros((32, 24, 3, 3), np.float32),
                           "stage0.blocks.0.mlp.fc2.bias": np.zeros(7, np.float32),
                           "stage1.blocks.1.attn.proj.bias": sd.pop("stage1.blocks.1.attn.proj_q.bias")}),
     "1 missing (params/stages_1/blocks_1/attn/proj_q/bias (16,)); 1 unused (stage3.patch_embed.proj.weight "
     "(32, 24, 3, 3)); 1 mis-shaped (params/stages_0/blocks_0/mlp/fc2/bias (7,) instead of (8,))"),
], ids=["missing", "extra", "misshaped", "several"])
def test_strict_mapping_names_every_problem_in_one_line(edit, expect):
  sd = official_state_dict()
  edit(sd)
  with pytest.raises(torch_weights.ConversionError) as err:
    torch_weights.convert_state_dict(sd, TINY_HEADS, source="fixture")
  message = str(err.value)
  assert message.startswith("fixture does not map one-to-one onto custom (dims (8, 16, 24)")
  assert message.endswith(expect) and "\n" not in message


def test_pth_reader_views_dtypes_wrapper():
  got = pth.load_state_dict(os.path.join(FIXTURES, "pth_cases.pth"))  # {'epoch', 'state_dict': {module.*}}
  with np.load(os.path.join(FIXTURES, "pth_cases_expected.npz")) as f:
    expected = dict(f)
  assert got.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(got[k].astype(expected[k].dtype), expected[k], err_msg=k)
    assert got[k].flags.c_contiguous
  assert got["half"].dtype == np.float16 and got["bfloat16"].dtype == np.float32
  assert got["count"].dtype == np.int64 and got["count"].shape == ()


