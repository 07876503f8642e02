"""2-D training views: orientation rule, HF-SAM's paper views, label alignment."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import disc_image
from napari_medseg.engine.image import is_colour
from napari_medseg.engine.train.augment import (
    apply_chain,
    crop_zoom,
    elastic,
    generic_transforms,
    sam_paper_transform,
)
from napari_medseg.engine.train.data import SliceData
from napari_medseg.engine.train.options import TrainOptions


def _stacked_pair(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 directly above class 2 in the upper part; the image equals the labels."""
    label = np.zeros((size, size), np.int64)
    label[8:18, 30:56] = 1
    label[18:28, 30:56] = 2
    return np.repeat(label[None].astype(np.float32), 3, axis=0), label


def _rows_and_col(label: np.ndarray) -> tuple[float, float, float] | None:
    """Mean row of class 1, of class 2, and mean column of both; None if one is missing."""
    one, two = np.argwhere(label == 1), np.argwhere(label == 2)
    if not len(one) or not len(two):
        return None
    return float(one[:, 0].mean()), float(two[:, 0].mean()), float(np.argwhere(label > 0)[:, 1].mean())


@pytest.mark.parametrize("preset", ["light", "default", "shift", "strong", "paper"])
def test_upright_views_keep_the_top_on_top(preset):
    image, label = _stacked_pair()
    views = {}
    for orientation in ("upright", "any"):
        rng = np.random.default_rng(0)
        chain = generic_transforms(preset, orientation)
        found = [_rows_and_col(apply_chain(chain, image, label, rng)[1]) for _ in range(40)]
        views[orientation] = [f for f in found if f is not None]
    assert len(views["upright"]) > 10
    # Never turned over: class 1 stays above class 2 (no quarter turn, no up-down flip) ...
    assert all(r1 < r2 for r1, r2, _ in views["upright"])
    # ... but mirrored left-right.
    cols = [c for _, _, c in views["upright"]]
    assert min(cols) < 32 < max(cols)
    # The eight-view default does turn images over.
    assert any(r1 >= r2 for r1, r2, _ in views["any"])


@pytest.mark.parametrize(
    "view",
    [
        lambda im, lab, rng: crop_zoom(im, lab, 0.5, (0.3, 0.6)),
        lambda im, lab, rng: elastic(im, lab, 0.04, rng),
        sam_paper_transform,
    ],
)
def test_paper_views_keep_labels_on_their_image(view):
    image, label = disc_image(size=64, radius=14.0, center=(30.0, 34.0))
    mask = label.astype(np.int64)
    stacked = np.repeat(mask[None].astype(np.float32), 3, axis=0)  # the image *is* the mask
    rng = np.random.default_rng(3)
    for _ in range(20):
        im, lab = view(stacked, mask, rng)
        assert im.shape == stacked.shape and lab.shape == mask.shape and lab.dtype == mask.dtype
        agree = np.mean((im[0] > 0.5) == (lab > 0))
        assert agree > 0.97


def test_shift_preset_moves_objects_with_their_labels():
    image, label = disc_image(size=64, radius=8.0, center=(32.0, 32.0))
    mask = label.astype(np.int64)
    stacked = np.repeat(mask[None].astype(np.float32), 3, axis=0)  # the image *is* the mask
    centres = {}
    for preset in ("default", "shift"):
        rng = np.random.default_rng(5)
        found = []
        for _ in range(60):
            im, lab = apply_chain(generic_transforms(preset, "upright"), stacked, mask, rng)
            assert np.mean((im[0] > 0.5) == (lab > 0)) > 0.97  # the label moves with its object
            if lab.any():
                found.append(np.argwhere(lab > 0).mean(0))
        centres[preset] = np.array(found)
    # The default chain turns and zooms about the centre only: the disc stays centred.
    assert np.abs(centres["default"] - 31.5).max() < 1.5
    # The shift preset moves it by up to 20 % of the side, times the zoom (≤ 1.25): 16 px.
    spread = np.abs(centres["shift"] - 31.5).max(0)
    assert (spread > 6).all() and (spread < 17).all()


def test_crop_zoom_magnifies_and_whole_window_is_identity():
    image, label = _stacked_pair()
    same_im, same_lab = crop_zoom(image, label, 1.0, (0.0, 0.0))
    np.testing.assert_array_equal(same_lab, label)
    np.testing.assert_allclose(same_im, image, atol=1e-6)
    _, zoomed = crop_zoom(image, label, 0.5, (0.0, 1.0))  # the top-right quarter, doubled
    assert zoomed.sum() == pytest.approx(4 * label[:32, 32:].sum(), rel=0.05)


def test_is_colour_treats_gray_saved_as_rgb_as_gray():
    gray = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    assert not is_colour(gray, rgb=False)
    assert not is_colour(np.repeat(gray, 3, axis=1), rgb=True)
    colour = np.repeat(gray, 3, axis=1)
    colour[0, 2, 3, 3] += 0.1
    assert is_colour(colour, rgb=True)


def test_auto_orientation_follows_colour(toy_registered):
    seg = toy_registered(device="cpu")
    image, label = disc_image(seed=1)
    opts = TrainOptions(steps=1, orientation="auto")
    gray = SliceData.from_arrays(seg, image, label, None, opts)
    assert gray.orientation == "upright" and gray.summary()["orientation"] == "upright"
    rgb = np.stack([image, image * 0.5, image * 0.25], axis=-1)
    rgb_opts = TrainOptions(steps=1, orientation="auto", extra={"channel_axis": -1})
    colour = SliceData.from_arrays(seg, rgb, label, None, rgb_opts)
    assert colour.orientation == "any"
    default = SliceData.from_arrays(seg, image, label, None, TrainOptions(steps=1))
    assert default.orientation == "any"  # TrainOptions' own default keeps the eight views


def test_bad_orientation_is_refused():
    with pytest.raises(ValueError, match="orientation"):
        TrainOptions(steps=1, orientation="sideways").check()


def test_hf_sam_keeps_grayscale_views_upright_by_default():
    from napari_medseg.engine.train.options import network_train_defaults

    hf = network_train_defaults("hf-sam")
    assert hf.orientation == "auto" and hf.steps == 100  # 100 steps: docs/models/hf-sam.md
    assert network_train_defaults("sts-net").orientation == "any"
