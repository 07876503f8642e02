"""The shared training loop, on the toy network: learning, reproducibility, cancel, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medseg as nms
from conftest import disc_image
from napari_medseg.engine.metrics import dice
from napari_medseg.engine.train.data import TrainingDataError


def _run(gen):
    last = None
    for p in gen:
        last = p
    return last


def test_overfit_one_image(toy_registered):
    seg = toy_registered(device="cpu")
    image, mask = disc_image()
    last = _run(seg.finetune(image, mask, steps=80, seed=0, augment="none"))
    assert last.done and last.step == 80 and last.total == 80
    assert "augmented views" in last.message  # one labeled slice → validation on augmented views
    assert dice(seg.segment(image) == 1, mask == 1) >= 0.95


def test_same_seed_same_weights(toy_registered):
    image, mask = disc_image()
    weights = []
    for _ in range(2):
        seg = toy_registered(device="cpu")
        _run(seg.finetune(image, mask, steps=5, seed=3))
        weights.append(seg.checkpoint_tensors())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_validation_never_empty(toy_registered):
    from napari_medseg.engine.train.data import SliceData
    from napari_medseg.engine.train.options import TrainOptions

    seg = toy_registered(device="cpu")
    images, labels = zip(*[disc_image(seed=i) for i in range(3)])
    vol, lab = np.stack(images), np.stack(labels)
    lab[1] = 0  # one unpainted slice → unlabeled
    for frac in (0.0, 0.1, 0.5, 0.9):
        data = SliceData.from_arrays(seg, vol, lab, None, TrainOptions(steps=1, val_fraction=frac))
        assert len(data.val) >= 1 and len(data.train) >= 1
        assert len(data.train) + len(data.val) == 2 and len(data.unlabeled) == 1


def test_cancel_keeps_loadable_best_checkpoint(toy_registered, tmp_path):
    seg = toy_registered(device="cpu")
    image, mask = disc_image()
    path = tmp_path / "best.safetensors"
    gen = seg.finetune(image, mask, steps=100, val_every=2, checkpoint=str(path))
    for p in gen:
        if p.step == 7:
            break
    gen.close()  # what the widget's Cancel does
    again = nms.load_model(path, device="cpu")
    assert again.trained and again.provenance["step"] in (2, 4, 6)
    assert seg.trained


def test_resume_continues_step_count(toy_registered, tmp_path):
    path = tmp_path / "r.safetensors"
    image, mask = disc_image()
    seg = toy_registered(device="cpu")
    _run(seg.finetune(image, mask, steps=4, val_every=2, checkpoint=str(path)))
    saved_at = nms.load_model(path).provenance["step"]
    assert saved_at in (2, 4)
    seg2 = toy_registered(device="cpu")
    first = next(iter(seg2.finetune(image, mask, steps=6, val_every=2, checkpoint=str(path), resume=True)))
    assert first.step == saved_at + 1


@pytest.mark.parametrize(
    "labels,match",
    [
        (np.zeros((64, 64), np.uint8), "no label painted"),
        (np.ones((60, 64), np.uint8), "do not match"),
        (np.full((64, 64), 200, np.uint8), "at most"),
        (np.full((64, 64), -1, np.int16), "negative"),
    ],
)
def test_bad_training_input(toy_registered, labels, match):
    seg = toy_registered(device="cpu")
    image, _ = disc_image()
    with pytest.raises(TrainingDataError, match=match):
        next(iter(seg.finetune(image, labels, steps=2)))


def test_untrained_network_refuses_to_segment(toy_registered):
    from napari_medseg.engine.segmenter import NotTrainedError

    seg = toy_registered(device="cpu")
    with pytest.raises(NotTrainedError, match="fine-tune it"):
        seg.segment(disc_image()[0])


def test_multi_class_from_labels(toy_registered):
    seg = toy_registered(device="cpu")
    image, mask = disc_image()
    lab = mask.copy()
    lab[:10, :10] = 2
    _run(seg.finetune(image, lab, steps=2, class_names=["disc", "corner"]))
    assert seg.class_names == ["background", "disc", "corner"] and seg.num_classes == 3


@pytest.mark.parametrize("cpu_amp", [False, True])
def test_cpu_amp_runs_the_loss_under_bf16_autocast(toy_registered, monkeypatch, cpu_amp):
    """``cpu_amp`` puts the training step (not validation) under bfloat16 autocast on a CPU."""
    seg = toy_registered(device="cpu")
    image, mask = disc_image()
    seen = []
    loss_fn = seg.training_loss

    def spy(module, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return loss_fn(module, batch)

    monkeypatch.setattr(seg, "training_loss", spy)
    last = _run(seg.finetune(image, mask, steps=80, seed=0, augment="none", cpu_amp=cpu_amp))
    assert seen and all(s == cpu_amp for s in seen)
    # Weights stay float32 and still learn the disc under bf16.
    assert all(v.dtype == torch.float32 for v in seg.checkpoint_tensors().values() if v.is_floating_point())
    assert last.done and dice(seg.segment(image) == 1, mask == 1) >= 0.9


def test_weight_average_follows_the_live_weights_and_swaps_back():
    from napari_medseg.engine.train.weight_average import WeightAverage

    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.0)
    avg = WeightAverage(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    avg.update()  # first update keeps min(0.5, 2 / 11) of the average: 0 -> 9/11
    np.testing.assert_allclose(avg.average["weight"].numpy(), 9 / 11, rtol=1e-6)
    avg.update()  # then min(0.5, 3 / 12) = 0.25 of it
    np.testing.assert_allclose(avg.average["weight"].numpy(), 0.25 * 9 / 11 + 0.75, rtol=1e-6)
    with avg.applied():
        np.testing.assert_allclose(net.weight.detach().numpy(), 0.25 * 9 / 11 + 0.75, rtol=1e-6)
    np.testing.assert_array_equal(net.weight.detach().numpy(), 1.0)  # live weights back
    with pytest.raises(ValueError, match="ema"):
        WeightAverage(net, 1.0)
    # Only the optimised parameters and the buffers are averaged (a frozen encoder is not copied).
    both = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    part = WeightAverage(both, 0.9, params=[both[0].weight])
    assert set(part.average) == {"0.weight", "1.running_mean", "1.running_var"}


def test_ema_training_keeps_the_averaged_weights(toy_registered):
    image, mask = disc_image()
    plain, averaged = toy_registered(device="cpu"), toy_registered(device="cpu")
    _run(plain.finetune(image, mask, steps=80, seed=0, augment="none"))
    last = _run(averaged.finetune(image, mask, steps=80, seed=0, augment="none", ema=0.9))
    # Same data and seed: only the kept weights differ, and the averaged ones still learned.
    differ = [
        k
        for k, v in plain.checkpoint_tensors().items()
        if not torch.equal(v, averaged.checkpoint_tensors()[k])
    ]
    assert differ
    assert last.best >= 0.85  # validation on augmented views of the one image
    assert dice(averaged.segment(image) == 1, mask == 1) >= 0.95
    with pytest.raises(ValueError, match="ema"):
        _run(toy_registered(device="cpu").finetune(image, mask, steps=2, ema=1.5))


def test_soft_dice_denominator_forms_match_hand_computation() -> None:
    """Squared (V-Net / SAMed) and plain (nnU-Net) soft Dice on a case computed by hand."""
    from napari_medseg.engine.train.losses import segmentation_loss, soft_dice_loss

    # Two classes, four pixels; probabilities of class 1: 0.9, 0.6, 0.2, 0.1, truth 1, 1, 0, 0.
    p1 = torch.tensor([0.9, 0.6, 0.2, 0.1])
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))])[None]  # (1, 2, 4)
    labels = torch.tensor([[1, 1, 0, 0]])
    inter = 0.9 + 0.6
    plain = 1 - 2 * inter / (p1.sum() + 2)
    squared = 1 - 2 * inter / ((p1**2).sum() + 2)
    got_plain = soft_dice_loss(logits, labels, include_background=False, eps=0, squared=False)
    got_sq = soft_dice_loss(logits, labels, include_background=False, eps=0)
    assert torch.allclose(got_plain, plain, atol=1e-6) and torch.allclose(got_sq, squared, atol=1e-6)
    assert not torch.allclose(got_plain, got_sq)
    # The named loss passes the form through (CE is the same in both).
    a, ta = segmentation_loss(logits, labels, "dice_ce", squared_dice=False)
    b, tb = segmentation_loss(logits, labels, "dice_ce")
    assert ta["ce"] == tb["ce"] and abs((a - b).item() - (got_plain - got_sq).item()) < 1e-4
