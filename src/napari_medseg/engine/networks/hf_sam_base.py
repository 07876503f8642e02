"""Prompting with the untouched base model after fine-tuning, when that prompts better.

Fine-tuning HF-SAM on a few painted slices trains LoRA, the fusion module, the class tokens and
(at a tenth of the learning rate) SAM's decoder, and it trains the prompted path too. On the
few-shot benchmarks the fine-tuned model segments without prompts far better, but its box
prompts came out 0.004–0.05 Dice *below* the zero-shot model: a handful of slices cannot
teach a foundation model's prompt decoder much. Users must never get worse prompting from
fine-tuning, so the engine keeps a frozen copy of the base decoder and decides per model:

* ``prompt_weights="auto"`` (default): at every validation both prompted paths are scored with a
  box around each painted class of the held-out slices; prompts use the fine-tuned weights only
  when they beat the base by more than ``prompt_margin`` Dice. The choice is stored with the
  weights it was made for (``hf.prompt_from_base``), so the best checkpoint keeps its own.
* ``"finetuned"`` / ``"base"`` force one path.

The base path is exactly the model before fine-tuning: LoRA switched off, SAM's own decoder,
no fusion — so zero-shot prompting is reproduced to float rounding (tested).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from napari_medseg.models.hf_sam.lora import has_lora, set_lora_enabled

PROMPT_WEIGHTS = ("auto", "finetuned", "base")


def frozen_copy(decoder: nn.Module) -> nn.Module:
    """An evaluation-mode, gradient-free copy of SAM's mask decoder (the base prompt decoder)."""
    base = copy.deepcopy(decoder).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


@contextmanager
def base_model(module: Any, base_decoder: nn.Module) -> Iterator[None]:
    """Within the block, ``module`` (an HFSAM) prompts like its base model.

    LoRA adapters are switched off and the mask decoder is the frozen base copy; callers drop the
    early feature so the fusion module is skipped. Everything is restored on exit, including the
    adapters' ``requires_grad`` flags (peft's switch resets them).
    """
    encoder = module.image_encoder
    lora = has_lora(encoder)
    flags = {p: p.requires_grad for p in encoder.parameters()}
    tuned = module.mask_decoder
    if lora:
        set_lora_enabled(encoder, False)
    module.mask_decoder = base_decoder.to(next(tuned.parameters()).device)
    try:
        yield
    finally:
        module.mask_decoder = tuned
        if lora:
            set_lora_enabled(encoder, True)
            for p, flag in flags.items():
                p.requires_grad_(flag)


def prompts_prefer_base(mode: str, tuned_box: float, base_box: float, margin: float) -> bool:
    """Whether prompts should use the base model.

    Args:
        mode: One of :data:`PROMPT_WEIGHTS`.
        tuned_box, base_box: Validation box-prompt Dice of the fine-tuned and the base model
            (NaN when nothing could be prompted).
        margin: Dice the fine-tuned model must gain before it replaces the base for prompts.
    """
    if mode not in PROMPT_WEIGHTS:
        raise ValueError(f"prompt_weights must be one of {PROMPT_WEIGHTS}, got {mode!r}")
    if mode != "auto":
        return mode == "base"
    if tuned_box != tuned_box or base_box != base_box:  # NaN: no evidence either way
        return True
    return not tuned_box > base_box + margin
