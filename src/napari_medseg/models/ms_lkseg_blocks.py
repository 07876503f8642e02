"""Building blocks of MS-LKSeg (Li et al., BSPC 2025), reconstructed from the paper's figures.

* :class:`DynamicConv2d` — dynamic convolution over ``K`` kernels (Chen et al., CVPR 2020,
  "Dynamic Convolution: Attention over Convolution Kernels"; ``routing="sigmoid"`` gives
  CondConv's routing, Yang et al., NeurIPS 2019).
* :class:`MIE` — multi-semantic information extraction (the SMSA half of SCSA, Si et al. 2024).
* :class:`MIDM` — the progressive channel self-attention half of SCSA (PCSA).
* :class:`MISBlock` — DyConv → BN → ReLU → MIE → MIDM.
* :class:`ReparamDWConv` and :class:`LDBlock` — RepLKNet-style (Ding et al., CVPR 2022)
  re-parameterisable large-kernel depthwise block used on the skip connections.

Pure torch; every tensor is (B, C, H, W) float unless stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a convolution into the conv's weight and bias.

    Args:
        weight: (C_out, C_in/groups, kh, kw) conv weight.
        bias: (C_out,) conv bias or ``None``.
        bn: The BatchNorm over the conv's C_out channels (its running statistics are used).

    Returns:
        (weight, bias) of one conv equal to ``bn(conv(x))`` in eval mode.
    """
    assert bn.running_var is not None and bn.running_mean is not None
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = bias if bias is not None else torch.zeros_like(std)
    return weight * scale.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * scale


def _conv_from(weight: torch.Tensor, bias: torch.Tensor, like: nn.Conv2d) -> nn.Conv2d:
    """A conv with ``like``'s geometry holding the given (detached) weight and bias."""
    conv = nn.Conv2d(
        like.in_channels,
        like.out_channels,
        like.kernel_size,  # type: ignore[arg-type]
        stride=like.stride,  # type: ignore[arg-type]
        padding=like.padding,  # type: ignore[arg-type]
        dilation=like.dilation,  # type: ignore[arg-type]
        groups=like.groups,
        bias=True,
    ).to(weight.device, weight.dtype)
    conv.weight.data.copy_(weight.detach())
    assert conv.bias is not None
    conv.bias.data.copy_(bias.detach())
    return conv


