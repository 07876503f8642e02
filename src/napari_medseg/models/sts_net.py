"""STS-Net (Zhao et al., Sci. Rep. 2025): ECA-ResNeXt50-32x4d encoder + DeepLabV3 head.

Pure torch. The released network is DeepLabV3 on a ResNeXt50-32x4d encoder with an ECA
channel-attention layer in line after each of the five encoder stages, output stride 8
(stages 4 and 5 dilated by 2 and 4 instead of strided), an ASPP head on the last feature
only, a 1×1 classifier and ×8 bilinear upsampling (see docs/models/sts-net.md).

Shapes for an input (B, C, H, W), H and W divisible by 8:

=========  ==========================  ==================
stage      layers                      output
=========  ==========================  ==================
1          conv7×7/2 + BN + ReLU, ECA  (B, 64, H/2, W/2)
2          maxpool/2 + layer1, ECA     (B, 256, H/4, W/4)
3          layer2 (/2), ECA            (B, 512, H/8, W/8)
4          layer3 (dilation 2), ECA    (B, 1024, H/8, W/8)
5          layer4 (dilation 4), ECA    (B, 2048, H/8, W/8)
head       ASPP → 3×3 → 1×1 → ×8 up    (B, K, H, W)
=========  ==========================  ==================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

__all__ = ["ECA", "ECAResNeXtEncoder", "ASPP", "DeepLabV3Decoder", "STSNet"]


class ECA(nn.Module):
    """Efficient channel attention as released with STS-Net.

    Global average pool → a 1-D convolution over channels (kernel 3, no bias) applied
    *twice with the same weights* → sigmoid → channel-wise gate. The adaptive kernel size of
    ECA-Net is not used (3 parameters per layer).

    Args:
        kernel_size: Odd kernel size of the 1-D convolution over channels.
    """

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W), rescaled per channel."""
        y = x.mean((2, 3)).unsqueeze(1)  # (B, 1, C): channels as a 1-D signal
        y = self.conv(self.conv(y))
        return x * torch.sigmoid(y).transpose(1, 2).unsqueeze(-1)


def _dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Replace strides by dilation in every conv of a stage (smp-style ``make_dilated``).

    Unlike torchvision's ``replace_stride_with_dilation`` (which keeps the previous dilation in
    the first block), every 3×3 conv of the stage gets the same dilation, as in the release.
    """
    for mod in stage.modules():
        if isinstance(mod, nn.Conv2d):
            mod.stride = (1, 1)
            k = mod.kernel_size[0]
            if k > 1:
                mod.dilation = (dilation, dilation)
                mod.padding = ((k // 2) * dilation, (k // 2) * dilation)


class ECAResNeXtEncoder(ResNet):
    """ResNeXt50-32x4d (torchvision's definition, fc and avgpool removed) with in-line ECA.

    Parameter names match torchvision's ``resnext50_32x4d`` so its ImageNet weights load
    directly (see :meth:`load_imagenet`).

    Args:
        in_channels: Input channels (3 for RGB / grey repeated; 1 for a grey stem).
        dilations: Dilation of stages 4 and 5 (output stride 8 with (2, 4); (1, 1) gives the
            plain stride-32 encoder).
    """

    def __init__(self, in_channels: int = 3, dilations: Sequence[int] = (2, 4)) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4)
        del self.fc, self.avgpool
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.in_channels = in_channels
        for stage, d in zip((self.layer3, self.layer4), dilations):
            if d > 1:
                _dilate_stage(stage, d)
        self.eca = nn.ModuleList(ECA(3) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, C_in, H, W) → (B, 2048, H/8, W/8) (output stride 8 with default dilations)."""
        x = self.eca[0](self.relu(self.bn1(self.conv1(x))))
        x = self.eca[1](self.layer1(self.maxpool(x)))
        x = self.eca[2](self.layer2(x))
        x = self.eca[3](self.layer3(x))
        return self.eca[4](self.layer4(x))

    def load_imagenet(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load torchvision ImageNet weights (``fc.*`` ignored, ECA stays at its init).

        For a 1-channel stem the RGB kernels of ``conv1`` are summed, which keeps the
        response to a grey image repeated over three channels.

        Raises:
            RuntimeError: If a backbone tensor is missing or has an unexpected shape.
        """
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        w = state.get("conv1.weight")
        if w is not None and self.in_channels != w.shape[1]:
            if self.in_channels != 1:
                raise RuntimeError(f"cannot adapt ImageNet conv1 to {self.in_channels} channels")
            state["conv1.weight"] = w.sum(1, keepdim=True)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("eca.")]
        if missing or unexpected:
            raise RuntimeError(f"ImageNet weights do not fit: missing {missing}, unexpected {unexpected}")


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = (kernel // 2) * dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """ASPP image-level branch: global pool → 1×1 conv + BN + ReLU → broadcast back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        if self.training and y.shape[0] == 1:
            # One pooled vector has no batch statistics (BatchNorm2d raises): use the running
            # ones, so training with batch size 1 works.
            bn = self.bn
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            y = self.bn(y)
        return F.relu(y).expand(-1, -1, *x.shape[2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3).

    Five branches (1×1; three 3×3 with the given dilation rates; image pooling), each
    ``out_channels`` wide with BN + ReLU, concatenated, projected by 1×1 conv + BN + ReLU and
    dropped out.

    Args:
        in_channels: Channels of the encoder feature.
        out_channels: Width of every branch and of the output.
        rates: Dilation rates of the three 3×3 branches.
        dropout: Dropout probability after the projection.
    """

    def __init__(
        self,
        in_channels: int = 2048,
        out_channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, int(r)) for r in rates]
        branches.append(_ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            _conv_bn_relu(out_channels * len(branches), out_channels, 1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) → (B, out_channels, h, w)."""
        return self.project(torch.cat([b(x) for b in self.branches], 1))


class DeepLabV3Decoder(nn.Sequential):
    """ASPP followed by a 3×3 conv + BN + ReLU (smp's DeepLabV3 decoder)."""

    def __init__(
        self,
        in_channels: int = 2048,
        channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.5,
    ) -> None:
        super().__init__(ASPP(in_channels, channels, rates, dropout), _conv_bn_relu(channels, channels, 3))


class STSNet(nn.Module):
    """ECA-ResNeXt50-32x4d + DeepLabV3 head, output stride 8, logits at input resolution.

    Args:
        num_classes: Output classes including background.
        in_channels: Input channels (3: RGB or grey repeated; 1: grey stem).
        decoder_channels: ASPP width.
        rates: ASPP dilation rates.
        dropout: Dropout after the ASPP projection.
        output_stride: 8 (as released: stages 4/5 dilated 2/4) or 16 (a faster option:
            stage 5 dilated 2; use ASPP rates 6/12/18 with it).

    Decoder and head keep PyTorch's default initialisation, as in the release.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 3,
        decoder_channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.5,
        output_stride: int = 8,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.stride = output_stride
        self.encoder = ECAResNeXtEncoder(in_channels, (2, 4) if output_stride == 8 else (1, 2))
        self.decoder = DeepLabV3Decoder(2048, decoder_channels, rates, dropout)
        self.head = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) float, H and W divisible by the stride → (B, K, H, W) logits.

        Raises:
            ValueError: If H or W is not a multiple of the output stride.
        """
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"STS-Net needs height and width divisible by {self.stride}, got {h}×{w}")
        y = self.head(self.decoder(self.encoder(x)))
        # ×stride bilinear with align_corners=True, as nn.UpsamplingBilinear2d in the release.
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=True)
