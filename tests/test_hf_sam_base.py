"""HF-SAM after fine-tuning: prompts never get worse (base-model fallback, hf_sam_base)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import napari_medseg as nms
from napari_medseg.engine.networks.hf_sam import HFSAMSegmenter
from napari_medseg.engine.networks.hf_sam_base import prompts_prefer_base
from napari_medseg.engine.prompt import Prompts
from test_hf_sam import disc_image, finetune_disc
from test_hf_sam import tiny as tiny_hf_sam


def tiny(**options) -> HFSAMSegmenter:
    return tiny_hf_sam("sam_vit_b", **({"lora_rank": 2} | options))


def disc() -> tuple[np.ndarray, np.ndarray]:
    return disc_image()


@pytest.fixture(scope="module")
def tuned() -> tuple[HFSAMSegmenter, list]:
    """A tiny HF-SAM fine-tuned hard enough (lr 0.05) that every trained weight moved."""
    seg = tiny()
    return seg, finetune_disc(seg, steps=3, lr=5e-2)


def _prompted(seg: HFSAMSegmenter, img: np.ndarray) -> torch.Tensor:
    emb = seg.encode_slice(img[None], None)
    return seg.decode_prompts(emb, Prompts.make(box=(10, 12, 44, 52)), img.shape, None).low_res


def _prompted_with(seg: HFSAMSegmenter, img: np.ndarray, mode: str) -> torch.Tensor:
    saved = seg.config["prompt_weights"]
    seg.config["prompt_weights"] = mode
    try:
        return _prompted(seg, img)
    finally:
        seg.config["prompt_weights"] = saved


def test_choice_rule() -> None:
    assert prompts_prefer_base("auto", 0.80, 0.90, 0.01)
    assert prompts_prefer_base("auto", 0.905, 0.90, 0.01)  # within the margin: keep the base
    assert not prompts_prefer_base("auto", 0.95, 0.90, 0.01)
    assert prompts_prefer_base("auto", math.nan, 0.90, 0.01)
    assert prompts_prefer_base("base", 1.0, 0.0, 0.0)
    assert not prompts_prefer_base("finetuned", 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="prompt_weights"):
        prompts_prefer_base("best", 0.5, 0.5, 0.0)


def test_validation_reports_both_paths_and_sets_the_choice(tuned) -> None:
    seg, records = tuned
    m = records[-1].metrics
    assert {"val_box_dice", "val_box_dice_tuned", "val_box_dice_base"} <= set(m)
    use_base = not m["val_box_dice_tuned"] > m["val_box_dice_base"] + seg.config["prompt_margin"]
    assert m["val_box_dice"] == (m["val_box_dice_base"] if use_base else m["val_box_dice_tuned"])
    # The base's figure is measured once per run: the model before any step.
    assert len({r.metrics["val_box_dice_base"] for r in records}) == 1
    # The user is told which weights their prompts will use.
    assert seg.prompts_use_base == bool(seg.module.hf.prompt_from_base)
    assert ("base model" if seg.prompts_use_base else "fine-tuned weights") in seg.training_note()


def test_base_prompting_equals_the_untouched_model(tuned) -> None:
    seg, _ = tuned
    img, _ = disc()
    untouched = tiny()
    mode = seg.config["prompt_weights"]
    try:
        seg.config["prompt_weights"] = "base"
        assert seg.prompts_use_base
        base = _prompted(seg, img)
        torch.testing.assert_close(base, _prompted(untouched, img), atol=1e-5, rtol=0)
        assert seg.prompt_cache_key() == untouched.prompt_cache_key()
        seg.config["prompt_weights"] = "finetuned"
        assert not seg.prompts_use_base
        assert (_prompted(seg, img) - base).abs().max() > 1e-3  # fine-tuning did change prompts
        assert seg.prompt_cache_key() != untouched.prompt_cache_key()
    finally:
        seg.config["prompt_weights"] = mode
    # The base path is a view: it shares the encoder's weights, has no LoRA, and leaves the
    # fine-tuned model untouched (so another thread may segment with it meanwhile).
    view = seg.prompt_module(base=True)
    assert view is not seg.module and view.mask_decoder is seg._base_decoder
    assert not any("lora_" in n for n, _ in view.named_parameters())
    shared = {id(p) for p in seg.module.image_encoder.parameters()}
    assert all(id(p) in shared for p in view.image_encoder.parameters())
    assert seg.module.mask_decoder is not seg._base_decoder
    assert any("lora_" in n for n, _ in seg.module.named_parameters())
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        before = seg.module(x)
        _prompted_with(seg, img, "base")
        torch.testing.assert_close(seg.module(x), before, atol=0, rtol=0)


def test_choice_travels_with_the_checkpoint(tuned, tmp_path) -> None:
    seg, _ = tuned
    flag = seg.module.hf.prompt_from_base.clone()
    try:
        seg.module.hf.prompt_from_base.fill_(1.0)
        back = nms.load_model(seg.save(tmp_path / "a.safetensors"), device="cpu")
        assert back.prompts_use_base
        seg.module.hf.prompt_from_base.fill_(0.0)
        back = nms.load_model(seg.save(tmp_path / "b.safetensors"), device="cpu")
        assert not back.prompts_use_base
        # A checkpoint from before the choice existed loads and prompts with its own weights.
        old = {k: v for k, v in seg.checkpoint_tensors().items() if k != "hf.prompt_from_base"}
        fresh = tiny()
        fresh.load_checkpoint_tensors(old, "old checkpoint")
        fresh.trained = True
        assert not fresh.prompts_use_base
    finally:
        seg.module.hf.prompt_from_base.copy_(flag)


def test_single_painted_slice_keeps_base_prompts() -> None:
    """With one labeled slice validation sees only its own views: auto keeps the base."""
    seg = tiny()
    img, mask = disc()
    list(seg.finetune([img], [mask.astype(np.int64)], steps=2, val_every=1, batch_size=2, augment="none"))
    assert seg.prompts_use_base
    assert seg.module.hf.prompt_from_base.item() == 1.0
