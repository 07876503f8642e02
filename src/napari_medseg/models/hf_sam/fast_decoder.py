"""Inference-only fast path of SAM's two-way transformer and output upscaling (same maths).

A prompt click runs SAM's mask decoder once. On a CPU most of that time is not arithmetic but
overhead: head split/merge copies, an unfused softmax, and projections of the image tokens
that do not depend on the prompt at all. This module runs the *same weights* with

* attention between the few prompt tokens and the 64² image tokens computed without
  projecting the image tokens (:func:`tokens_to_image`, :func:`image_to_tokens`: the
  projections are folded into the token side, which has a handful of rows);
* ``torch.nn.functional.scaled_dot_product_attention`` for the token self-attention;
* a per-image cache of the first block's image-side work (``keys + pe``, the token→image
  key/value projections and the image→token query projection), which only depends on the
  image embedding and the dense prompt — valid whenever no previous-mask prompt is given;
* the two stride-2 2×2 transposed convolutions of ``output_upscaling`` as matrix products
  followed by a pixel shuffle (a 2×2/stride-2 transposed conv writes each input pixel to its
  own 2×2 output block, so it is exactly a linear map per pixel).

Results agree with ``TwoWayTransformer.forward`` / ``output_upscaling`` to float rounding
(tested to 1e-5). Used only without autograd; training keeps SAM's modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn


@dataclass
class ImageSideCache:
    """Prompt-independent tensors of the first two-way block for one (image, dense) pair.

    Attributes:
        keys: (B, N, C) image tokens (embedding + dense prompt), N = h·w.
        keys_pe: (B, N, C) ``keys + image_pe``.
        k_t2i: (B, H, N, d) token→image key projection, heads split.
        v_t2i: (B, H, N, d) token→image value projection, heads split.
        q_i2t: (B, H, N, d) image→token query projection, heads split.
    """

    keys: torch.Tensor
    keys_pe: torch.Tensor
    k_t2i: torch.Tensor
    v_t2i: torch.Tensor
    q_i2t: torch.Tensor


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, C) → (B, n, N, C/n)."""
    b, t, c = x.shape
    return x.view(b, t, n, c // n).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, n, N, d) → (B, N, n·d)."""
    b, n, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, n * d)


