"""Self-prompted refinement of HF-SAM's prompt-free output (engine/networks/hf_sam_refine.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.engine.networks import hf_sam_refine
from napari_medseg.engine.networks.hf_sam_refine import has_holes, refine_slice, resolve_score_margin
from napari_medseg.engine.prompt import Prompts, mask_box
from test_hf_sam import disc_image, finetune_disc, tiny


def _shrunk_box_answer(calls: list):
    """A fake decoder: the box minus a 4-px rim (differs from every piece it is given)."""

    def decode(box):
        calls.append(box)
        y0, x0, y1, x1 = (int(v) for v in box)
        out = np.zeros((64, 64), dtype=bool)
        out[y0 + 4 : y1 - 3, x0 + 4 : x1 - 3] = True
        return out, 0.9

    return decode


def test_pieces_become_their_box_answers_and_specks_are_dropped():
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:22, 10:22] = 1
    labels[40:50, 38:54] = 1
    labels[2:4, 60:62] = 1  # a 4-pixel speck: below min_pixels and 20 % of the largest piece
    calls: list = []
    out = refine_slice(labels, _shrunk_box_answer(calls))
    assert sorted(calls) == sorted([mask_box(_piece(labels, (15, 15))), mask_box(_piece(labels, (45, 45)))])
    expected = np.zeros((64, 64), dtype=bool)
    for box in calls:
        y0, x0, y1, x1 = (int(v) for v in box)
        expected[y0 + 4 : y1 - 3, x0 + 4 : x1 - 3] = True
    np.testing.assert_array_equal(out == 1, expected)
    assert out.dtype == labels.dtype and not out[2:4, 60:62].any()


def _piece(labels: np.ndarray, yx: tuple[int, int]) -> np.ndarray:
    from scipy import ndimage

    comp, _ = ndimage.label(labels > 0, structure=np.ones((3, 3), bool))
    return comp == comp[yx]


def test_rings_and_empty_answers_keep_the_predicted_piece():
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    ring = (r > 8) & (r < 14)
    assert has_holes(ring) and not has_holes(r < 8)
    labels = np.where(ring, 2, 0).astype(np.int32)
    labels[1:7, 1:7] = 1
    calls: list = []
    out = refine_slice(labels, lambda box: calls.append(box) or (np.zeros((64, 64), dtype=bool), 0.5))
    assert calls == [mask_box(labels == 1)]  # the ring was never sent as a box
    np.testing.assert_array_equal(out, labels)  # the square's empty answer kept the square


def test_pixels_claimed_by_two_classes():
    labels = np.zeros((32, 32), dtype=np.int32)
    labels[8:16, 8:16] = 1
    labels[8:16, 18:26] = 2
    # Both answers cover columns 12..21; rows 8..15 there hold class 1 (12..15), 0 (16..17), 2 (18..21).
    answers = {1: (slice(8, 16), slice(8, 22)), 2: (slice(8, 16), slice(12, 26))}

    def decode(box):
        c = 1 if box[1] < 10 else 2
        m = np.zeros((32, 32), dtype=bool)
        m[answers[c]] = True
        return m, 0.9

    out = refine_slice(labels, decode, min_pixels=4)
    assert (out[8:16, 8:16] == 1).all()  # its own prompt-free class wins
    assert (out[8:16, 16:18] == 1).all()  # unlabelled before: the lower class id
    assert (out[8:16, 18:26] == 2).all()


def test_pieces_scored_clearly_below_their_class_best_are_dropped():
    yy, xx = np.mgrid[:64, :64]
    ring = (np.hypot(yy - 40, xx - 40) > 6) & (np.hypot(yy - 40, xx - 40) < 12)
    labels = np.where(ring, 1, 0).astype(np.int32)
    labels[4:16, 4:16] = 1  # answered with score 0.90
    labels[4:16, 44:58] = 1  # answered with score 0.85
    labels[50:60, 2:12] = 2  # the only piece of class 2: kept whatever its score
    scores = {4: 0.90, 44: 0.85, 2: 0.30}

    def decode(box):
        m = np.zeros((64, 64), dtype=bool)
        y0, x0, y1, x1 = (int(v) for v in box)
        m[y0 + 2 : y1 - 1, x0 + 2 : x1 - 1] = True  # the piece itself (mask_box adds 2 px)
        return m, scores[x0 + 2]

    keep_all = refine_slice(labels, decode, score_margin=None)
    np.testing.assert_array_equal(keep_all, labels)
    np.testing.assert_array_equal(refine_slice(labels, decode, score_margin=0.1), labels)
    out = refine_slice(labels, decode, score_margin=0.02)
    expected = labels.copy()
    expected[4:16, 44:58] = 0  # 0.05 below the class's best answer
    np.testing.assert_array_equal(out, expected)  # the ring (never prompted) and class 2 stay
    # Within reach (0.5 × 64 = 32 px ≥ the 28-px gap) the weaker piece joins the kept one.
    np.testing.assert_array_equal(refine_slice(labels, decode, score_margin=0.02, reach=0.5), labels)


@pytest.fixture(scope="module")
def tuned_tiny():
    seg = tiny("sam_vit_b", lora_rank=2)
    finetune_disc(seg, steps=2, lr=1e-2)
    return seg


def _expected(seg, image, raw, prompt_weights):
    """refine_slice on every slice, decoded by a session with the given prompt weights."""
    mode = seg.config["prompt_weights"]
    try:
        seg.config["prompt_weights"] = prompt_weights
        session = seg.prompt(image)
        flat = raw.reshape(-1, *session.slice_shape)
        margin = resolve_score_margin(seg.config["refine_score_margin"], colour=False)  # gray disc

        def decode(box, z):
            result = session.predict_result(Prompts.make(box=box), z)
            return result.mask, result.score

        out = [
            refine_slice(flat[z], lambda box, z=z: decode(box, z), score_margin=margin)
            for z in range(len(flat))
        ]
    finally:
        seg.config["prompt_weights"] = mode
    return np.stack(out).reshape(raw.shape)


@pytest.mark.parametrize("volume", [False, True])
def test_segment_refines_every_slice_through_a_prompt_session(tuned_tiny, volume):
    seg = tuned_tiny
    img, _ = disc_image()
    image = np.stack([img, img[::-1]]) if volume else img
    before = dict(seg.config)
    try:
        seg.config["refine"] = "off"
        raw = seg.segment(image)
        seg.config["refine"] = "boxes"
        refined = seg.segment(image)
        # Default refine_weights="finetuned": the fine-tuned decoder, whatever prompts use.
        seg.config["prompt_weights"] = "base"
        assert seg.segment(image).tolist() == refined.tolist()
        seg.config["refine_weights"] = "prompts"  # now the base decoder, as user prompts
        via_base = seg.segment(image)
    finally:
        seg.config.update(before)
    assert seg.config == before  # refining never touched the model's own settings
    assert raw.any() and refined.shape == raw.shape == image.shape
    np.testing.assert_array_equal(refined, _expected(seg, image, raw, "finetuned"))
    np.testing.assert_array_equal(via_base, _expected(seg, image, raw, "base"))
    assert not np.array_equal(refined, raw)  # the refinement really changed something
    assert not np.array_equal(refined, via_base)  # and the two decoders really differ
    for key, bad in (("refine", "boxy"), ("refine_weights", "best"), ("refine_score_margin", "high")):
        seg.config[key] = bad
        try:
            with pytest.raises(ValueError, match=key):
                seg.segment(image)
        finally:
            seg.config.update(before)


def test_auto_score_margin_is_on_for_grayscale_and_off_for_colour():
    assert resolve_score_margin("auto", colour=False) == 0.02
    assert resolve_score_margin("auto", colour=True) is None
    assert resolve_score_margin(0.05, colour=True) == 0.05  # a set margin holds for any image
    assert resolve_score_margin(None, colour=False) is None
    with pytest.raises(ValueError, match="refine_score_margin"):
        resolve_score_margin("on", colour=False)


def test_segment_resolves_the_margin_from_the_image_it_refines(tuned_tiny, monkeypatch):
    seen: list = []
    real = hf_sam_refine.refine_slice

    def spy(*args, **kwargs):
        seen.append(kwargs["score_margin"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_sam_refine, "refine_slice", spy)
    img, _ = disc_image()
    gray_rgb = np.repeat(img[..., None], 3, axis=-1)  # grayscale saved as RGB counts as gray
    tinted = gray_rgb * np.array([1.0, 0.8, 0.6], dtype=gray_rgb.dtype)  # a colour image
    assert tuned_tiny.config["refine_score_margin"] == "auto"
    for image, channel_axis, margin in ((img, None, 0.02), (gray_rgb, -1, 0.02), (tinted, -1, None)):
        seen.clear()
        assert tuned_tiny.segment(image, channel_axis=channel_axis).any()
        assert seen and set(seen) == {margin}
