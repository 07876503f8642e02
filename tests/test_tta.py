"""Test-time mirrored views (engine/tta.py) and HF-SAM's ``tta`` option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medseg as nms
from napari_medseg.engine.tta import flip_averaged_logits, resolve_views, views_for_orientation
from test_hf_sam import disc_image, finetune_disc, tiny


def lopsided(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 2, H, W) scores that depend on position (not mirror-symmetric)."""
    ramp = torch.linspace(0, 3, x.shape[-1])
    fg = x.mean(1) * 4 + ramp + 0.5 * torch.linspace(0, 1, x.shape[-2])[:, None]
    return torch.stack([torch.zeros_like(fg), fg], 1)


def test_one_view_is_the_network_itself():
    x = torch.rand(2, 3, 8, 10)
    torch.testing.assert_close(flip_averaged_logits(lopsided, x, 1), lopsided(x), atol=0, rtol=0)


@pytest.mark.parametrize("views", [2, 4])
def test_views_average_probabilities_mapped_back(views):
    x = torch.rand(1, 3, 8, 10)
    got = flip_averaged_logits(lopsided, x, views).exp()
    # By hand: probabilities of the mirrored inputs, mirrored back, averaged.
    flips = [(), (-1,), (-2,), (-2, -1)][:views]
    want = sum((lopsided(x.flip(d)).flip(d) if d else lopsided(x)).softmax(1) for d in flips) / views
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, lopsided(x).softmax(1), atol=1e-3)  # the views did change it


def test_mirror_symmetric_network_is_unchanged():
    """A network that answers a mirrored image with the mirrored answer gains nothing, loses nothing."""
    conv = torch.nn.Conv2d(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        w = conv.weight
        conv.weight.copy_(w + w.flip(-1) + w.flip(-2) + w.flip(-2, -1))
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            flip_averaged_logits(conv, x, 4), conv(x).log_softmax(1), atol=1e-5, rtol=1e-5
        )


def test_bad_view_count_is_refused():
    with pytest.raises(ValueError, match="one of"):
        flip_averaged_logits(lopsided, torch.rand(1, 3, 4, 4), 3)


def test_auto_takes_what_training_stored():
    assert resolve_views("auto", None) == 1  # models saved before the option
    assert resolve_views("auto", 4) == 4 and resolve_views(2, 4) == 2 and resolve_views(0, None) == 1


def test_orientation_decides_the_views():
    assert views_for_orientation("upright") == 2
    assert views_for_orientation("any") == 4


def test_hf_sam_training_sets_views_and_keeps_them(tmp_path):
    seg = tiny("sam_vit_b", lora_rank=2)
    assert seg.test_time_views() == 1  # untrained, and checkpoints saved before the option
    finetune_disc(seg, steps=1, lr=1e-2)  # grayscale discs: auto = upright
    assert seg.config["tta_views"] == 2 and seg.test_time_views() == 2
    img, _ = disc_image()
    x = torch.from_numpy(np.stack([img] * 3)[None])
    seg.module.eval()
    with torch.inference_mode():
        one = seg.validation_logits(x)
        torch.testing.assert_close(seg.logits(x), flip_averaged_logits(seg.validation_logits, x, 2))
        seg.config["tta"] = 1
        torch.testing.assert_close(seg.logits(x), one, atol=0, rtol=0)
    seg.config["tta"] = "auto"
    back = nms.load_model(seg.save(tmp_path / "hf.safetensors"), device="cpu")
    assert back.test_time_views() == 2
    assert nms.load_model(tmp_path / "hf.safetensors", device="cpu", tta=4).test_time_views() == 4


def test_hf_sam_kept_weights_do_not_depend_on_tta():
    """Validation scores one view, so the option changes inference only, never training."""
    a, b = tiny("sam_vit_b", lora_rank=2), tiny("sam_vit_b", lora_rank=2, tta=4)
    ra, rb = finetune_disc(a, steps=2, lr=1e-2), finetune_disc(b, steps=2, lr=1e-2)
    assert [r.metrics.get("val_dice") for r in ra] == [r.metrics.get("val_dice") for r in rb]
    for k, v in a.checkpoint_tensors().items():
        torch.testing.assert_close(b.checkpoint_tensors()[k], v, atol=0, rtol=0)