class ConvBN(nn.Module):
    """Conv2d without bias followed by BatchNorm; :meth:`fuse` folds the BN into the conv."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, padding: int | None = None) -> None:
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fused_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the equivalent single conv (eval-mode statistics)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            return fold_bn(self.conv.weight, self.conv.bias, self.bn)
        assert self.conv.bias is not None
        return self.conv.weight, self.conv.bias

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace conv + BN by one conv with bias (inference only; idempotent)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            w, b = self.fused_params()
            self.conv = _conv_from(w, b, self.conv)
            self.bn = nn.Identity()


class DynamicConv2d(nn.Module):
    """Dynamic convolution: a per-sample mixture of ``num_kernels`` kernels.

    ``routing="softmax"`` follows Dynamic Convolution (Chen et al. 2020): attention
    π(x) = softmax(FC(ReLU(FC(GAP(x)))) / τ), kernel = Σ_k π_k W_k. ``routing="sigmoid"`` uses
    CondConv's independent sigmoid routing weights instead. No bias: a BatchNorm follows.

    Args:
        cin: Input channels.
        cout: Output channels.
        kernel: Odd kernel size (same padding).
        num_kernels: Number of expert kernels K.
        temperature: Softmax temperature τ (softmax routing only).
        routing: ``"softmax"`` or ``"sigmoid"``.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        num_kernels: int = 4,
        temperature: float = 4.0,
        routing: str = "softmax",
    ) -> None:
        super().__init__()
        if routing not in ("softmax", "sigmoid"):
            raise ValueError(f"routing must be softmax or sigmoid, got {routing!r}")
        self.cin, self.cout, self.kernel = cin, cout, kernel
        self.num_kernels, self.temperature, self.routing = num_kernels, temperature, routing
        hidden = max(4, cin // 4)
        self.attention = nn.Sequential(
            nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_kernels)
        )
        self.weight = nn.Parameter(torch.empty(num_kernels, cout, cin, kernel, kernel))
        for k in range(num_kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, K) mixing weights of the expert kernels."""
        z = self.attention(x.mean((2, 3)))
        if self.routing == "softmax":
            return torch.softmax(z / self.temperature, dim=1)
        return torch.sigmoid(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        alpha = self.routing_weights(x)
        kernels = (alpha @ self.weight.flatten(1)).reshape(b * self.cout, self.cin, self.kernel, self.kernel)
        # One grouped conv runs every sample with its own kernel (groups = batch).
        out = F.conv2d(x.reshape(1, b * self.cin, h, w), kernels, padding=self.kernel // 2, groups=b)
        return out.reshape(b, self.cout, h, w)


class MIE(nn.Module):
    """Multi-semantic information extraction (SCSA's shared multi-semantic spatial attention).

    The H and W profiles (means over W and over H) are split into ``len(kernels)`` channel
    groups; group i goes through a depthwise 1-D conv (with bias) of kernel ``kernels[i]``, the
    same conv for the H and the W profile. Each profile is then GroupNorm-ed (one GN per
    direction, ``len(kernels)`` groups) and squashed by a sigmoid into gates A_H (B, C, H, 1)
    and A_W (B, C, 1, W); the output is x · A_H · A_W.

    Args:
        channels: C; must be divisible by ``len(kernels)``.
        kernels: Odd 1-D kernel sizes, one per channel group (SCSA: 3, 5, 7, 9).
    """

    def __init__(self, channels: int, kernels: Sequence[int] = (3, 5, 7, 9)) -> None:
        super().__init__()
        groups = len(kernels)
        if channels % groups:
            raise ValueError(f"MIE needs channels ({channels}) divisible by {groups} groups")
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"MIE kernels must be odd, got {tuple(kernels)}")
        self.kernels = tuple(int(k) for k in kernels)
        split = channels // groups
        # One weight per group at its own size; they are zero-padded to the largest size and
        # run as a single depthwise conv (the same result as four separate convs).
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(split, 1, k).uniform_(-(k**-0.5), k**-0.5)) for k in kernels
        )
        self.bias = nn.Parameter(torch.zeros(channels))
        self.norm_h = nn.GroupNorm(groups, channels)
        self.norm_w = nn.GroupNorm(groups, channels)

    def _kernel(self) -> torch.Tensor:
        kmax = max(self.kernels)
        padded = [F.pad(w, [(kmax - w.shape[-1]) // 2] * 2) for w in self.weights]
        return torch.cat(padded, 0).unsqueeze(2)  # (C, 1, 1, kmax)

    def _profile(self, p: torch.Tensor, kernel: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        # conv2d on (B, C, 1, L): torch's oneDNN conv1d path is ~300x slower for these shapes.
        y = F.conv2d(p.unsqueeze(2), kernel, self.bias, padding=(0, kernel.shape[-1] // 2), groups=p.shape[1])
        return torch.sigmoid(norm(y.squeeze(2)))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial gates in (0, 1): A_H (B, C, H, 1) and A_W (B, C, 1, W)."""
        kernel = self._kernel()
        a_h = self._profile(x.mean(3), kernel, self.norm_h).unsqueeze(3)
        a_w = self._profile(x.mean(2), kernel, self.norm_w).unsqueeze(2)
        return a_h, a_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        return x * a_h * a_w


class MIDM(nn.Module):
    """SCSA's progressive channel self-attention used as MS-LKSeg's MIDM.

    x is average-pooled with a ``window``×``window`` window (stride = window), GroupNorm-ed
    (one group), mapped to Q, K, V by depthwise 1×1 convs without bias, and attended
    channel-to-channel per head: A = softmax(Q Kᵀ / √d) with d = C/heads, out = A V. The
    output is averaged over positions and squashed by a sigmoid into a channel gate.

    Args:
        channels: C; must be divisible by ``heads``.
        heads: Attention heads.
        window: Pooling window. Shrunk to the feature's size when the feature is smaller
            (SCSA would fail there), so tiny inputs still run.
    """

    def __init__(self, channels: int, heads: int = 1, window: int = 7) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"MIDM needs channels ({channels}) divisible by heads ({heads})")
        self.heads, self.window = heads, window
        self.scale = (channels // heads) ** -0.5
        self.norm = nn.GroupNorm(1, channels)
        self.q = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.k = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.v = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Channel gate in (0, 1) of shape (B, C, 1, 1)."""
        b, c, h, w = x.shape
        win = max(1, min(self.window, h, w))
        y = self.norm(F.avg_pool2d(x, win, win))
        q, k, v = (f(y).reshape(b, self.heads, c // self.heads, -1) for f in (self.q, self.k, self.v))
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).reshape(b, c, -1).mean(2)
        return torch.sigmoid(out).reshape(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MISBlock(nn.Module):
    """Multi-semantic information synergy block: DyConv(3×3) → BN → ReLU → MIE → MIDM.

    Args:
        cin: Input channels.
        cout: Output channels (the dynamic conv carries the channel change).
        heads: MIDM heads.
        mie_kernels: MIE 1-D kernel sizes.
        window: MIDM pooling window.
        num_kernels: Dynamic-conv experts.
        temperature: Dynamic-conv softmax temperature.
        routing: ``"softmax"`` (DynamicConv) or ``"sigmoid"`` (CondConv).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        heads: int,
        mie_kernels: Sequence[int] = (3, 5, 7, 9),
        window: int = 7,
        num_kernels: int = 4,
        temperature: float = 4.0,
        routing: str = "softmax",
    ) -> None:
        super().__init__()
        self.conv = DynamicConv2d(cin, cout, 3, num_kernels, temperature, routing)
        self.bn = nn.BatchNorm2d(cout)
        self.mie = MIE(cout, mie_kernels)
        self.midm = MIDM(cout, heads, window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.midm(self.mie(F.relu(self.bn(self.conv(x)))))


class ReparamDWConv(nn.Module):
    """Depthwise large kernel + parallel small kernel, each with BN (RepLKNet's Re-DWConv).

    Training form: BN(DW_large(x)) + BN(DW_small(x)). :meth:`fuse` folds both BNs, zero-pads
    the small kernel to the large size and adds kernels and biases: one depthwise conv.

    Args:
        channels: C (depthwise).
        large: Large kernel size (odd; 21 in MS-LKSeg).
        small: Small kernel size (odd, ≤ large; 3 in MS-LKSeg); 0 disables the branch.
    """

    def __init__(self, channels: int, large: int = 21, small: int = 3) -> None:
        super().__init__()
        if large % 2 == 0 or (small and (small % 2 == 0 or small > large)):
            raise ValueError(f"kernels must be odd with small <= large, got {large} and {small}")
        self.large = ConvBN(channels, channels, large, groups=channels)
        self.small: ConvBN | None = ConvBN(channels, channels, small, groups=channels) if small else None
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's depthwise kernels are several times faster on channels-last tensors on CPU
        # (measured 7x for 21x21 at 256^2); the layout does not change any value.
        x = x.contiguous(memory_format=torch.channels_last)
        if self.fused is not None:
            return self.fused(x)
        out = self.large(x)
        return out + self.small(x) if self.small is not None else out

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge both branches and their BNs into :attr:`fused` (idempotent)."""
        if self.fused is not None:
            return
        w, b = self.large.fused_params()
        if self.small is not None:
            ws, bs = self.small.fused_params()
            pad = (w.shape[-1] - ws.shape[-1]) // 2
            w = w + F.pad(ws, [pad] * 4)
            b = b + bs
        self.fused = _conv_from(w, b, self.large.conv)
        del self.large, self.small
        self.small = None


class LDBlock(nn.Module):
    """Large-kernel depthwise skip block (RepLKNet's RepLK block).

    x + ConvBN_1×1(ReLU(ReDW(ReLU(ConvBN_1×1(BN(x)))))). :meth:`fuse` also folds the leading
    BN and the 1×1 BNs into the 1×1 convs (exact: a 1×1 conv has no padding).

    Args:
        channels: C of the skip feature.
        large: Large depthwise kernel.
        small: Parallel small kernel (0: none).
        dw_ratio: Width of the depthwise part relative to C (RepLKNet: 1).
    """

    def __init__(self, channels: int, large: int = 21, small: int = 3, dw_ratio: float = 1.0) -> None:
        super().__init__()
        dw = max(1, int(round(channels * dw_ratio)))
        self.pre_bn: nn.Module = nn.BatchNorm2d(channels)
        self.pw1 = ConvBN(channels, dw, 1)
        self.dw = ReparamDWConv(dw, large, small)
        self.pw2 = ConvBN(dw, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.pw1(self.pre_bn(x)))
        out = F.relu(self.dw(out))
        return x + self.pw2(out)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold every BN and merge the two depthwise branches (eval-mode equivalence)."""
        if isinstance(self.pre_bn, nn.BatchNorm2d):
            pre = self.pre_bn
            assert pre.running_var is not None and pre.running_mean is not None
            s = pre.weight / (pre.running_var + pre.eps).sqrt()
            t = pre.bias - pre.running_mean * s
            w, b = self.pw1.fused_params()
            # conv(s·x + t) = (W·diag(s)) x + W t, then the conv's own (BN-folded) bias.
            b = b + (w.flatten(1) @ t)
            w = w * s.reshape(1, -1, 1, 1)
            self.pw1.conv = _conv_from(w, b, self.pw1.conv)
            self.pw1.bn = nn.Identity()
            self.pre_bn = nn.Identity()
        self.pw1.fuse()
        self.dw.fuse()
        self.pw2.fuse()

    @property
    def is_fused(self) -> bool:
        """Whether :meth:`fuse` has run."""
        return self.dw.fused is not None
