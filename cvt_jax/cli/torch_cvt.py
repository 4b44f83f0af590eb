"""CvT in plain PyTorch with microsoft/CvT's modules and parameter names, for `cvt-jax bench` on hosts that
have torch but not transformers (a bare GPU machine).

The same computation as the official `cls_cvt.py` (QuickGELU, the `dim ** -0.5` scale, the cls token
bypassing the convolutional projections, BatchNorm after the depthwise convs): it loads an official state
dict with `load_state_dict(strict=True)` and gives Hugging Face's port's logits (tests/test_bench.py).
Needs torch only.
"""

from __future__ import annotations

import torch
from torch import nn

from cvt_jax.model import StageSpec
from cvt_jax.model import get_variant


class QuickGELU(nn.Module):

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ConvProjection(nn.Module):
  """Depthwise 3x3 conv (no bias) + BatchNorm: the official 'dw_bn' `conv_proj_{q,k,v}`."""

  def __init__(self, dim: int, stride: int):
    super().__init__()
    self.conv = nn.Conv2d(dim, dim, 3, stride, 1, bias=False, groups=dim)
    self.bn = nn.BatchNorm2d(dim)

  def forward(self, grid: torch.Tensor) -> torch.Tensor:
    return self.bn(self.conv(grid)).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)


class Attention(nn.Module):

  def __init__(self, spec: StageSpec):
    super().__init__()
    self.heads, self.cls_token, self.scale = spec.heads, spec.cls_token, spec.dim**-0.5
    for name, stride in (("q", 1), ("k", 2), ("v", 2)):
      setattr(self, f"conv_proj_{name}", ConvProjection(spec.dim, stride))
      setattr(self, f"proj_{name}", nn.Linear(spec.dim, spec.dim))
    self.proj = nn.Linear(spec.dim, spec.dim)

  def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c = x.shape
    cls, tokens = (x[:, :1], x[:, 1:]) if self.cls_token else (None, x)
    grid = tokens.transpose(1, 2).reshape(b, c, h, w)

    def project(name: str) -> torch.Tensor:
      y = getattr(self, f"conv_proj_{name}")(grid)
      if cls is not None:
        y = torch.cat([cls, y], dim=1)
      return getattr(self, f"proj_{name}")(y).reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

    q, k, v = project("q"), project("k"), project("v")
    attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, -1, c))


class Mlp(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), QuickGELU(), nn.Linear(4 * dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """Pre-norm block; stochastic depth is left out (the bench times steps, not accuracy)."""

  def __init__(self, spec: StageSpec):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(spec.dim), Attention(spec)
    self.norm2, self.mlp = nn.LayerNorm(spec.dim), Mlp(spec.dim)

  def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x = x + self.attn(self.norm1(x), h, w)
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):

  def __init__(self, in_channels: int, spec: StageSpec):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, spec.dim, spec.patch_size, spec.patch_stride, spec.patch_padding)
    self.norm = nn.LayerNorm(spec.dim)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    x = self.proj(x)
    _, _, h, w = x.shape
    return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Stage(nn.Module):

  def __init__(self, in_channels: int, spec: StageSpec):
    super().__init__()
    self.patch_embed = PatchEmbed(in_channels, spec)
    if spec.cls_token:
      self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
    self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    tokens, h, w = self.patch_embed(x)
    cls = getattr(self, "cls_token", None)
    if cls is not None:
      tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    for block in self.blocks:
      tokens = block(tokens, h, w)
    if cls is not None:
      cls, tokens = tokens[:, 0], tokens[:, 1:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w), cls


class CvT(nn.Module):
  """NCHW images -> logits, parameters named as in microsoft/CvT (`stage0.blocks.0.attn.conv_proj_q.bn`)."""

  def __init__(self, variant: str, num_classes: int = 1000):
    super().__init__()
    specs = get_variant(variant).stages
    for i, spec in enumerate(specs):
      setattr(self, f"stage{i}", Stage(3 if i == 0 else specs[i - 1].dim, spec))
    self.norm = nn.LayerNorm(specs[-1].dim)
    self.head = nn.Linear(specs[-1].dim, num_classes)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = images
    for i in range(3):
      x, cls = getattr(self, f"stage{i}")(x)
    return self.head(self.norm(cls))