def attend(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_heads: torch.Tensor | None = None,
    k_heads: torch.Tensor | None = None,
    v_heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM's ``Attention.forward`` with SDPA; pre-projected heads may replace q, k or v.

    Args:
        q, k, v: (B, N_q, C), (B, N_k, C), (B, N_k, C) inputs (ignored where heads are given).
        q_heads, k_heads, v_heads: Already projected and split (B, H, N, d) tensors.

    Returns:
        (B, N_q, C).
    """
    n = attn.num_heads
    qh = q_heads if q_heads is not None else _heads(attn.q_proj(q), n)
    kh = k_heads if k_heads is not None else _heads(attn.k_proj(k), n)
    vh = v_heads if v_heads is not None else _heads(attn.v_proj(v), n)
    if qh.shape[0] != kh.shape[0]:  # one cached image side serves B prompt sets
        b = max(qh.shape[0], kh.shape[0])
        qh, kh, vh = (t.expand(b, -1, -1, -1) for t in (qh, kh, vh))
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0 / math.sqrt(qh.shape[-1]))
    return attn.out_proj(_merge(out))


def _head_weights(lin: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d, C) weight and (n, d) bias of a C → n·d projection, split by head."""
    out_f, in_f = lin.weight.shape
    return lin.weight.view(n, out_f // n, in_f), lin.bias.view(n, out_f // n)


def tokens_to_image(attn: Attention, q: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """Few tokens attend to many image tokens without projecting the image tokens.

    With q_h = W_q,h q (T queries) and K_h = X_k W_k,h^T + b_k,h over N ≫ T image tokens,
    q_h K_h^T = (q_h W_k,h) X_k^T + const per query row, and the constant cancels in the softmax;
    A_h V_h = (A_h X_v) W_v,h^T + b_v,h because the rows of A sum to 1. This costs 2·H·T·N·C
    multiply-adds instead of 2·N·C·C/2 for the two image projections.

    Args:
        q: (B, T, C) queries; k_in, v_in: (1 or B, N, C) inputs of the key/value projections.

    Returns:
        (B, T, C), equal to ``attn(q, k_in, v_in)`` up to float rounding.
    """
    n = attn.num_heads
    qh = _heads(attn.q_proj(q), n)  # (B, H, T, d)
    wk, _ = _head_weights(attn.k_proj, n)  # (H, d, C)
    wv, bv = _head_weights(attn.v_proj, n)
    b, _, t, d = qh.shape
    c = k_in.shape[-1]
    # Heads and queries share one (B, H·T, C) matrix so each product is a single plain bmm
    # (a broadcast over a head axis would copy the N×C image tokens once per head).
    qk = (qh @ wk).reshape(b, n * t, c) * (1.0 / math.sqrt(d))
    a = torch.softmax(qk @ k_in.expand(b, -1, -1).transpose(1, 2), dim=-1)  # (B, H·T, N)
    ax = (a @ v_in.expand(b, -1, -1)).view(b, n, t, c)  # (B, H, T, C)
    out = ax @ wv.transpose(-1, -2) + bv[:, None, :]  # (B, H, T, d)
    return attn.out_proj(_merge(out))


def image_to_tokens(
    attn: Attention,
    x_q: torch.Tensor | None,
    k_tok: torch.Tensor,
    v_tok: torch.Tensor,
    q_heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Many image tokens attend to few tokens; neither image projection is materialised.

    Scores: (X W_q,h^T + b_q,h) k_h^T = X (W_q,h^T k_h^T) + b_q,h k_h^T; output:
    out_proj(concat_h A_h v_h) = Σ_h A_h (v_h W_o,h^T) + b_o. Both products then cost
    N·C·H·T multiply-adds instead of N·C·C/2 (T is a handful of prompt tokens).

    Args:
        x_q: (1 or B, N, C) input of the query projection (unused when ``q_heads`` is given).
        k_tok, v_tok: (B, T, C) token inputs of the key / value projections.
        q_heads: (1 or B, H, N, d) already projected queries (cached image side).

    Returns:
        (B, N, C), equal to ``attn(x_q, k_tok, v_tok)`` up to float rounding.
    """
    n = attn.num_heads
    kh = _heads(attn.k_proj(k_tok), n)  # (B, H, T, d)
    vh = _heads(attn.v_proj(v_tok), n)
    b, _, t, d = kh.shape
    scale = 1.0 / math.sqrt(d)
    # Scores are laid out (B, H, T, N): the softmax runs over the short T axis with N as the
    # contiguous inner axis, which vectorises (a softmax over a last axis of length T does not).
    if q_heads is not None:
        scores = kh @ q_heads.transpose(-1, -2)  # (B, H, T, N)
    else:
        wq, bq = _head_weights(attn.q_proj, n)  # (H, d, C), (H, d)
        m = (kh @ wq).reshape(b, n * t, -1)  # (B, H·T, C)
        bias = (kh @ bq[:, :, None]).reshape(b, n * t, 1)
        scores = (m @ x_q.expand(b, -1, -1).transpose(1, 2) + bias).view(b, n, t, -1)
    a = torch.softmax(scores * scale, dim=2).reshape(b, n * t, -1)  # (B, H·T, N)
    wo = attn.out_proj.weight.view(-1, n, d).permute(1, 2, 0)  # (H, d, C)
    p = (vh @ wo).reshape(b, n * t, -1)  # (B, H·T, C)
    return torch.baddbmm(attn.out_proj.bias, a.transpose(1, 2), p)


def image_side(transformer: TwoWayTransformer, src: torch.Tensor, image_pe: torch.Tensor) -> ImageSideCache:
    """Prompt-independent part of the first block.

    Args:
        src: (B, C, h, w) image embedding plus dense prompt embedding (after any pre-fusion).
        image_pe: (1, C, h, w) positional encoding.
    """
    layer: TwoWayAttentionBlock = transformer.layers[0]
    keys = src.flatten(2).transpose(1, 2)
    keys_pe = keys + image_pe.flatten(2).transpose(1, 2)
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    return ImageSideCache(
        keys=keys,
        keys_pe=keys_pe,
        k_t2i=_heads(t2i.k_proj(keys_pe), t2i.num_heads),
        v_t2i=_heads(t2i.v_proj(keys), t2i.num_heads),
        q_i2t=_heads(i2t.q_proj(keys_pe), i2t.num_heads),
    )


def _block(
    layer: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    first: ImageSideCache | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayAttentionBlock.forward``; ``first`` supplies the cached image side of block 0."""
    if layer.skip_first_layer_pe:
        queries = attend(layer.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + attend(layer.self_attn, q, q, queries)
    queries = layer.norm1(queries)
    q = queries + query_pe
    if first is not None:
        keys_pe = first.keys_pe
        t2i = attend(layer.cross_attn_token_to_image, q, keys_pe, keys, None, first.k_t2i, first.v_t2i)
    else:
        keys_pe = keys + key_pe
        t2i = tokens_to_image(layer.cross_attn_token_to_image, q, keys_pe, keys)
    queries = layer.norm2(queries + t2i)
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe
    qh = first.q_i2t if first is not None else None
    out = image_to_tokens(layer.cross_attn_image_to_token, keys_pe, q, queries, q_heads=qh)
    out += keys  # out is fresh: adding in place spares an (N, C) allocation per block
    keys = layer.norm4(out)
    return queries, keys


def two_way(
    transformer: TwoWayTransformer,
    tokens: torch.Tensor,
    image_pe: torch.Tensor,
    side: ImageSideCache,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` from a prepared image side.

    Args:
        tokens: (B, T, C) output + prompt tokens.
        image_pe: (1, C, h, w).
        side: :func:`image_side` of the (1 or B, C, h, w) image input.

    Returns:
        (queries (B, T, C), keys (B, N, C)) as SAM returns them.
    """
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries, keys = tokens, side.keys
    for i, layer in enumerate(transformer.layers):
        queries, keys = _block(layer, queries, keys, tokens, key_pe, side if i == 0 else None)
    if keys.shape[0] != tokens.shape[0]:
        keys = keys.expand(tokens.shape[0], -1, -1)
    q = queries + tokens
    attn_out = tokens_to_image(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attn_out), keys


def _deconv2x2_pixels(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """Stride-2 2×2 ConvTranspose2d as one per-pixel matmul, before the pixel shuffle.

    Args:
        x: (B, h, w, C_in) channels-last features.

    Returns:
        (B, h, w, 2, 2, C_out): output pixel (2y + ky, 2x + kx) sits at [:, y, x, ky, kx].
    """
    b, h, w, c = x.shape
    o = conv.weight.shape[1]  # weight: (C_in, C_out, 2, 2)
    wgt = conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * o)  # columns ordered (ky, kx, o)
    flat = x.reshape(b * h * w, c)
    y = flat @ wgt
    if conv.bias is not None:
        y += conv.bias.repeat(4)  # in place: no second copy of the largest tensor of the decode
    return y.view(b, h, w, 2, 2, o)


def _act_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, in place for GELU (``x`` is a fresh intermediate of the inference path)."""
    if isinstance(act, nn.GELU):
        return torch._C._nn.gelu_(x, approximate=act.approximate)
    return act(x)


def _shuffle(y: torch.Tensor) -> torch.Tensor:
    """(B, h, w, 2, 2, C) from :func:`_deconv2x2_pixels` → (B, 2h, 2w, C) channels-last."""
    b, h, w, _, _, o = y.shape
    return y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)


class Unshuffled(NamedTuple):
    """SAM's upscaled features before the last pixel shuffle (fast path only).

    The masks are dot products of each pixel's 32 features with a hypernetwork vector, so they
    can be taken before the shuffle and only the (B, M, H, W) masks are reordered, not the
    8× larger (B, 32, H, W) features (:func:`masks_unshuffled`).

    Attributes:
        pixels: (B, H/2, W/2, 2, 2, 32).
    """

    pixels: torch.Tensor


def upscale(upscaling: nn.Sequential, x: torch.Tensor, shuffle: bool = True) -> torch.Tensor | Unshuffled:
    """SAM's ``output_upscaling`` (deconv → LayerNorm2d → GELU → deconv → GELU).

    Args:
        x: (B, C, h, w) transformer output.
        shuffle: Return the features as ``upscaling(x)`` does; ``False`` returns them before
            the last pixel shuffle (:class:`Unshuffled`), for :func:`masks_unshuffled`.

    Returns:
        (B, C/8, 4h, 4w), like ``upscaling(x)``, or :class:`Unshuffled`.
    """
    conv1, norm, act1, conv2, act2 = upscaling
    y = _shuffle(_deconv2x2_pixels(x.permute(0, 2, 3, 1), conv1))
    # LayerNorm2d normalises over channels: the last axis here.
    y = F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps)
    y = _act_(act2, _deconv2x2_pixels(_act_(act1, y), conv2))
    if not shuffle:
        return Unshuffled(y)
    return _shuffle(y).permute(0, 3, 1, 2)


def masks_unshuffled(up: Unshuffled, hyper: torch.Tensor) -> torch.Tensor:
    """Hypernetwork masks from :class:`Unshuffled` features.

    Args:
        up: Features (B, h, w, 2, 2, C).
        hyper: (B, M, C) hypernetwork outputs.

    Returns:
        (B, M, 2h, 2w) logits, equal to the masks of the shuffled features.
    """
    y = up.pixels
    b, h, w, _, _, c = y.shape
    m = hyper.shape[1]
    out = y.reshape(b, h * w * 4, c) @ hyper.transpose(1, 2)  # (B, h*w*4, M)
    return out.view(b, h, w, 2, 2, m).permute(0, 5, 1, 3, 2, 4).reshape(b, m, 2 * h, 2 * w)


def is_standard(upscaling: nn.Module) -> bool:
    """Whether ``output_upscaling`` has SAM's layout (else the caller uses the module as is)."""
    if not isinstance(upscaling, nn.Sequential) or len(upscaling) != 5:
        return False
    c1, _, _, c2, _ = upscaling
    return all(
        isinstance(c, nn.ConvTranspose2d) and c.kernel_size == (2, 2) and c.stride == (2, 2) and c.groups == 1
        for c in (c1, c2)
    )
