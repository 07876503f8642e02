"""CPU-friendly forms of S³-Net's 1×1, depthwise and deformable convolutions (same maths, faster).

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
  kernel, read at stride = dilation;
* a depthwise convolution with dilation d ≥ 3 is computed on the d² sub-lattices of the image
  (:func:`_polyphase_depthwise`): pixel (d·a + r, d·b + s) only ever meets pixels of its own
  sub-lattice (r, s), where the dilated kernel is an ordinary dense one. oneDNN's dilated
  7×7 kernels are 3–8× slower than its dense ones on these maps, in the forward and backward;
* a plain 3×3 depthwise convolution uses PyTorch's own backward, which is fastest for it;
* the modulated deformable 3×3 convolution is bilinear sampling plus matrix products, with the
  9 kernel taps in the batch axis so that PyTorch's grid sampler (parallel over the batch only)
  uses every thread (:func:`deform_conv3x3_sampling`), and optionally a band of output rows at
  a time with a hand-written backward (:func:`deform_conv3x3_banded`).

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
    if standard:
        return conv(x)
    if dil >= POLYPHASE_MIN_DILATION:
        return _polyphase_depthwise(conv, x)
    if not torch.is_grad_enabled() or (dil == 1 and conv.kernel_size[0] == 3):
        return conv(x)
    return _DepthwiseConv2d.apply(x, conv.weight, conv.bias, pad, dil)


# Timed at 96×128 and 191×256 with 64 channels, forward + backward, 1 and 2 threads: the
# sub-lattice form of the 7×7 dilation-3 branch is 3.5–8× faster than the others, while for
# dilation 2 the hand-written backward stays faster (its 4 sub-lattices cost more to gather).
POLYPHASE_MIN_DILATION = 3


def _polyphase_depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A "same"-padded dilated depthwise conv as a dense one on each of the d² sub-lattices.

    Output pixel (d·a + r, d·b + s) of a dilation-d convolution only reads input pixels
    (d·(a + i) + r, d·(b + j) + s), i.e. the sub-image x[r::d, s::d] convolved with the
    undilated kernel (zero padding (k − 1)/2). The image is zero-padded to multiples of d on the
    bottom and right first; those rows and columns only ever stand for out-of-image zeros.

    Args:
        conv: Depthwise ``nn.Conv2d`` (see :func:`depthwise_conv2d`), dilation d.
        x: (B, C, H, W).

    Returns:
        (B, C, H, W) in channels-last memory, equal to ``conv(x)``; autograd differentiates it.
    """
    d = conv.dilation[0]
    b, c, h, w = x.shape
    ph, pw = (-h) % d, (-w) % d
    h2, w2 = (h + ph) // d, (w + pw) // d
    xh = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pw, 0, ph))  # (B, H', W', C)
    sub = xh.reshape(b, h2, d, w2, d, c).permute(0, 2, 4, 1, 3, 5).reshape(b * d * d, h2, w2, c)
    pad = (conv.kernel_size[0] - 1) // 2
    y = F.conv2d(sub.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=pad, groups=c)
    yh = y.permute(0, 2, 3, 1).reshape(b, d, d, h2, w2, c)
    yh = yh.permute(0, 3, 1, 4, 2, 5).reshape(b, h2 * d, w2 * d, c)
    return yh[:, :h, :w].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


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


def _tap_weights(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) kernel → (9, O, C), one (O, C) matrix per tap in row-major tap order."""
    o, c = weight.shape[:2]
    return weight.permute(2, 3, 0, 1).reshape(9, o, c)


def _taps_as_batch(x: torch.Tensor, grid: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and grid with the 9 kernel taps moved into the batch axis.

    PyTorch's CPU grid sampler (forward and backward) runs in parallel over the batch only, so
    with one image and one (1, 9·R, W, 2) grid it used a single thread; with the taps as batch
    it splits the work over up to 9 threads. For batch 1 the input is expanded, not copied.

    Args:
        x: (B, C, R', W) input rows.
        grid: (B or 1, 9·R, W, 2) sampling grid, taps outermost.
        b: Batch size B.

    Returns:
        (B·9, C, R', W) input and (B·9, R, W, 2) grid.
    """
    c, rows, w = x.shape[1:]
    xb = x.unsqueeze(1).expand(b, 9, c, rows, w).reshape(b * 9, c, rows, w)
    gb = grid.view(grid.shape[0], 9, -1, w, 2).expand(b, -1, -1, -1, -1).reshape(b * 9, -1, w, 2)
    return xb, gb


