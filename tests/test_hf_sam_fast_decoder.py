"""The inference fast path of SAM's decoder equals SAM's own modules (random weights, no download)."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention

from napari_medseg.models.hf_sam import fast_decoder as fast
from napari_medseg.models.hf_sam.model import HFSAM


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (biases included), so a dropped term would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_attention_folds_match_sam_attention():
    torch.manual_seed(0)
    attn = Attention(64, 4, downsample_rate=2)
    _randomise(attn, 1)
    tokens, image = torch.randn(3, 5, 64), torch.randn(1, 300, 64)
    with torch.no_grad():
        ref = attn(tokens, image.expand(3, -1, -1), image.expand(3, -1, -1))
        torch.testing.assert_close(
            fast.tokens_to_image(attn, tokens, image, image), ref, atol=1e-5, rtol=1e-5
        )
        ref = attn(image.expand(3, -1, -1), tokens, tokens)
        torch.testing.assert_close(
            fast.image_to_tokens(attn, image, tokens, tokens), ref, atol=1e-5, rtol=1e-5
        )
        qh = fast._heads(attn.q_proj(image), 4)
        got = fast.image_to_tokens(attn, None, tokens, tokens, q_heads=qh)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_two_way_and_upscaling_match_sam(batch):
    torch.manual_seed(0)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8),
        transformer_dim=256,
    ).eval()
    _randomise(decoder, 2)
    src = torch.randn(1, 256, 16, 16)
    pe = torch.randn(1, 256, 16, 16)
    tokens = torch.randn(batch, 7, 256)
    with torch.no_grad():
        ref_q, ref_k = decoder.transformer(
            src.expand(batch, -1, -1, -1), pe.expand(batch, -1, -1, -1), tokens
        )
        side = fast.image_side(decoder.transformer, src, pe)
        q, k = fast.two_way(decoder.transformer, tokens, pe, side)
        torch.testing.assert_close(q, ref_q, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k, ref_k, atol=1e-4, rtol=1e-4)
        x = torch.randn(batch, 256, 16, 16)
        assert fast.is_standard(decoder.output_upscaling)
        up = fast.upscale(decoder.output_upscaling, x)
        assert up.shape == (batch, 32, 64, 64)
        torch.testing.assert_close(up, decoder.output_upscaling(x), atol=1e-5, rtol=1e-5)
        # Masks taken before the last pixel shuffle equal the masks of the shuffled features.
        hyper = torch.randn(batch, 3, 32)
        pre = fast.masks_unshuffled(fast.upscale(decoder.output_upscaling, x, shuffle=False), hyper)
        ref = (hyper @ up.reshape(batch, 32, -1)).view(batch, 3, 64, 64)
        torch.testing.assert_close(pre, ref, atol=1e-5, rtol=1e-5)


def test_cached_image_side_is_reused_and_invalidated():
    torch.manual_seed(0)
    tiny_vit = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 2}
    m = HFSAM("sam_vit_b", img_size=64, vit_overrides=tiny_vit).eval()
    emb = torch.randn(1, 256, 4, 4)
    boxes = torch.tensor([[4.0, 8, 40, 52]])
    calls = []
    real = fast.image_side

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    fast.image_side = counting
    try:
        with torch.no_grad():
            a, _ = m.decode(emb, None, boxes=boxes)
            b, _ = m.decode(emb, None, boxes=boxes + 2)
            assert len(calls) == 1  # the second click reused the image side
            # A previous-mask prompt changes the dense input: no cache, still correct.
            prev = torch.randn(1, 1, 16, 16)
            m.fast_decode = False
            exact, _ = m.decode(emb, None, boxes=boxes, masks=prev)
            m.fast_decode = True
            torch.testing.assert_close(
                m.decode(emb, None, boxes=boxes, masks=prev)[0], exact, atol=1e-4, rtol=1e-4
            )
            # Changing a weight in place (what an optimiser step does) invalidates the cache.
            m.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(2.0)
            n = len(calls)
            c, _ = m.decode(emb, None, boxes=boxes)
            assert len(calls) == n + 1
            m.fast_decode = False
            ref, _ = m.decode(emb, None, boxes=boxes)
            torch.testing.assert_close(c, ref, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(a, b)
    finally:
        fast.image_side = real


def test_bf16_encoder_option_close_to_fp32_and_keyed_separately():
    from napari_medseg.engine.networks.hf_sam import HFSAMSegmenter

    tiny_vit = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 2}
    opts = {"weights": "none", "input_size": 64, "vit_overrides": tiny_vit, "seed": 0}
    fp32 = HFSAMSegmenter(device="cpu", encoder_precision="fp32", **opts)
    bf16 = HFSAMSegmenter(device="cpu", encoder_precision="bf16", **opts)
    x = fp32.module.preprocess(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        a, _ = fp32.module.encode(x)
        b, _ = bf16.module.encode(x)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert 0 < float((a - b).norm() / a.norm()) < 0.1  # really ran in bf16, and stayed close
    assert fp32.prompt_cache_key() != bf16.prompt_cache_key()
    with pytest.raises(ValueError, match="encoder_precision"):
        HFSAMSegmenter(device="cpu", encoder_precision="fp8", **opts)


def test_auto_encoder_precision_is_bf16_only_on_native_bf16_cpus(monkeypatch):
    from napari_medseg.engine.networks import hf_sam

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(hf_sam, "cpu_has_native_bf16", lambda: True)
    assert hf_sam.resolve_encoder_precision("auto", cpu) == "bf16"
    assert hf_sam.resolve_encoder_precision("auto", cuda) == "fp32"  # GPUs keep exact embeddings
    assert hf_sam.resolve_encoder_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(hf_sam, "cpu_has_native_bf16", lambda: False)
    assert hf_sam.resolve_encoder_precision("auto", cpu) == "fp32"  # emulated bf16 would be slower
    assert hf_sam.resolve_encoder_precision("bf16", cpu) == "bf16"  # an explicit choice is kept
    monkeypatch.undo()
    from napari_medseg.engine.device import cpu_has_native_bf16

    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    # The default model follows the rule on this machine.
    tiny_vit = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 2}
    seg = hf_sam.HFSAMSegmenter(device="cpu", weights="none", input_size=64, seed=0, vit_overrides=tiny_vit)
    assert seg.module.encoder_precision == expected
