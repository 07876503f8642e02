"""S³-Net's CPU convolution forms equal ``nn.Conv2d`` in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_medseg.models import s3_ops
from napari_medseg.models.s3_net import S3Net, deform_conv3x3_sampling


def _grads(f, x: torch.Tensor, conv: nn.Module, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    y = f(x)
    y.backward(g)
    return [y.detach(), x.grad, *(p.grad for p in conv.parameters())]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        # The floor covers gradients that are zero in exact arithmetic (a bias before BatchNorm).
        torch.testing.assert_close(u, v, rtol=1e-4, atol=max(1e-5 * float(u.abs().max()), 1e-6))


@pytest.mark.parametrize("k,d", [(3, 1), (5, 1), (5, 2), (7, 3)])
@pytest.mark.parametrize("batch,channels_last", [(1, True), (2, False)])
def test_depthwise_matches_conv2d(k: int, d: int, batch: int, channels_last: bool) -> None:
    torch.manual_seed(k * 10 + d)
    conv = nn.Conv2d(6, 6, k, padding=d * (k - 1) // 2, dilation=d, groups=6)
    x = torch.randn(batch, 6, 13, 17)
    g = torch.randn(batch, 6, 13, 17)
    if channels_last:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    _close(_grads(conv, x, conv, g), _grads(lambda t: s3_ops.depthwise_conv2d(conv, t), x, conv, g))


@pytest.mark.parametrize("h,w", [(9, 9), (10, 11), (4, 5)])
def test_dilated_sub_lattice_form_matches_conv2d(h: int, w: int) -> None:
    # Dilation 3 runs on the 9 sub-lattices (sizes not multiples of 3 get padded, and a 4×5
    # image is smaller than the kernel's reach); with and without autograd.
    torch.manual_seed(h * w)
    conv = nn.Conv2d(5, 5, 7, padding=9, dilation=3, groups=5)
    x = torch.randn(2, 5, h, w).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 5, h, w)
    _close(_grads(conv, x, conv, g), _grads(lambda t: s3_ops.depthwise_conv2d(conv, t), x, conv, g))
    with torch.no_grad():
        torch.testing.assert_close(s3_ops.depthwise_conv2d(conv, x), conv(x), rtol=1e-4, atol=1e-5)


def test_depthwise_without_bias_and_fallbacks() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x, g = torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8)
    _close(_grads(conv, x, conv, g), _grads(lambda t: s3_ops.depthwise_conv2d(conv, t), x, conv, g))
    # Not "same"-padded: the plain module is used (and still gives conv's answer).
    odd = nn.Conv2d(4, 4, 3, padding=0, groups=4)
    assert s3_ops.depthwise_conv2d(odd, x).shape == (1, 4, 7, 6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_matches_conv2d(channels_last: bool) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 5, 1)
    x, g = torch.randn(2, 12, 7, 9), torch.randn(2, 5, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _close(_grads(conv, x, conv, g), _grads(lambda t: s3_ops.pointwise_conv2d(conv, t), x, conv, g))


def test_whole_network_gradients_match_plain_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """One paper-mode forward/backward with the fast forms equals the plain ``nn.Conv2d`` run."""
    torch.manual_seed(2)
    net = S3Net(channels=8).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 20, 24).contiguous(memory_format=torch.channels_last)

    def run() -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        r = net(x)
        (r.square().mean() + r[:, :, 1:].sub(r[:, :, :-1]).abs().mean()).backward()
        return [r.detach(), *(p.grad.clone() for p in net.parameters() if p.grad is not None)]

    fast = run()
    import napari_medseg.models.s3_net as s3_net_module

    monkeypatch.setattr(s3_net_module, "depthwise_conv2d", lambda conv, t: conv(t))
    monkeypatch.setattr(s3_net_module, "pointwise_conv2d", lambda conv, t: conv(t))
    plain = run()
    _close(plain, fast)


@pytest.mark.parametrize(
    "batch,offset_batch,height,scale", [(1, 1, 13, 1.0), (2, 2, 9, 3.0), (2, 1, 17, 0.3), (1, 1, 2, 2.0)]
)
def test_banded_deform_conv_matches_sampling(
    batch: int, offset_batch: int, height: int, scale: float
) -> None:
    """Values and all four gradients (input, offsets, masks, weight), any band height.

    Offsets up to a few pixels send taps outside the image and across band borders.
    """
    g = torch.Generator().manual_seed(height)
    shape = (height, 11)
    x = torch.randn(batch, 4, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    off = (torch.randn(offset_batch, 18, *shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    mask = torch.rand(offset_batch, 9, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(batch, 6, *shape, generator=g, dtype=torch.float64)

    def run(fn) -> list[torch.Tensor]:
        for t in (x, off, mask, w):
            t.grad = None
        y = fn()
        y.backward(up)
        return [y.detach(), *(t.grad.clone() for t in (x, off, mask, w))]

    ref = run(lambda: deform_conv3x3_sampling(x, off, w, mask))
    for rows in (1, 3, 8):
        got = run(lambda rows=rows: s3_ops.deform_conv3x3_banded(x, off, w, mask, rows))
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
