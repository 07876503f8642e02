"""One contract for every registered network: shapes, training step, save/load, determinism.

Runs over ``list_models()``, so a network added later is checked without editing this file
(add a small config below to keep it fast).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medseg as nms

SMALL: dict[str, dict] = {
    "sts-net": {"input_size": 32, "decoder_channels": 32},
    "ms-lkseg": {"widths": [8, 8, 16, 16, 16], "input_size": 32},
    "s3-net": {"max_iter": 3, "working_size": 32, "channels": 8},
    "hf-sam": {
        "backbone": "sam_vit_b",
        "weights": "none",
        "input_size": 64,
        "vit_overrides": {
            "embed_dim": 32,
            "depth": 4,
            "num_heads": 2,
            "global_attn_indexes": [1, 3],
            "window_size": 2,
        },
    },
    "efs-medseg": {"widths": [4, 8, 16], "patch_voxels": 8 * 24 * 24},
}


def _data(card):
    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 22) ** 2 + (xx - 26) ** 2 < 110).astype(np.uint8)
    rng = np.random.default_rng(0)
    if card.spatial_dims == 3:
        zz = np.arange(12)[:, None, None]
        lab = (disc[None] * (np.abs(zz - 6) < 4)).astype(np.uint8)
        img = (lab * 80 + rng.normal(0, 5, lab.shape) + 10).astype(np.float32)
        return img, lab
    img = (disc * 120 + rng.normal(0, 6, disc.shape) + 30).clip(0, 255).astype(np.uint8)
    return img, disc


def _train(seg, img, lab):
    last = None
    for p in seg.finetune(img, lab, steps=2, seed=0, batch_size=1, val_every=1):
        last = p
    return last


@pytest.mark.parametrize("name", nms.list_models())
def test_network_contract(name, tmp_path):
    card = nms.model_card(name)
    assert card.name == name and card.spatial_dims in (2, 3) and card.paper and card.doi
    with pytest.raises(TypeError, match="unknown option"):
        nms.load_model(name, device="cpu", not_an_option=1)
    seg = nms.load_model(name, device="cpu", **SMALL.get(name, {}))
    img, lab = _data(card)
    if card.trainable:
        before = {k: v.clone() for k, v in seg.checkpoint_tensors().items()}
        last = _train(seg, img, lab)
        assert last.done and np.isfinite(last.loss)
        after = seg.checkpoint_tensors()
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after), "no weight changed"
    out = seg.segment(img, allow_untrained=True)
    assert out.shape == img.shape and out.dtype.kind in "iu" and out.min() >= 0
    if card.output == "clusters":
        assert out.min() >= 1
    path = seg.save(tmp_path / f"{name}.safetensors")
    again = nms.load_model(path, device="cpu")
    assert type(again) is type(seg) and again.class_names == seg.class_names
    np.testing.assert_array_equal(again.segment(img, allow_untrained=True), out)
    if card.trainable:
        twin = nms.load_model(name, device="cpu", **SMALL.get(name, {}))
        _train(twin, img, lab)
        for k, v in seg.checkpoint_tensors().items():
            assert torch.equal(v, twin.checkpoint_tensors()[k]), f"{k} differs under the same seed"
    else:
        np.testing.assert_array_equal(seg.segment(img), out)  # per-image optimisation is seeded


def test_registry_lists_the_five_networks():
    assert nms.list_models() == ["efs-medseg", "hf-sam", "ms-lkseg", "s3-net", "sts-net"]
