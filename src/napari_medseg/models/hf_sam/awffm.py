"""AWFFM: HF-SAM's adaptive weighted feature-fusion module (CBAM attention on two paths).

Inputs are the high-level SAM feature ``l`` and the low-level (early, compressed) feature ``h``,
both (B, C, H, W). As in the released code (``CIF_block``):

    c  = conv1x1(concat[l, h])                      2C → C, with bias
    l' = l ⊙ σ(conv3x3(concat[mean_c(c), max_c(c)])) CBAM spatial attention gates the high path
    g  = σ(MLP(avgpool(l')) + MLP(maxpool(l')))       CBAM channel attention (shared MLP, C → C/8 → C)
    out = l' + h ⊙ g

Ours adds one scalar gate α, initialised to 0, and returns ``l + α·(out − l)``: at α = 0 the
module is exactly the identity on ``l``, so an untrained HF-SAM reproduces its base SAM bit for
bit; training opens the gate (the gradient of α is ``out − l``, non-zero from the first step).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """CBAM channel attention: (B, C, H, W) → (B, C, 1, 1) weights in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        mx = self.mlp(x.amax((2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: (B, C, H, W) → (B, 1, H, W) weights; 3x3 kernel as in HF-SAM."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return torch.sigmoid(self.conv(pooled))


class AWFFM(nn.Module):
    """Gated AWFFM fusion of a high-level and a low-level map of equal shape.

    Args:
        channels: C of both inputs (256 in SAM's decoder).
        reduction: Channel-attention bottleneck ratio (8 in HF-SAM).
    """

    def __init__(self, channels: int = 256, reduction: int = 8) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(2 * channels, channels, 1)
        self.spatial = SpatialAttention(3)
        self.channel = ChannelAttention(channels, reduction)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Fuse ``low`` into ``high`` (both (B, C, H, W)); identity while the gate is 0."""
        if not self.training and not bool(self.gate.detach().any()):
            return high  # closed gate: skip the work (and keep the base model's exact numerics)
        if low.shape[0] != high.shape[0]:
            low = low.expand(high.shape[0], -1, -1, -1)
        c = self.reduce(torch.cat([high, low], 1))
        high2 = high * self.spatial(c)
        fused = high2 + low * self.channel(high2)
        return high + self.gate * (fused - high)
