"""CPU-friendly forms of S³-Net's 1×1 and depthwise convolutions (same maths, faster backward).

S³-Net optimises a fresh network on every image at full resolution, so an S³-Net run is dominated
by the *backward* pass of its convolutions on 64-channel maps of the whole image. On a CPU,
PyTorch's depthwise weight gradient (above all with dilation) and its 1×1 convolutions on
channels-last maps are slow, so this module computes them differently:

* a 1×1 convolution on a channels-last (B, C, H, W) tensor is a plain matrix product over the
  (B·H·W, C) view (:func:`pointwise_conv2d`);
* a depthwise convolution keeps PyTorch's forward, and its backward is written by hand
  (:class:`_DepthwiseConv2d`): the input gradient is the same depthwise convolution with the
  kernel flipped, and the weight gradient is the correlation of each padded input channel with
  its own output gradient — one more depthwise convolution, with the gradient as a (H, W)
  kernel, read at stride = dilation.

Results agree with ``nn.Conv2d`` to float rounding (tests compare outputs and every gradient).
On accelerators the standard convolutions are used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise k×k convolution, stride 1, "same" padding p = dilation·(k−1)/2."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: int, dil: int
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.dil, ctx.has_bias = pad, dil, bias is not None
        return F.conv2d(x, weight, bias, padding=pad, dilation=dil, groups=x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, weight = ctx.saved_tensors
        pad, dil = ctx.pad, ctx.dil
        b, c, h, w = x.shape
        k = weight.shape[-1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # The adjoint of a "same" correlation is the correlation with the flipped kernel.
            gx = F.conv2d(grad, weight.flip(-1, -2), padding=pad, dilation=dil, groups=c)
        if ctx.needs_input_grad[1]:
            # gw[c, i, j] = Σ_yx grad[c, y, x] · x_pad[c, y + dil·i, x + dil·j]: a depthwise
            # correlation of x_pad with grad as the kernel, sampled at stride dil (k×k outputs).
            # NCHW memory makes this one fast call; channels-last would be 3-5× slower.
            xp = F.pad(x.contiguous(), (pad, pad, pad, pad))
            kernel = grad.contiguous().reshape(b * c, 1, h, w)
            gw = F.conv2d(xp.reshape(1, b * c, h + 2 * pad, w + 2 * pad), kernel, stride=dil, groups=b * c)
            gw = gw.reshape(b, c, 1, k, k).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None


def depthwise_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depthwise, stride-1, "same"-padded ``conv``, with a faster CPU backward.

    Args:
        conv: ``nn.Conv2d(C, C, k, padding=d·(k−1)/2, dilation=d, groups=C)``, k odd.
        x: (B, C, H, W), any memory format.

    Returns:
        (B, C, H, W), equal to ``conv(x)``.
    """
    pad, dil = conv.padding[0], conv.dilation[0]
    standard = (
        x.device.type != "cpu"
        or conv.padding_mode != "zeros"
        or conv.groups != x.shape[1]
        or conv.stride != (1, 1)
        or conv.padding != (pad, pad)
        or conv.dilation != (dil, dil)
        or 2 * pad != dil * (conv.kernel_size[0] - 1)
        or conv.kernel_size[0] != conv.kernel_size[1]
    )
    if standard or not torch.is_grad_enabled():
        return conv(x)
    return _DepthwiseConv2d.apply(x, conv.weight, conv.bias, pad, dil)


def pointwise_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1×1 ``conv`` (groups 1), as a matrix product over the channel axis.

    Args:
        conv: ``nn.Conv2d(C_in, C_out, 1)``.
        x: (B, C_in, H, W); channels-last memory makes the product copy-free.

    Returns:
        (B, C_out, H, W) in channels-last memory, equal to ``conv(x)``.
    """
    if x.device.type != "cpu" or conv.groups != 1 or conv.kernel_size != (1, 1) or conv.stride != (1, 1):
        return conv(x)
    y = F.linear(x.permute(0, 2, 3, 1), conv.weight[:, :, 0, 0], conv.bias)
    return y.permute(0, 3, 1, 2)
