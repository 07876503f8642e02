"""STS-Net: network shapes and size, engine contract, small-target augmentation, overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medseg as nms
from conftest import disc_image
from napari_medseg.engine.metrics import dice
from napari_medseg.engine.train.small_target import (
    A_COPIES,
    SmallTargetAugment,
    SmallTargetConfig,
    SmallTargetSliceData,
    copy_a,
    copy_b,
)
from napari_medseg.models.sts_net import ECA, ECAResNeXtEncoder, STSNet


# ----------------------------------------------------------------------------- network
def test_parameter_count_matches_release():
    net = STSNet(num_classes=2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net.encoder) == 22_979_904 + 15  # torchvision ResNeXt50 w/o fc + 5 ECA × 3
    assert count(net.decoder) == 16_125_440
    assert count(net.head) == 514
    assert abs(count(net) - 39.1e6) < 0.01e6


def test_output_stride_8_and_dilation():
    enc = ECAResNeXtEncoder().eval()
    with torch.inference_mode():
        feat = enc(torch.zeros(1, 3, 64, 48))
    assert feat.shape == (1, 2048, 8, 6)
    # Every 3x3 conv of stage 4 has dilation 2, of stage 5 dilation 4 (the release's make_dilated).
    assert {m.dilation for m in enc.layer3.modules() if getattr(m, "kernel_size", (1,))[0] == 3} == {(2, 2)}
    assert {m.dilation for m in enc.layer4.modules() if getattr(m, "kernel_size", (1,))[0] == 3} == {(4, 4)}


def test_output_stride_16_option():
    net = STSNet(2, output_stride=16, rates=(6, 12, 18)).eval()
    with torch.inference_mode():
        assert net.encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 4, 4)
        assert net(torch.zeros(1, 3, 64, 32)).shape == (1, 2, 64, 32)
    with pytest.raises(ValueError, match="output_stride"):
        STSNet(2, output_stride=32)


def test_eca_applies_shared_conv_twice():
    eca = ECA()
    with torch.no_grad():
        eca.conv.weight.copy_(torch.tensor([[[0.0, 1.0, 0.0]]]))  # identity kernel
    x = torch.randn(2, 5, 3, 3)
    expected = x * torch.sigmoid(x.mean((2, 3)))[:, :, None, None]
    assert torch.allclose(eca(x), expected, atol=1e-6)
    assert sum(p.numel() for p in eca.parameters()) == 3


@pytest.mark.parametrize("in_channels,classes", [(3, 2), (1, 4)])
def test_shapes_and_backward(in_channels, classes):
    torch.manual_seed(0)
    net = STSNet(num_classes=classes, in_channels=in_channels)
    x = torch.randn(2, in_channels, 32, 40, requires_grad=True)
    y = net(x)
    assert y.shape == (2, classes, 32, 40)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert net.encoder.conv1.weight.grad is not None and net.encoder.eca[0].conv.weight.grad is not None
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, in_channels, 30, 32))


def test_batch_of_one_trains():
    net = STSNet(2).train()
    net(torch.randn(1, 3, 32, 32)).mean().backward()  # image-pooling BN must not raise


def test_imagenet_loader_accepts_torchvision_layout():
    from torchvision.models import resnext50_32x4d

    state = resnext50_32x4d().state_dict()  # random weights in torchvision's key layout
    enc = ECAResNeXtEncoder(in_channels=1)
    enc.load_imagenet(state)
    assert torch.allclose(enc.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(enc.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


# ----------------------------------------------------------------------------- engine
def test_registered_card():
    assert "sts-net" in nms.list_models()
    card = nms.model_card("sts-net")
    assert card.spatial_dims == 2 and card.needs_labels and card.trainable and not card.promptable
    seg = nms.load_model("sts-net", device="cpu")
    assert seg.config["in_channels"] == 3 and seg.config["loss"] == "ce" and not seg.config["pretrained"]
    assert seg.input_size == 256 and seg.num_classes == 2
    defaults = seg.train_defaults()
    assert defaults["optimizer"] == "adamw" and defaults["lr"] == 1e-4 and defaults["schedule"] == "cosine"


def test_network_input_is_imagenet_normalised_grey_repeated():
    seg = nms.load_model("sts-net", device="cpu")
    x = torch.full((1, 1, 8, 8), 0.5)
    y = seg.network_input(x)
    assert y.shape == (1, 3, 8, 8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(y[0, :, 0, 0], (0.5 - mean) / std)


def test_untrained_refuses_and_segments_shape():
    seg = nms.load_model("sts-net", device="cpu", input_size=32)
    image = np.random.default_rng(0).integers(0, 255, (2, 37, 45), dtype=np.uint8)
    from napari_medseg.engine.segmenter import NotTrainedError

    with pytest.raises(NotTrainedError):
        seg.segment(image)
    out = seg.segment(image, allow_untrained=True)
    assert out.shape == (2, 37, 45) and out.dtype == np.int32 and set(np.unique(out)) <= {0, 1}


def test_save_load_round_trip_bit_exact(tmp_path):
    torch.manual_seed(1)
    seg = nms.load_model("sts-net", device="cpu", input_size=32, class_names=["bg", "a", "b"])
    seg.trained = True
    path = seg.save(tmp_path / "sts.safetensors")
    again = nms.load_model(path, device="cpu")
    assert again.config == seg.config and again.class_names == ["bg", "a", "b"] and again.trained
    a, b = seg.checkpoint_tensors(), again.checkpoint_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = np.random.default_rng(2).random((40, 40)).astype(np.float32)
    assert np.array_equal(seg.segment(image), again.segment(image))


def test_pretrained_flag_never_downloads_in_tests(tmp_path):
    from napari_medseg.engine.weights import WeightsUnavailable

    # conftest points NAPARI_MEDSEG_WEIGHTS at an empty folder and there is no network: the
    # flag must go through the weights registry and fail with its message, not silently.
    with pytest.raises((WeightsUnavailable, ValueError)):
        nms.load_model("sts-net", device="cpu", pretrained=True)


def test_checkpoint_of_pretrained_model_loads_offline(tmp_path):
    seg = nms.load_model("sts-net", device="cpu", input_size=32)
    seg.config["pretrained"] = True  # as if trained from ImageNet weights
    seg.trained = True
    path = seg.save(tmp_path / "p.safetensors")
    again = nms.load_model(path, device="cpu")  # must not fetch the ImageNet file
    assert again.config["pretrained"] is True


# ----------------------------------------------------------------------------- small targets
def _small_case(size: int = 96, cy: int = 10, cx: int = 80, r: int = 2):
    yy, xx = np.mgrid[:size, :size]
    label = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).astype(np.int64)
    image = np.stack([label * 0.8 + 0.1] * 3).astype(np.float32)
    return image, label


def test_thresholds_are_relative_to_size():
    cfg = SmallTargetConfig()
    for size in (120, 480, 960):
        lab = np.zeros((size, size), np.int64)
        side = int(np.sqrt(800 / 480**2) * size)  # ~800 px at 480²
        lab[:side, :side] = 1
        assert cfg.is_small(lab)
        lab[: size // 4, : size // 4] = 1  # 6 % of the slice
        assert not cfg.is_small(lab)
    assert not cfg.is_small(np.zeros((480, 480)))
    assert SmallTargetConfig.from_extra({"small_target": False}).weights(_small_case()[1]) == (0, 0)


def test_copy_a_keeps_small_object_inside_and_grows_it():
    image, label = _small_case()  # object near the top-right corner, outside a plain centre crop
    n0 = label.sum()
    for i, (_, my, mx) in enumerate(A_COPIES):
        img2, lab2 = copy_a(image, label, i)
        assert img2.shape == image.shape and lab2.shape == label.shape
        assert lab2.sum() > 0, f"copy {i} lost the object"
        if my and mx:
            assert lab2.sum() > n0, f"copy {i} did not zoom the object"
        # image and label stay aligned: the object is bright in the image
        assert img2[0][lab2 > 0].mean() > 0.5


def test_copy_b_centres_and_zooms():
    image, label = _small_case(cy=40, cx=50)
    rng = np.random.default_rng(0)
    cfg = SmallTargetConfig()
    for _ in range(5):
        img2, lab2 = copy_b(image, label, rng, cfg)
        ys, xs = np.nonzero(lab2)
        assert lab2.sum() > 1.5 * label.sum()
        assert abs(ys.mean() - 48) < 8 and abs(xs.mean() - 48) < 8  # lesion now central


def test_augment_draws_original_and_copies_and_sampler_oversamples(tmp_path):
    from napari_medseg.engine.train.options import TrainOptions

    image, label = _small_case()
    aug = SmallTargetAugment(SmallTargetConfig())
    rng = np.random.default_rng(0)
    sums = [aug(image, label, rng)[1].sum() for _ in range(60)]
    assert min(sums) >= label.sum() and max(sums) > label.sum() and label.sum() in sums

    big = np.zeros((96, 96), np.int64)
    big[20:70, 20:70] = 1
    seg = nms.load_model("sts-net", device="cpu", input_size=96)
    opts = TrainOptions(steps=1, val_fraction=0.0)
    imgs = [image[0], image[0], big * 0.5 + 0.2, big * 0.4 + 0.2]
    labs = [label, label, big, big]  # one slice is held out for validation, 3 stay
    data = SmallTargetSliceData.build(seg, imgs, labs, None, opts, SmallTargetConfig())
    counts = np.bincount(data._indices, minlength=len(data.train))
    expected = [1 + 15 + 1 if lab.sum() < 200 else 1 + 1 for _, lab in data.train]
    assert len(data.train) == 3 and {17, 2} <= set(expected)
    assert counts.tolist() == expected and len(data) == sum(expected)
    off = SmallTargetSliceData.build(seg, imgs, labs, None, opts, SmallTargetConfig(enabled=False))
    assert len(off) == len(off.train)


def test_unknown_small_target_option_is_rejected():
    with pytest.raises(ValueError, match="unknown small-target"):
        SmallTargetConfig.from_extra({"small_target_foo": 1})
    cfg = SmallTargetConfig.from_extra({"small_target": {"b_enabled": False}, "small_target_a_copies": 4})
    assert cfg.enabled and not cfg.b_enabled and cfg.a_copies == 4


# ----------------------------------------------------------------------------- training
def test_loss_falls_on_one_image():
    """Fast stand-in for the overfit test: the shared loop drives the CE loss down."""
    image, mask = disc_image(32, radius=9, center=(15, 17))
    seg = nms.load_model("sts-net", device="cpu", input_size=32)
    opts = {"seed": 0, "lr": 1e-3, "batch_size": 2, "augment": "none", "schedule": "constant"}
    records = list(seg.finetune(image, mask, steps=5, small_target=False, **opts))
    assert records[-1].done and seg.trained
    assert np.mean([r.loss for r in records[-2:]]) < 0.7 * records[0].loss


@pytest.mark.slow
def test_overfit_one_image():
    image, mask = disc_image(64, radius=14)
    seg = nms.load_model("sts-net", device="cpu", input_size=64)
    steps = 100
    records = list(
        seg.finetune(
            image,
            mask,
            steps=steps,
            seed=0,
            lr=1e-3,
            batch_size=2,
            augment="none",
            small_target=False,
            val_every=steps,
        )
    )
    assert records[-1].done and np.isfinite(records[-1].loss)
    assert dice(seg.segment(image) == 1, mask == 1) >= 0.95


def test_finetune_with_small_target_runs():
    image, mask = _small_case(32, cy=10, cx=20, r=2)
    seg = nms.load_model("sts-net", device="cpu", input_size=32)
    records = list(seg.finetune(image[0], mask, steps=1, seed=0, batch_size=2, loss="dice_ce"))
    assert records[-1].done and seg.trained
    assert seg.config["loss"] == "dice_ce" and set(records[-1].terms) == {"ce", "dice"}
    # BatchNorm statistics were re-estimated (reset, then 4 batches) before the validation
    assert int(seg.module.encoder.bn1.num_batches_tracked) == 4
