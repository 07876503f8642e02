"""MS-LKSeg: blocks (MIE, MIDM, dynamic conv, LD re-parameterisation), engine contract, overfit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import napari_medseg as nms
from napari_medseg.engine.metrics import dice
from napari_medseg.engine.segmenter import NotTrainedError
from napari_medseg.models.ms_lkseg import MSLKSeg
from napari_medseg.models.ms_lkseg_blocks import MIDM, MIE, DynamicConv2d, LDBlock, ReparamDWConv

TINY = {"widths": [8, 8, 16, 16, 16], "input_size": 32}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP contention on the shared 2-core machine (~7x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


def _disc(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    label = ((yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.25) ** 2).astype(np.uint8)
    image = (0.3 + 0.4 * label + 0.05 * rng.standard_normal((size, size))).clip(0, 1)
    return (image * 255).astype(np.uint8), label


# ------------------------------------------------------------------ MIE / MIDM / DyConv
def test_mie_gates_shape_range_and_product() -> None:
    torch.manual_seed(0)
    mie = MIE(16, (3, 5, 7, 9))
    x = torch.randn(2, 16, 12, 20)
    with torch.no_grad():
        a_h, a_w = mie.gates(x)
    assert a_h.shape == (2, 16, 12, 1) and a_w.shape == (2, 16, 1, 20)
    for a in (a_h, a_w):
        assert float(a.min()) > 0 and float(a.max()) < 1
        assert torch.allclose(mie(x), x * a_h * a_w)
    # one set of four 1-D kernels (4 channels per group), shared by the H and the W branch
    assert sum(p.numel() for p in mie.weights) == 4 * (3 + 5 + 7 + 9)


def test_mie_matches_grouped_conv1d_reference() -> None:
    torch.manual_seed(1)
    mie = MIE(8, (3, 5, 7, 9))
    with torch.no_grad():
        mie.bias.copy_(torch.randn(8))
    x = torch.randn(1, 8, 9, 11)

    def ref(profile: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
        parts = torch.split(profile, 2, dim=1)
        bias = torch.split(mie.bias, 2)
        outs = [
            F.conv1d(p, w, b, padding=w.shape[-1] // 2, groups=2) for p, w, b in zip(parts, mie.weights, bias)
        ]
        return torch.sigmoid(norm(torch.cat(outs, 1)))

    a_h, a_w = mie.gates(x)
    assert torch.allclose(a_h[..., 0], ref(x.mean(3), mie.norm_h), atol=1e-6)
    assert torch.allclose(a_w[:, :, 0], ref(x.mean(2), mie.norm_w), atol=1e-6)


def test_midm_gate_matches_naive_channel_attention() -> None:
    torch.manual_seed(2)
    midm = MIDM(8, heads=2, window=7)
    x = torch.randn(2, 8, 21, 14)
    with torch.no_grad():
        gate = midm.gate(x)
    assert gate.shape == (2, 8, 1, 1)
    assert float(gate.min()) > 0 and float(gate.max()) < 1
    with torch.no_grad():
        assert torch.allclose(midm(x), x * gate)
    # naive reference: pool 7x7, GN(1), per-channel scales, per-head softmax over channels
    y = midm.norm(F.avg_pool2d(x, 7, 7))
    q, k, v = (f(y).flatten(2) for f in (midm.q, midm.k, midm.v))  # (B, C, N)
    out = torch.empty(2, 8)
    for b in range(2):
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            a = torch.softmax(q[b, sl] @ k[b, sl].T / 2.0, dim=-1)  # head dim 4 → scale 1/2
            out[b, sl] = (a @ v[b, sl]).mean(1)
    assert torch.allclose(gate.flatten(1), torch.sigmoid(out), atol=1e-6)


def test_midm_small_feature_and_bad_heads() -> None:
    midm = MIDM(8, heads=4, window=7)
    assert midm(torch.randn(1, 8, 3, 5)).shape == (1, 8, 3, 5)
    with pytest.raises(ValueError):
        MIDM(8, heads=3)
    with pytest.raises(ValueError):
        MIE(10, (3, 5, 7, 9))


def test_dynamic_conv_per_sample_kernels() -> None:
    torch.manual_seed(3)
    conv = DynamicConv2d(4, 6, 3, num_kernels=3)
    x = torch.randn(3, 4, 10, 10)
    together = conv(x)
    alone = torch.cat([conv(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)
    alpha = conv.routing_weights(x)
    assert torch.allclose(alpha.sum(1), torch.ones(3))
    # all experts equal → an ordinary convolution with that kernel
    with torch.no_grad():
        conv.weight.copy_(conv.weight[:1].expand_as(conv.weight))
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight[0], padding=1), atol=1e-5)


# ------------------------------------------------------------------ re-parameterisation
def test_reparam_dwconv_and_ld_block_fuse() -> None:
    torch.manual_seed(4)
    dw = ReparamDWConv(6, 21, 3)
    ld = LDBlock(6, 21, 3)
    for m in (dw, ld):
        _randomise_bn(m)
        m.eval()
    x = torch.randn(2, 6, 24, 30)
    with torch.no_grad():
        ref_dw, ref_ld = dw(x), ld(x)
        dw.fuse()
        ld.fuse()
        assert dw.fused is not None and dw.fused.kernel_size == (21, 21) and dw.small is None
        assert ld.is_fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in ld.modules())
        assert (dw(x) - ref_dw).abs().max() < 1e-4
        assert (ld(x) - ref_ld).abs().max() < 1e-4


def test_model_fused_matches_unfused_in_eval() -> None:
    torch.manual_seed(5)
    net = MSLKSeg(3, 3, widths=(8, 8, 16, 16, 16))
    net.train()
    x = torch.rand(2, 3, 40, 36)
    with torch.no_grad():
        for _ in range(3):  # non-trivial BN running statistics
            net(x)
    _randomise_bn(net.skips, seed=1)
    net.eval()
    with torch.no_grad():
        ref = net(x)
        fused = copy.deepcopy(net).fuse()
        out = fused(x)
    assert ref.shape == (2, 3, 40, 36)
    assert fused.is_fused and not net.is_fused
    assert (out - ref).abs().max() < 1e-4


# ------------------------------------------------------------------ engine contract
def test_registered_card() -> None:
    assert "ms-lkseg" in nms.list_models()
    card = nms.model_card("ms-lkseg")
    assert card.spatial_dims == 2 and card.needs_labels and card.trainable and not card.promptable


def test_contract_segment_backward_save_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(6)
    seg = nms.load_model("ms-lkseg", device="cpu", **TINY)
    image, _ = _disc(48)
    with pytest.raises(NotTrainedError):
        seg.segment(image)
    labels = seg.segment(image, allow_untrained=True)
    assert labels.shape == image.shape and labels.dtype == np.int32
    vol = seg.segment(np.stack([image, image[::-1]]), allow_untrained=True)
    assert vol.shape == (2, 48, 48)

    x = torch.rand(2, 1, 32, 32)
    seg.module.train()
    out = seg.logits(x)
    assert out.shape == (2, 2, 32, 32)
    out.sum().backward()
    assert all(p.grad is not None for p in seg.module.parameters())
    seg.module.eval()

    _randomise_bn(seg.module, seed=3)
    seg.trained = True
    with torch.no_grad():
        before = seg.logits(x)
    path = seg.save(tmp_path / "m.safetensors")
    assert not any(".dw.fused." in k for k in seg.checkpoint_tensors())  # training form saved
    loaded = nms.load_model(path, device="cpu")
    assert loaded.config["widths"] == TINY["widths"] and loaded.trained
    with torch.no_grad():
        after = loaded.logits(x)
    assert torch.allclose(before, after, atol=1e-6)
    np.testing.assert_array_equal(loaded.segment(image), seg.segment(image))


def test_fused_inference_cache_follows_weights() -> None:
    torch.manual_seed(7)
    seg = nms.load_model("ms-lkseg", device="cpu", **TINY)
    seg.module.eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a = seg.logits(x)
        assert seg.inference_module() is not seg.module  # a fused copy runs inference
        assert torch.allclose(a, seg.module(x), atol=1e-4)
        seg.module.head.bias.add_(1.0)
        b = seg.logits(x)
    assert torch.allclose(b, seg.module(x), atol=1e-4) and not torch.allclose(a, b)


def test_module_fused_by_hand_still_saves_and_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seg = nms.load_model("ms-lkseg", device="cpu", **TINY)
    seg.module.fuse()
    seg.trained = True
    path = seg.save(tmp_path / "fused.safetensors")
    loaded = nms.load_model(path, device="cpu")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.logits(x), seg.logits(x), atol=1e-6)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(8)
    a = nms.load_model("ms-lkseg", device="cpu", **TINY)
    torch.manual_seed(8)
    b = nms.load_model("ms-lkseg", device="cpu", **TINY)
    for (ka, va), (kb, vb) in zip(a.checkpoint_tensors().items(), b.checkpoint_tensors().items()):
        assert ka == kb and torch.equal(va, vb)


# ------------------------------------------------------------------ training
def test_overfit_one_image() -> None:
    image, label = _disc(32)
    seg = nms.load_model("ms-lkseg", device="cpu", **TINY)
    records = list(seg.finetune(image, label, steps=80, augment="none", lr=5e-3, batch_size=2, seed=0))
    assert records[-1].done and seg.trained
    pred = seg.segment(image)
    assert dice(pred == 1, label == 1) >= 0.95, dice(pred == 1, label == 1)
