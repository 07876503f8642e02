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


def _tap_grid(offset: torch.Tensor, r0: int, r1: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute sampling positions of the 9 taps for output rows r0..r1−1.

    Args:
        offset: (B or 1, 18, H, W) offsets, (dy, dx) per tap in row-major tap order.

    Returns:
        (py, px), each (B or 1, 9, r1 − r0, W), in pixels of the whole image.
    """
    dev, dt = offset.device, offset.dtype
    tap = torch.arange(3, device=dev, dtype=dt) - 1
    ky, kx = torch.meshgrid(tap, tap, indexing="ij")
    rows = torch.arange(r0, r1, device=dev, dtype=dt)[None, :, None] + ky.reshape(9, 1, 1)
    cols = torch.arange(width, device=dev, dtype=dt)[None, None, :] + kx.reshape(9, 1, 1)
    off = offset[:, :, r0:r1].reshape(offset.shape[0], 9, 2, r1 - r0, width)
    return rows[None] + off[:, :, 0], cols[None] + off[:, :, 1]


def _band_grid(py: torch.Tensor, px: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
    """The rows of the input that bilinear sampling at (py, px) can touch, and the grid there.

    Returns:
        (grid (B or 1, 9·R, W, 2) normalised for ``align_corners=True`` inside the band,
        band start, band end); positions outside the image stay outside the band, so zero
        padding is unchanged.
    """
    lo = int(torch.floor(py.min()).clamp(0, height - 1))
    hi = int(torch.floor(py.max()).clamp(0, height - 1)) + 2
    lo, hi = min(lo, max(height - 2, 0)), min(max(hi, lo + 2), height)
    band = hi - lo
    gy = (py - lo) * (2.0 / max(band - 1, 1)) - 1.0
    gx = px * (2.0 / max(width - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return grid.reshape(grid.shape[0], -1, width, 2), lo, hi


class _DeformConv3x3(torch.autograd.Function):
    """Modulated deformable 3×3 conv computed a band of output rows at a time.

    The (B, C·9, H·W) tensor of sampled values — 113 MB for 64 channels at 191×256 — is never
    built whole: each band's samples stay in cache through the mask, the matrix product and,
    in the backward, the recomputed samples and ``grid_sampler_2d_backward`` on only the input
    rows the band can reach.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, rows: int
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        o = weight.shape[0]
        wmat = weight.reshape(o, c * 9)
        out = x.new_empty(b, o, h, w)
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            grid, lo, hi = _band_grid(*_tap_grid(offset, r0, r1, w), h, w)
            s = _sample(x[:, :, lo:hi], grid, b) * mask[:, :, r0:r1].unsqueeze(1)
            out[:, :, r0:r1] = (wmat @ s.reshape(b, c * 9, -1)).view(b, o, r1 - r0, w)
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, offset, mask, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        o = weight.shape[0]
        wmat = weight.reshape(o, c * 9)
        grad = grad.contiguous()
        gx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        goff = torch.zeros(b, 9, 2, h, w, dtype=x.dtype, device=x.device)
        gmask = torch.zeros(b, 9, h, w, dtype=x.dtype, device=x.device)
        gw = torch.zeros_like(wmat)
        for r0 in range(0, h, ctx.rows):
            r1 = min(r0 + ctx.rows, h)
            n = r1 - r0
            py, px = _tap_grid(offset, r0, r1, w)
            grid, lo, hi = _band_grid(py, px, h, w)
            band = x[:, :, lo:hi]
            s = _sample(band, grid, b)  # (B, C, 9, n, W)
            m = mask[:, :, r0:r1].unsqueeze(1)
            g = grad[:, :, r0:r1].reshape(b, o, n * w)
            gw += (g @ (s * m).reshape(b, c * 9, n * w).transpose(1, 2)).sum(0)
            gsm = (wmat.t() @ g).view(b, c, 9, n, w)
            gmask[:, :, r0:r1] = (gsm * s).sum(1)
            gs = (gsm * m).reshape(b, c, 9 * n, w)
            gband, ggrid = torch.ops.aten.grid_sampler_2d_backward(
                gs, band, grid.expand(b, -1, -1, -1), 0, 0, True, [True, True]
            )
            gx[:, :, lo:hi] += gband
            ggrid = ggrid.view(b, 9, n, w, 2)
            # Chain rule through the normalisation of (py, px) in _band_grid.
            goff[:, :, 0, r0:r1] = ggrid[..., 1] * (2.0 / max(hi - lo - 1, 1))
            goff[:, :, 1, r0:r1] = ggrid[..., 0] * (2.0 / max(w - 1, 1))
        goff = goff.reshape(b, 18, h, w)
        if offset.shape[0] == 1 and b > 1:
            goff, gmask = goff.sum(0, keepdim=True), gmask.sum(0, keepdim=True)
        return gx, goff, gmask, gw.view_as(weight), None


def _sample(x: torch.Tensor, grid: torch.Tensor, b: int) -> torch.Tensor:
    """Bilinear samples (zeros outside) of x (B, C, R', W) on grid (B or 1, 9·R, W, 2) → (B, C, 9, R, W)."""
    grid = grid.expand(b, -1, -1, -1)
    s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return s.view(b, x.shape[1], 9, -1, x.shape[-1])


def deform_conv3x3_banded(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, rows: int = 8
) -> torch.Tensor:
    """Modulated deformable 3×3 conv (stride 1, padding 1, no bias), a band of rows at a time.

    Same arithmetic as ``torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)``
    with lower peak memory and memory traffic on a CPU (see :class:`_DeformConv3x3`).

    Args:
        x: (B, C, H, W) input.
        offset: (B or 1, 18, H, W) offsets in pixels, (dy, dx) per tap, taps in row-major order.
        weight: (O, C, 3, 3).
        mask: (B or 1, 9, H, W) modulation.
        rows: Output rows per band.

    Returns:
        (B, O, H, W), contiguous.
    """
    return _DeformConv3x3.apply(x.contiguous(), offset.contiguous(), mask.contiguous(), weight, rows)
