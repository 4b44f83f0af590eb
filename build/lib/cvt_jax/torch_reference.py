"""The PyTorch reference: Hugging Face `CvtForImageClassification` with the official QuickGELU, built offline.

Hugging Face's port uses exact GELU; with QuickGELU swapped in it computes the official model's numbers, so
it is the reference of the parity tests (`tests/test_parity.py`, `tests/fixtures/make_fixtures.py`) and the
strongest maintained PyTorch CvT to race against (`cvt-jax bench`). Its random init leaves every norm at the
identity, which would let a wrong LayerNorm/BatchNorm mapping pass unnoticed: `build_reference` perturbs
them. Needs torch and transformers (the `test` extra); nothing else in the package imports this module.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import CvtConfig, CvtForImageClassification
from transformers.models.cvt import modeling_cvt

from cvt_jax.model import Variant, get_variant


class QuickGELU(torch.nn.Module):
  """x * sigmoid(1.702 x), the activation of the official CvT."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def torch_config(variant: str | Variant, num_classes: int = 1000) -> CvtConfig:
  """A `CvtConfig` with the architecture of a cvt_jax variant (eps 1e-5 like the official LayerNorms)."""
  stages = get_variant(variant).stages
  return CvtConfig(
      num_labels=num_classes,
      embed_dim=[s.dim for s in stages], depth=[s.depth for s in stages], num_heads=[s.heads for s in stages],
      patch_sizes=[s.patch_size for s in stages], patch_stride=[s.patch_stride for s in stages],
      patch_padding=[s.patch_padding for s in stages], cls_token=[s.cls_token for s in stages],
      drop_path_rate=[s.drop_path_rate for s in stages], layer_norm_eps=1e-5)


def build_torch_cvt(variant: str | Variant, num_classes: int = 1000) -> CvtForImageClassification:
  """Randomly initialised HF CvT of `variant` with every MLP activation replaced by QuickGELU."""
  model = CvtForImageClassification(torch_config(variant, num_classes))
  for module in model.modules():
    if isinstance(module, modeling_cvt.CvtIntermediate):
      module.activation = QuickGELU()
  return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
  """Unit-gain random weights (so every block moves the residual stream) and perturbed norms.

  Linear/conv weights N(0, 1/fan_in), biases N(0, 0.1^2); LayerNorm/BatchNorm weight 1 + N(0, 0.25^2),
  bias N(0, 0.25^2); BatchNorm running mean N(0, 0.25^2), running var U(0.5, 2); cls token N(0, 1).
  The head gets the same unit gain, so logits are O(1).
  """
  g = torch.Generator().manual_seed(seed)

  def normal_(t: torch.Tensor, mean: float, std: float) -> None:
    t.copy_(mean + std * torch.randn(t.shape, generator=g))

  for module in model.modules():
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
      normal_(module.weight, 0.0, module.weight[0].numel() ** -0.5)
      if module.bias is not None:
        normal_(module.bias, 0.0, 0.1)
    elif isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
      normal_(module.weight, 1.0, 0.25)
      normal_(module.bias, 0.0, 0.25)
      if isinstance(module, torch.nn.BatchNorm2d):
        normal_(module.running_mean, 0.0, 0.25)
        module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=g))
        module.num_batches_tracked.fill_(1234)
    elif isinstance(module, modeling_cvt.CvtStage) and hasattr(module, "cls_token"):
      normal_(module.cls_token, 0.0, 1.0)


def build_reference(variant: str | Variant, num_classes: int, seed: int = 0) -> CvtForImageClassification:
  """An eval-mode HF CvT of `variant` with QuickGELU, random unit-gain weights and perturbed norms (the
  parity tests' reference: a wrong weight or norm mapping cannot hide behind identity norms)."""
  model = build_torch_cvt(variant, num_classes)
  randomize_(model, seed)
  return model.eval()


def hf_to_official_name(key: str) -> str:
  """A Hugging Face state-dict key -> the microsoft/CvT key (written from the spec's key list)."""
  key = re.sub(r"^(cvt\.)?encoder\.stages\.(\d+)\.", r"stage\2.", key)
  key = key.replace("embedding.convolution_embeddings.projection.", "patch_embed.proj.")
  key = key.replace("embedding.convolution_embeddings.normalization.", "patch_embed.norm.")
  key = key.replace(".layers.", ".blocks.")
  for long, short in (("query", "q"), ("key", "k"), ("value", "v")):
    conv = f"attention.attention.convolution_projection_{long}.convolution_projection."
    key = key.replace(conv + "convolution.", f"attn.conv_proj_{short}.conv.")
    key = key.replace(conv + "normalization.", f"attn.conv_proj_{short}.bn.")
    key = key.replace(f"attention.attention.projection_{long}.", f"attn.proj_{short}.")
  key = key.replace("attention.output.dense.", "attn.proj.")
  key = key.replace("intermediate.dense.", "mlp.fc1.")
  key = key.replace("output.dense.", "mlp.fc2.")
  key = key.replace("layernorm_before.", "norm1.").replace("layernorm_after.", "norm2.")
  key = re.sub(r"^layernorm\.", "norm.", key)
  return re.sub(r"^classifier\.", "head.", key)


def official_key_names(depths, head: bool) -> set[str]:
  """Every key of an official state dict, from the spec's key list."""
  names = {"norm.weight", "norm.bias", "stage2.cls_token"} | ({"head.weight", "head.bias"} if head else set())
  for s, depth in enumerate(depths):
    names |= {f"stage{s}.patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
    for b in range(depth):
      block = f"stage{s}.blocks.{b}"
      names |= {f"{block}.{m}.{p}" for m in ("norm1", "norm2", "attn.proj_q", "attn.proj_k", "attn.proj_v",
                                               "attn.proj", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
      for x in "qkv":
        names.add(f"{block}.attn.conv_proj_{x}.conv.weight")
        names |= {f"{block}.attn.conv_proj_{x}.bn.{p}"
                  for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
  return names


def official_state_dict(model: CvtForImageClassification) -> dict[str, torch.Tensor]:
  """The model's tensors under microsoft/CvT names; checks the names against the spec's full list."""
  renamed = {hf_to_official_name(k): v for k, v in model.state_dict().items()}
  expected = official_key_names(model.config.depth, head=model.config.num_labels > 0)
  if renamed.keys() != expected:
    raise AssertionError(f"rename is off: extra {sorted(renamed.keys() - expected)[:5]}, "
                         f"missing {sorted(expected - renamed.keys())[:5]}")
  return renamed


@torch.no_grad()
def reference_outputs(model: CvtForImageClassification, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  """logits, stage0..2 (NHWC grids) and the un-normed cls token, float32 numpy."""
  pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  out = model.cvt(pixels, output_hidden_states=True)
  # The head exactly as CvtForImageClassification applies it (a mean over the single cls token).
  logits = model.classifier(model.layernorm(out.cls_token_value).mean(dim=1))
  outputs = {"logits": logits, "cls": out.cls_token_value[:, 0]}
  outputs |= {f"stage{i}": grid.permute(0, 2, 3, 1) for i, grid in enumerate(out.hidden_states)}
  return {k: v.contiguous().numpy().astype(np.float32) for k, v in outputs.items()}
