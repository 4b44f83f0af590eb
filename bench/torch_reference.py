"""The PyTorch bar: Hugging Face `CvtForImageClassification` with the official QuickGELU, built offline.

Hugging Face's port uses exact GELU; with QuickGELU swapped in it computes the official model's numbers
(see /work/shared/cvt-spec.md), so it is the strongest maintained PyTorch CvT to race against.
PyTorch is a benchmark/test dependency only: nothing in the cvt_jax package imports this module.
"""

from __future__ import annotations

import torch
from transformers import CvtConfig, CvtForImageClassification

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
    if hasattr(module, "activation") and isinstance(module.activation, torch.nn.GELU):
      module.activation = QuickGELU()
  return model
