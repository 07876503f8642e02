"""HF-SAM's mask decoder: SAM's two-way transformer with AWFFM fusion, two output modes.

The weights of SAM's ``MaskDecoder`` (transformer, tokens, upscaling, hypernetworks, IoU head)
are used as they are; :class:`HFHead` adds what HF-SAM trains on top:

* ``compress``: 1x1 conv of the encoder's early feature to 256 channels (F_low);
* ``fusion_pre`` / ``fusion_post``: AWFFM before and after the two-way transformer ("two-step
  skip-feature fusion"), each switchable and each starting as the identity (gate 0);
* ``class_tokens`` and ``class_mlps``: K+1 learned output tokens (background + K classes) with
  one hypernetwork MLP each, the SAMed-style prompt-free head.

Prompted mode: tokens = [iou, 4 SAM mask tokens, sparse prompt embeddings], one mask (or three
for an ambiguous single point) per prompt set. Prompt-free mode: tokens = [iou, K+1 class
tokens], no sparse prompts, SAM's "no mask" dense embedding; the K+1 maps are class logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from napari_medseg.models.hf_sam import fast_decoder as fast
from napari_medseg.models.hf_sam.awffm import AWFFM


class HFHead(nn.Module):
    """Trainable additions of HF-SAM to SAM's decoder.

    Args:
        early_channels: Channels of the encoder's early feature (ViT-B 768, TinyViT 160).
        num_classes: K+1 output classes of the prompt-free mode, background included.
        fusion_pre: Fuse before the two-way transformer.
        fusion_post: Fuse after it (the step active in the released code).
        dim: Transformer width (256).
    """

    def __init__(
        self,
        early_channels: int,
        num_classes: int = 2,
        fusion_pre: bool = True,
        fusion_post: bool = True,
        dim: int = 256,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.compress = nn.Conv2d(early_channels, dim, 1)
        self.fusion_pre = AWFFM(dim) if fusion_pre else None
        self.fusion_post = AWFFM(dim) if fusion_post else None
        self.class_tokens = nn.Embedding(num_classes, dim)
        self.class_mlps = nn.ModuleList([MLP(dim, dim, dim // 8, 3) for _ in range(num_classes)])
        # 1: prompts are decoded with the untouched base model (no LoRA, SAM's own decoder, no
        # fusion) because fine-tuning did not improve them on validation; kept with the weights.
        self.register_buffer("prompt_from_base", torch.zeros(()))

    @property
    def num_classes(self) -> int:
        """K+1 prompt-free outputs (background included)."""
        return int(self.class_tokens.num_embeddings)

    @property
    def uses_early(self) -> bool:
        """Whether any fusion point reads the early feature."""
        return self.fusion_pre is not None or self.fusion_post is not None

    def reset_classes(self, num_classes: int, decoder: MaskDecoder) -> None:
        """(Re)create K+1 class tokens, each a copy of SAM's first mask token and its MLP.

        Starting from SAM's single-mask output gives every class a meaningful first guess; the
        copies separate as soon as the labels differ.
        """
        dev = decoder.mask_tokens.weight.device
        self.class_tokens = nn.Embedding(num_classes, self.dim).to(dev)
        mlps = []
        with torch.no_grad():
            self.class_tokens.weight.copy_(decoder.mask_tokens.weight[:1].expand(num_classes, -1))
            for _ in range(num_classes):
                mlp = MLP(self.dim, self.dim, self.dim // 8, 3).to(dev)
                mlp.load_state_dict(decoder.output_hypernetworks_mlps[0].state_dict())
                mlps.append(mlp)
        self.class_mlps = nn.ModuleList(mlps)


def low_level(head: HFHead, early: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """F_low = compress(early), resized to the embedding grid if needed; ``None`` without fusion."""
    if early is None or not head.uses_early:
        return None
    if not head.training and not any(
        bool(f.gate.detach().any()) for f in (head.fusion_pre, head.fusion_post) if f is not None
    ):
        return None  # every gate is closed: the fusion is the identity, skip the 1x1 conv
    f = head.compress(early)
    if tuple(f.shape[-2:]) != tuple(size):
        f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
    return f


def prepare_src(
    head: HFHead, image_embedding: torch.Tensor, f_low: torch.Tensor | None, dense: torch.Tensor
) -> torch.Tensor:
    """Transformer image input: embedding (after pre-fusion) + dense prompt embedding.

    A dense embedding expanded from one image (SAM's "no mask" embedding, batch stride 0) stays
    batch 1, so one image side serves every prompt set.
    """
    src = image_embedding
    if head.fusion_pre is not None and f_low is not None:
        src = head.fusion_pre(src, f_low)
    if dense.shape[0] > 1 and dense.stride(0) == 0:
        dense = dense[:1]
    return src + dense


def run_transformer(
    decoder: MaskDecoder,
    head: HFHead,
    image_embedding: torch.Tensor,
    f_low: torch.Tensor | None,
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    dense: torch.Tensor,
    side: fast.ImageSideCache | None = None,
    use_fast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | fast.Unshuffled]:
    """Two-way transformer with the fusion points, then SAM's upscaling.

    With ``use_fast`` (inference only) the same weights run through :mod:`fast_decoder`
    (attention folded onto the token side, matmul upscaling, optional cached image side);
    otherwise SAM's own modules run.

    Args:
        image_embedding: (1 or B, 256, h, w); a single embedding is shared by B prompt sets.
        f_low: (1 or B, 256, h, w) compressed early feature, or ``None``.
        image_pe: (1, 256, h, w) dense positional encoding.
        tokens: (B, T, 256) output + prompt tokens.
        dense: (B, 256, h, w) dense prompt embedding.
        side: Cached :func:`fast_decoder.image_side` of ``prepare_src(...)`` (fast path only).
        use_fast: Take the fast path (ignored while autograd is on).

    Returns:
        (token outputs (B, T, 256), upscaled image features (B, 32, 4h, 4w)); on the fast
        path the features come before their last pixel shuffle (:class:`fast.Unshuffled`),
        which :func:`masks_from_tokens` accepts.
    """
    b = tokens.shape[0]
    c, h, w = image_embedding.shape[1:]
    use_fast = use_fast and not torch.is_grad_enabled()
    if use_fast and isinstance(decoder.transformer, TwoWayTransformer):
        if side is None:
            side = fast.image_side(
                decoder.transformer, prepare_src(head, image_embedding, f_low, dense), image_pe
            )
        hs, out = fast.two_way(decoder.transformer, tokens, image_pe, side)
    else:
        src = prepare_src(head, image_embedding, f_low, dense)
        if src.shape[0] != b:
            src = src.expand(b, -1, -1, -1)
        hs, out = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    out = out.transpose(1, 2).reshape(b, c, h, w)
    if head.fusion_post is not None and f_low is not None:
        out = head.fusion_post(out, f_low)
    if use_fast and fast.is_standard(decoder.output_upscaling):
        return hs, fast.upscale(decoder.output_upscaling, out, shuffle=False)
    return hs, decoder.output_upscaling(out)


def masks_from_tokens(
    token_out: torch.Tensor, mlps: nn.ModuleList, upscaled: torch.Tensor | fast.Unshuffled
) -> torch.Tensor:
    """Hypernetwork masks: (B, M, 256) tokens, M MLPs, (B, 32, H, W) → (B, M, H, W) logits."""
    hyper = torch.stack([mlp(token_out[:, i]) for i, mlp in enumerate(mlps)], 1)
    if isinstance(upscaled, fast.Unshuffled):
        return fast.masks_unshuffled(upscaled, hyper)
    b, c, h, w = upscaled.shape
    if upscaled.is_contiguous():
        return (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    # Channels-last features from the fast upscaling path: contract over the last axis.
    pixels = upscaled.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return (pixels @ hyper.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


def decode_prompted(
    decoder: MaskDecoder,
    head: HFHead,
    image_embedding: torch.Tensor,
    f_low: torch.Tensor | None,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask: bool,
    side: fast.ImageSideCache | None = None,
    use_fast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompted decode (same maths as ``MaskDecoder.forward``) with the fusion points.

    Returns:
        (low-res logits (B, M, 4h, 4w), predicted IoU (B, M)); M = 3 with ``multimask``, else 1.
    """
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
    tokens = torch.cat([out_tokens[None].expand(sparse.shape[0], -1, -1), sparse], 1)
    hs, up = run_transformer(decoder, head, image_embedding, f_low, image_pe, tokens, dense, side, use_fast)
    n = decoder.num_mask_tokens
    masks = masks_from_tokens(hs[:, 1 : 1 + n], decoder.output_hypernetworks_mlps, up)
    iou = decoder.iou_prediction_head(hs[:, 0])
    sel = slice(1, None) if multimask else slice(0, 1)
    return masks[:, sel], iou[:, sel]


def decode_free(
    decoder: MaskDecoder,
    head: HFHead,
    image_embedding: torch.Tensor,
    f_low: torch.Tensor | None,
    image_pe: torch.Tensor,
    dense: torch.Tensor,
    use_fast: bool = False,
) -> torch.Tensor:
    """Prompt-free decode: (B, K+1, 4h, 4w) class logits (``use_fast``: see run_transformer)."""
    b = image_embedding.shape[0]
    out_tokens = torch.cat([decoder.iou_token.weight, head.class_tokens.weight], 0)
    tokens = out_tokens[None].expand(b, -1, -1)
    hs, up = run_transformer(decoder, head, image_embedding, f_low, image_pe, tokens, dense, None, use_fast)
    return masks_from_tokens(hs[:, 1 : 1 + head.num_classes], head.class_mlps, up)
