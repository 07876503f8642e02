"""EFS-MedSeg's atlas↔unlabeled copy-paste term (``copy_paste_weight``), off by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medseg as nms
from napari_medseg.engine.networks.efs_medseg_train import copy_paste_batch
from napari_medseg.engine.registry import segmenter_class
from napari_medseg.engine.train.losses import soft_dice_loss
from napari_medseg.engine.train.options import TrainOptions
from napari_medseg.engine.train.volume_data import VolumeData
from test_efs_medseg import TINY, phantom  # tests/ is on the path (conftest)

CFG = {"pseudo_threshold": 0.8, "copy_paste_pseudo": 0.5}


def _batch(direction: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Atlas patch: image 0, labels 1; unlabeled patch: image 1; cuboid = z < 2, y < 3."""
    shape = (4, 6, 5)
    mask = torch.zeros(1, 1, *shape)
    mask[:, :, :2, :3] = 1.0
    batch = {
        "image": torch.zeros(2, 1, *shape),
        "label": torch.ones(2, *shape, dtype=torch.long),
        "u_image": torch.ones(1, 1, *shape),
        "cp_mask": mask,
        "cp_dir": torch.tensor([direction]),
    }
    # Teacher: class 2 everywhere, confident only where x < 2.
    teacher = torch.zeros(1, 3, *shape)
    teacher[:, 2] = 1.0
    teacher[:, 2, :, :, :2] = 10.0
    return batch, teacher


@pytest.mark.parametrize("direction", [0, 1])
def test_mixed_patch_takes_labels_from_its_own_source(direction: int) -> None:
    batch, teacher = _batch(direction)
    image, target, weight = copy_paste_batch(batch, teacher, CFG)
    cuboid = batch["cp_mask"][0, 0] > 0.5
    from_u = cuboid if direction == 1 else ~cuboid
    assert image.shape == (1, 1, 4, 6, 5) and target.shape == weight.shape == (1, 4, 6, 5)
    # The image is the unlabeled patch (1) exactly where the target is the teacher's class 2.
    assert torch.equal(image[0, 0] == 1.0, from_u)
    assert torch.equal(target[0] == 2, from_u) and torch.equal(target[0] == 1, ~from_u)
    # Atlas voxels weigh 1; pseudo-labeled ones 0.5 where the teacher is confident, else 0.
    confident = torch.zeros_like(from_u)
    confident[:, :, :2] = True
    assert torch.all(weight[0][~from_u] == 1.0)
    assert torch.all(weight[0][from_u & confident] == 0.5)
    assert torch.all(weight[0][from_u & ~confident] == 0.0)


def test_weighted_dice_ignores_zero_weight_voxels() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 4, 6, 5), torch.randint(0, 3, (2, 4, 6, 5))
    for squared in (True, False):
        plain = soft_dice_loss(logits, labels, False, squared=squared)
        ones = soft_dice_loss(logits, labels, False, squared=squared, weight=torch.ones(2, 4, 6, 5))
        assert torch.allclose(plain, ones)
        # Zero weight on the second volume = the first volume alone.
        w = torch.ones(2, 4, 6, 5)
        w[1] = 0
        first = soft_dice_loss(logits[:1], labels[:1], False, squared=squared)
        assert torch.allclose(soft_dice_loss(logits, labels, False, squared=squared, weight=w), first)


def test_copy_paste_is_off_by_default_and_draws_nothing_then() -> None:
    assert segmenter_class("efs-medseg").default_config()["copy_paste_weight"] == 0.0
    (i1, l1), (i2, l2), (u, _) = phantom(0), phantom(1), phantom(2)
    batches = {}
    for weight in (0.0, 1.0):
        seg = nms.load_model("efs-medseg", **TINY, copy_paste_weight=weight)
        data = VolumeData.from_arrays(seg, [i1, i2], [l1, l2], [u], TrainOptions(steps=1))
        batches[weight] = data.sample_batch(np.random.default_rng(0), 2)
    off, on = batches[0.0], batches[1.0]
    assert "cp_mask" not in off and on["cp_mask"].shape == (1, 1, *on["u_image"].shape[2:])
    assert float(on["cp_mask"].max()) == 1.0 and float(on["cp_mask"].min()) == 0.0
    for key in ("image", "label", "u_image"):  # the mask is drawn last: the rest is unchanged
        assert torch.equal(off[key], on[key])


def test_copy_paste_term_trains_end_to_end() -> None:
    torch.manual_seed(0)
    seg = nms.load_model("efs-medseg", **TINY, copy_paste_weight=1.0, pseudo_threshold=0.0)
    (atlas, lab), (u, _) = phantom(0), phantom(2)
    records = list(seg.finetune([atlas], [lab], unlabeled=[u], steps=2, spacing=(2.0, 1.0, 1.0)))
    terms = records[-1].terms
    assert np.isfinite(terms["copy_paste"]) and terms["copy_paste"] > 0
