"""The HF-SAM network: SAM (or LiteMedSAM) + LoRA + AWFFM fusion decoder; pure torch.

Attribute names ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` are SAM's, so base
checkpoints (LiteMedSAM, SAM ViT-B/L/H) load into them directly; everything HF-SAM adds lives
under ``hf`` (see :class:`~napari_medseg.models.hf_sam.decoder.HFHead`) or in LoRA tensors.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from napari_medseg.models.hf_sam import fast_decoder as fast
from napari_medseg.models.hf_sam.backbones import build_encoder, embedding_side
from napari_medseg.models.hf_sam.decoder import (
    HFHead,
    decode_free,
    decode_prompted,
    low_level,
    prepare_src,
)


def _version(t: torch.Tensor) -> int:
    """In-place version counter (inference tensors have none; they are never edited in place here)."""
    return -1 if t.is_inference() else int(t._version)


# SAM's ImageNet statistics on a 0..255 scale.
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


class HFSAM(nn.Module):
    """HF-SAM on one backbone.

    Args:
        backbone: ``"litemedsam"``, ``"sam_vit_b"``, ``"sam_vit_l"`` or ``"sam_vit_h"``.
        img_size: Square encoder input side (LiteMedSAM 256, SAM 1024; the paper trains ViT-B
            at 512).
        num_classes: K+1 prompt-free outputs, background included.
        fusion_pre: AWFFM before the two-way transformer.
        fusion_post: AWFFM after it.
        pixel_norm: ``"unit"`` (input in [0, 1] as is: LiteMedSAM, and HF-SAM's own training) or
            ``"sam"`` (SAM's ImageNet mean/std on a 0..255 scale).
        vit_overrides: Smaller ViT widths (tests).
    """

    def __init__(
        self,
        backbone: str = "litemedsam",
        img_size: int = 256,
        num_classes: int = 2,
        fusion_pre: bool = True,
        fusion_post: bool = True,
        pixel_norm: str = "unit",
        vit_overrides: dict[str, object] | None = None,
    ) -> None:
        super().__init__()
        # (key, weakref(embedding), weakref(early) | None, ImageSideCache): see _cached_side.
        self._side_cache: tuple | None = None
        self._pe_cache: tuple | None = None  # (key, (1, 256, h, w) dense PE): see dense_pe
        # Inference through fast_decoder (same weights, float-rounding differences only);
        # False runs SAM's own decoder modules, e.g. to compare with the base model bit-closely.
        self.fast_decode = True
        self.encoder_precision = "fp32"  # "fp32" | "bf16" (inference only): see encode
        if pixel_norm not in ("unit", "sam"):
            raise ValueError(f"pixel_norm must be 'unit' or 'sam', got {pixel_norm!r}")
        self.backbone = backbone
        self.img_size = img_size
        self.pixel_norm = pixel_norm
        self.image_encoder = build_encoder(backbone, img_size, vit_overrides)
        side = embedding_side(self.image_encoder, img_size)
        self.prompt_encoder = PromptEncoder(
            embed_dim=256,
            image_embedding_size=(side, side),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        self.hf = HFHead(int(self.image_encoder.early_channels), num_classes, fusion_pre, fusion_post)
        self.hf.reset_classes(num_classes, self.mask_decoder)
        mean = torch.tensor(SAM_MEAN).view(1, 3, 1, 1) / 255.0
        std = torch.tensor(SAM_STD).view(1, 3, 1, 1) / 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def embedding_side(self) -> int:
        """Side of the image embedding grid."""
        return int(self.prompt_encoder.image_embedding_size[0])

    @property
    def low_res_side(self) -> int:
        """Side of the decoder's low-resolution logits (4 × the embedding grid)."""
        return 4 * self.embedding_side

    def train(self, mode: bool = True) -> HFSAM:
        """Train mode everywhere except the frozen encoder (its BatchNorm statistics stay put)."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → the encoder's input scaling."""
        if self.pixel_norm == "sam":
            return (x - self.pixel_mean) / self.pixel_std
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (B, 3, S, S) → (embedding (B, 256, h, w), early (B, C_early, h, w)).

        With ``encoder_precision = "bf16"`` and no autograd the encoder runs under bfloat16
        autocast (faster on CPUs with native bf16 and on GPUs; the embedding differs from the
        float32 one by a few per cent); the outputs are always float32.
        """
        if self.encoder_precision == "bf16" and not torch.is_grad_enabled():
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                emb, early = self.image_encoder.forward_features(x)
            return emb.float(), early.float()
        return self.image_encoder.forward_features(x)

    def dense_pe(self) -> torch.Tensor:
        """(1, 256, h, w) positional encoding of the embedding grid.

        Cached outside autograd (a few ms of sin/cos per click on a CPU); the key includes the
        random-Fourier matrix's version, so loading or training weights recomputes it.
        """
        if torch.is_grad_enabled():
            return self.prompt_encoder.get_dense_pe()
        gauss = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (
            gauss.device,
            gauss.dtype,
            _version(gauss),
            id(gauss),
            self.prompt_encoder.image_embedding_size,
        )
        if self._pe_cache is None or self._pe_cache[0] != key:
            self._pe_cache = (key, self.prompt_encoder.get_dense_pe())
        return self._pe_cache[1]

    def decode(
        self,
        embedding: torch.Tensor,
        early: torch.Tensor | None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompted decode.

        Args:
            embedding: (1 or B, 256, h, w); one embedding may serve B prompt sets.
            early: (1 or B, C_early, h, w) early feature, or ``None`` (fusion skipped).
            points: ((B, N, 2) float (x, y) in input pixels, (B, N) int labels 1/0/-1).
            boxes: (B, 4) float (x0, y0, x1, y1) in input pixels.
            masks: (B, 1, 4h, 4w) low-res logits of a previous prediction.
            multimask: Three candidate masks instead of one.

        Returns:
            (low-res logits (B, M, 4h, 4w), predicted IoU (B, M)).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        f_low = low_level(self.hf, early, tuple(embedding.shape[-2:]))
        pe = self.dense_pe()
        use_fast = self.fast_decode and not torch.is_grad_enabled()
        side = None
        if use_fast and masks is None:
            side = self._cached_side(embedding, early, f_low, dense, pe)
        return decode_prompted(
            self.mask_decoder, self.hf, embedding, f_low, pe, sparse, dense, multimask, side, use_fast
        )

    def _cached_side(
        self,
        embedding: torch.Tensor,
        early: torch.Tensor | None,
        f_low: torch.Tensor | None,
        dense: torch.Tensor,
        pe: torch.Tensor,
    ) -> fast.ImageSideCache | None:
        """The transformer's prompt-independent image side, reused across clicks on one image.

        Keyed on the embedding tensor's identity and in-place version, and on the version of
        every parameter it depends on, so training or loading weights invalidates it.
        """
        if not isinstance(self.mask_decoder.transformer, TwoWayTransformer):
            return None
        params = (*self.mask_decoder.transformer.layers[0].parameters(), *self.prompt_encoder.parameters())
        params += tuple(self.hf.parameters())
        # f_low is recomputed from ``early`` on every call, so the early feature is the key.
        source = early if f_low is not None else None
        key = (
            id(self.mask_decoder),  # prompts may swap in the base decoder (engine's hf_sam.py)
            id(embedding),
            _version(embedding),
            None if source is None else (id(source), _version(source)),
            tuple(_version(p) for p in params),
        )
        cached = self._side_cache
        # The weak references make sure a recycled id() never matches a freed tensor.
        if cached is not None and cached[0] == key and cached[1]() is embedding:
            if source is None or cached[2]() is source:
                return cached[3]
        src = prepare_src(self.hf, embedding, f_low, dense)
        side = fast.image_side(self.mask_decoder.transformer, src, pe)
        self._side_cache = (
            key,
            weakref.ref(embedding),
            None if source is None else weakref.ref(source),
            side,
        )
        return side

    def decode_free(self, embedding: torch.Tensor, early: torch.Tensor | None) -> torch.Tensor:
        """Prompt-free decode: (B, 256, h, w) → (B, K+1, 4h, 4w) class logits."""
        b = embedding.shape[0]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            b, -1, *embedding.shape[-2:]
        )
        f_low = low_level(self.hf, early, tuple(embedding.shape[-2:]))
        return decode_free(
            self.mask_decoder, self.hf, embedding, f_low, self.dense_pe(), dense, self.fast_decode
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt-free segmentation: (B, 3, S, S) in [0, 1] → (B, K+1, S, S) class logits."""
        emb, early = self.encode(self.preprocess(x))
        logits = self.decode_free(emb, early if self.hf.uses_early else None)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
