"""S³-Net: self-supervised per-image clustering network (Karimijafarbigloo et al., ICCVW 2023).

Pure torch. The network keeps full resolution throughout (no down-sampling) and returns a
C-channel *response map* whose per-pixel argmax is a cluster id. It is never trained once and
reused: the engine builds a fresh, randomly initialised instance for every image and optimises it
on that image alone (see the engine's ``networks/s3_net.py``).

Two faithful variants (``mode``):

* ``"paper"`` — the deformable convolution predicts its offsets and modulation masks from the
  features (D-LKA style), so the network runs on any image size and batch.
* ``"released"`` — the authors' notebook: offsets (B×18×H×W) and masks (B×9×H×W) are free
  per-pixel parameters initialised with ``torch.rand`` (mask without sigmoid), so the network only
  accepts batch 1 at the fixed ``size``; the auxiliary map is rotated by 90° inside ``forward``.

Specification: ``specs/networks.md`` §3.2.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d

from napari_medseg.models.s3_ops import (
    deform_conv3x3_banded,
    deform_conv3x3_sampling,
    depthwise_conv2d,
    pointwise_conv2d,
)

MODES = ("paper", "released")
DEFORM_IMPLS = ("auto", "torchvision", "sampling", "banded")


class InceptionLKA(nn.Module):
    """Inception large-kernel attention: u ⊙ 1×1(concat(dw3/d1, dw5/d2, dw7/d3)(dw5(u))).

    Args:
        dim: Channels C (unchanged, all convolutions keep H×W).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        # Three parallel dilated depthwise branches replace VAN's single 7×7/d3 conv.
        self.branches = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=d * (k - 1) // 2, dilation=d, groups=dim)
            for k, d in ((3, 1), (5, 2), (7, 3))
        )
        self.fuse = nn.Conv2d(3 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        a = depthwise_conv2d(self.conv0, x)
        attn = pointwise_conv2d(self.fuse, torch.cat([depthwise_conv2d(b, a) for b in self.branches], dim=1))
        return x * attn


class AttentionModule(nn.Module):
    """VAN-style spatial attention around I-LKA: x + 1×1(I-LKA(GELU(1×1(x)))).

    Args:
        dim: Channels C.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.lka = InceptionLKA(dim)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        return x + pointwise_conv2d(self.proj_out, self.lka(self.act(pointwise_conv2d(self.proj_in, x))))


class DeformableConv(nn.Module):
    """Modulated deformable 3×3 convolution (DCNv2) through ``torchvision.ops.deform_conv2d``.

    Args:
        dim: Input and output channels C.
        mode: ``"paper"`` predicts 18 offsets and 9 sigmoid masks per pixel from the input with a
            3×3 conv (zero-initialised, so it starts as a plain conv with mask 0.5);
            ``"released"`` holds them as free parameters of shape (1, 18, size, size) and
            (1, 9, size, size), uniform [0, 1) like the notebook, mask used raw.
        size: Side length of the free parameters (``"released"`` only).
        impl: ``"torchvision"`` (``torchvision.ops.deform_conv2d``), ``"sampling"``
            (:func:`deform_conv3x3_sampling`, same result, faster backward on CPU),
            ``"banded"`` (:func:`~napari_medseg.models.s3_ops.deform_conv3x3_banded`, the same
            sampling a band of rows at a time, about twice as fast again on CPU at 256²) or
            ``"auto"`` (torchvision on accelerators; on CPU banded from 128² up, else sampling).
    """

    def __init__(self, dim: int, mode: str = "paper", size: int = 256, impl: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if impl not in DEFORM_IMPLS:
            raise ValueError(f"impl must be one of {DEFORM_IMPLS}, got {impl!r}")
        self.mode = mode
        self.impl = impl
        self.size = size
        self.weight = nn.Parameter(torch.empty(dim, dim, 3, 3))
        if mode == "paper":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.offset_mask = nn.Conv2d(dim, 27, 3, padding=1)
            nn.init.zeros_(self.offset_mask.weight)
            nn.init.zeros_(self.offset_mask.bias)
        else:
            nn.init.uniform_(self.weight, 0.0, 1.0)
            self.offset = nn.Parameter(torch.rand(1, 18, size, size))
            self.mask = nn.Parameter(torch.rand(1, 9, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W); ``"released"`` requires B = 1 and H = W = size."""
        if self.mode == "paper":
            om = self.offset_mask(x)
            offset, mask = om[:, :18], torch.sigmoid(om[:, 18:])
        else:
            if x.shape[0] != 1 or tuple(x.shape[2:]) != (self.size, self.size):
                raise ValueError(
                    f"released-mode S³-Net takes batch 1 at {self.size}×{self.size}, got {tuple(x.shape)}"
                )
            offset, mask = self.offset, self.mask
        impl = self.impl
        if impl == "auto" and x.device.type != "cpu":
            impl = "torchvision"
        elif impl == "auto":
            # Banding pays once the samples no longer fit in cache; below ~128² its per-band
            # overhead made an iteration ~20 % slower than sampling everything at once.
            impl = "banded" if x.shape[-2] * x.shape[-1] >= 128 * 128 else "sampling"
        if impl == "torchvision":
            return deform_conv2d(
                x.contiguous(), offset.contiguous(), self.weight, padding=(1, 1), mask=mask.contiguous()
            )
        if impl == "banded":
            return deform_conv3x3_banded(x, offset, self.weight, mask)
        return deform_conv3x3_sampling(x, offset, self.weight, mask)


class S3Net(nn.Module):
    """The S³-Net trunk: stem → 2 × (attention → BN) → [aux head] → deformable → response map.

    No ReLU anywhere in the trunk, as in the released code.

    Args:
        in_channels: Input channels (3 for RGB; grey is repeated by the engine).
        channels: Response-map channels C (the maximum number of clusters), 64 by default.
        n_conv: Number of attention modules (``nConv``), 2 by default.
        mode: ``"paper"`` or ``"released"`` (see the module docstring).
        size: Fixed input side of ``"released"`` mode.
        deform_impl: See :class:`DeformableConv`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        n_conv: int = 2,
        mode: str = "paper",
        size: int = 256,
        deform_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.mode = mode
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.blocks = nn.Sequential(
            *(nn.Sequential(AttentionModule(channels), nn.BatchNorm2d(channels)) for _ in range(n_conv))
        )
        self.aux = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.deform = DeformableConv(channels, mode, size, deform_impl)
        self.deform_bn = nn.BatchNorm2d(channels)
        self.head = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Response map and auxiliary map (only ``"released"`` mode's losses use the latter).

        Args:
            x: (B, in_channels, H, W) float in [0, 1].

        Returns:
            (R, R_aux), each (B, C, H, W). In ``"released"`` mode R_aux is rotated by 90° in the
            (H, W) plane, as the notebook does inside ``forward``.
        """
        f = self.blocks(self.stem(x))
        aux = self.aux[1](pointwise_conv2d(self.aux[0], f))
        if self.mode == "released":
            aux = torch.rot90(aux, 1, dims=(2, 3))
        return self._head(f), aux

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        """Deformable conv → BN → 1×1 → BN on the trunk features (B, C, H, W)."""
        return self.head[1](pointwise_conv2d(self.head[0], self.deform_bn(self.deform(f))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) → (B, C, H, W) response map (cluster logits)."""
        return self._head(self.blocks(self.stem(x)))
