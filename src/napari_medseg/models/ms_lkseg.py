"""MS-LKSeg (Li et al., BSPC 2025, doi 10.1016/j.bspc.2025.108635), reconstructed.

The authors released no code; the topology follows the paper's Fig. 1: a 5-level U-Net whose
encoder stages are two MIS blocks each (dynamic conv → MIE → MIDM, see
:mod:`napari_medseg.models.ms_lkseg_blocks`), whose four skip connections pass through an LD
block (RepLKNet-style 21×21 + 3×3 re-parameterisable depthwise conv) and whose decoder stages
are U-Net double 3×3 convs after up-sampling. Unknown details are constructor options; the
choices are recorded in docs/models/ms-lkseg.md.

Pure torch: (B, C_in, H, W) float → (B, num_classes, H, W) logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.models.ms_lkseg_blocks import LDBlock, MISBlock

DEFAULT_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512)


def default_heads(widths: Sequence[int]) -> tuple[int, ...]:
    """MIDM heads per stage when not given: one head per 32 channels (at least 1)."""
    return tuple(max(1, w // 32) for w in widths)


class DoubleConv(nn.Sequential):
    """(3×3 conv → BN → ReLU) × 2, the U-Net decoder stage ("Conv ×2" in Fig. 1)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Up-sample the deeper feature ×2, reduce it to the skip's width, concatenate, DoubleConv.

    Args:
        cin: Channels of the deeper feature.
        cskip: Channels of the skip feature (and of the output).
        mode: ``"bilinear"`` (interpolate, then 1×1 conv) or ``"transposed"`` (2×2
            transposed conv, stride 2).
    """

    def __init__(self, cin: int, cskip: int, mode: str = "bilinear") -> None:
        super().__init__()
        if mode not in ("bilinear", "transposed"):
            raise ValueError(f"upsample must be bilinear or transposed, got {mode!r}")
        self.mode = mode
        self.reduce: nn.Module = (
            nn.Conv2d(cin, cskip, 1) if mode == "bilinear" else nn.ConvTranspose2d(cin, cskip, 2, 2)
        )
        self.conv = DoubleConv(2 * cskip, cskip)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.mode == "bilinear":
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        x = self.reduce(x)
        if x.shape[2:] != skip.shape[2:]:  # odd sizes: transposed conv may be one pixel short
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


class MSLKSeg(nn.Module):
    """MS-LKSeg U-Net.

    Args:
        in_channels: Input channels C_in.
        num_classes: Output classes K (including background).
        widths: Channels of the 5 encoder stages (each divisible by ``len(mie_kernels)`` and by
            its head count). Fewer or more stages also work (≥ 2).
        heads: MIDM heads per stage (default: one per 32 channels).
        mie_kernels: MIE depthwise 1-D kernel sizes, one per channel group.
        midm_window: MIDM average-pooling window.
        dyconv_kernels: Expert kernels of each dynamic conv.
        dyconv_temperature: Softmax temperature of the dynamic-conv attention.
        dyconv_routing: ``"softmax"`` (DynamicConv) or ``"sigmoid"`` (CondConv).
        ld_kernel: Large depthwise kernel of the LD blocks (an int, or one per skip).
        ld_small_kernel: Parallel small kernel of the LD blocks (0: none).
        upsample: ``"bilinear"`` or ``"transposed"``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        heads: Sequence[int] | None = None,
        mie_kernels: Sequence[int] = (3, 5, 7, 9),
        midm_window: int = 7,
        dyconv_kernels: int = 4,
        dyconv_temperature: float = 4.0,
        dyconv_routing: str = "softmax",
        ld_kernel: int | Sequence[int] = 21,
        ld_small_kernel: int = 3,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError("MS-LKSeg needs at least two stages")
        heads = tuple(heads) if heads else default_heads(widths)
        if len(heads) != len(widths):
            raise ValueError(f"{len(widths)} widths but {len(heads)} head counts")
        n_skips = len(widths) - 1
        kernels = [int(ld_kernel)] * n_skips if isinstance(ld_kernel, int) else list(ld_kernel)
        if len(kernels) != n_skips:
            raise ValueError(f"need {n_skips} LD kernel sizes, got {len(kernels)}")

        def mis(cin: int, cout: int, h: int) -> MISBlock:
            return MISBlock(
                cin, cout, h, mie_kernels, midm_window, dyconv_kernels, dyconv_temperature, dyconv_routing
            )

        self.encoder = nn.ModuleList()
        cin = in_channels
        for w, h in zip(widths, heads):
            self.encoder.append(nn.Sequential(mis(cin, w, h), mis(w, w, h)))
            cin = w
        self.skips = nn.ModuleList(LDBlock(w, k, ld_small_kernel) for w, k in zip(widths[:-1], kernels))
        self.decoder = nn.ModuleList(Up(widths[i + 1], widths[i], upsample) for i in reversed(range(n_skips)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, K, H, W) logits. H and W need not be multiples of 16."""
        skips: list[torch.Tensor] = []
        for i, stage in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = stage(x)
            if i < len(self.skips):
                skips.append(self.skips[i](x))
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
        return self.head(x)

    @torch.no_grad()
    def fuse(self) -> MSLKSeg:
        """Re-parameterise every LD block for inference, in place; returns ``self``.

        Each block's 21×21 and 3×3 depthwise branches and all its BatchNorms (running
        statistics) become single convs. Only valid in eval mode: training the fused model
        is possible but it no longer has those BNs.
        """
        for m in self.modules():
            if isinstance(m, LDBlock):
                m.fuse()
        return self

    @property
    def is_fused(self) -> bool:
        """Whether :meth:`fuse` has run."""
        return any(isinstance(m, LDBlock) and m.is_fused for m in self.modules())