def _sample(x: torch.Tensor, grid: torch.Tensor, b: int) -> torch.Tensor:
    """Bilinear samples (zeros outside) of x (B, C, R', W) on grid (B or 1, 9·R, W, 2) → (B, 9, C, R, W)."""
    xb, gb = _taps_as_batch(x, grid, b)
    s = F.grid_sample(xb, gb, mode="bilinear", padding_mode="zeros", align_corners=True)
    return s.view(b, 9, x.shape[1], -1, x.shape[-1])


def _deform_rows(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, w9: torch.Tensor, r0: int, r1: int
) -> torch.Tensor:
    """Output rows r0..r1−1 of the modulated deformable 3×3 conv, as (B, O, (r1 − r0)·W).

    Args:
        x: (B, C, H, W); offset: (B or 1, 18, H, W); mask: (B or 1, 9, H, W);
        w9: the kernel as (9, O, C) (:func:`_tap_weights`).
    """
    b, _, h, w = x.shape
    grid, lo, hi = _band_grid(*_tap_grid(offset, r0, r1, w), h, w)
    s = _sample(x[:, :, lo:hi], grid, b) * mask[:, :, r0:r1].unsqueeze(2)  # (B, 9, C, n, W)
    return (w9 @ s.flatten(3)).sum(1)


def deform_conv3x3_sampling(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Modulated deformable 3×3 conv (stride 1, padding 1) by bilinear sampling and matmuls.

    Same arithmetic as ``torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)``
    (zero outside the image, offsets laid out (dy, dx) per kernel tap in row-major order), but
    its CPU backward (autograd through ``grid_sample``) is several times faster than
    torchvision's CPU kernel, which dominates an S³-Net iteration on a CPU.

    Args:
        x: (B, C, H, W) input.
        offset: (B or 1, 18, H, W) sampling offsets in pixels.
        weight: (O, C, 3, 3) kernel.
        mask: (B or 1, 9, H, W) modulation.

    Returns:
        (B, O, H, W).
    """
    b, _, h, w = x.shape
    return _deform_rows(x, offset, mask, _tap_weights(weight), 0, h).view(b, -1, h, w)


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
        b, _, h, w = x.shape
        o = weight.shape[0]
        w9 = _tap_weights(weight)
        out = x.new_empty(b, o, h, w)
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            out[:, :, r0:r1] = _deform_rows(x, offset, mask, w9, r0, r1).view(b, o, r1 - r0, w)
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, offset, mask, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        o = weight.shape[0]
        w9 = _tap_weights(weight)
        grad = grad.contiguous()
        gx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        goff = torch.zeros(b, 9, 2, h, w, dtype=x.dtype, device=x.device)
        gmask = torch.zeros(b, 9, h, w, dtype=x.dtype, device=x.device)
        gw9 = torch.zeros_like(w9)
        for r0 in range(0, h, ctx.rows):
            r1 = min(r0 + ctx.rows, h)
            n = r1 - r0
            py, px = _tap_grid(offset, r0, r1, w)
            grid, lo, hi = _band_grid(py, px, h, w)
            band = x[:, :, lo:hi]
            s = _sample(band, grid, b)  # (B, 9, C, n, W)
            m = mask[:, :, r0:r1].unsqueeze(2)
            g = grad[:, :, r0:r1].reshape(b, 1, o, n * w)
            gw9 += (g @ (s * m).flatten(3).transpose(2, 3)).sum(0)
            gsm = (w9.transpose(1, 2) @ g).view(b, 9, c, n, w)
            gmask[:, :, r0:r1] = (gsm * s).sum(2)
            gs = (gsm * m).view(b * 9, c, n, w)
            bandb, gridb = _taps_as_batch(band, grid, b)
            gband, ggrid = torch.ops.aten.grid_sampler_2d_backward(gs, bandb, gridb, 0, 0, True, [True, True])
            gx[:, :, lo:hi] += gband.view(b, 9, c, hi - lo, w).sum(1)
            ggrid = ggrid.view(b, 9, n, w, 2)
            # Chain rule through the normalisation of (py, px) in _band_grid.
            goff[:, :, 0, r0:r1] = ggrid[..., 1] * (2.0 / max(hi - lo - 1, 1))
            goff[:, :, 1, r0:r1] = ggrid[..., 0] * (2.0 / max(w - 1, 1))
        goff = goff.reshape(b, 18, h, w)
        if offset.shape[0] == 1 and b > 1:
            goff, gmask = goff.sum(0, keepdim=True), gmask.sum(0, keepdim=True)
        gw = gw9.view(3, 3, o, c).permute(2, 3, 0, 1)
        return gx, goff, gmask, gw.contiguous(), None


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
