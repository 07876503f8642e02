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

The base path is exactly the model before fine-tuning — no LoRA, SAM's own decoder, no fusion —
seen through a view that shares the fine-tuned model's weights (:func:`base_view`), so
zero-shot prompting is reproduced to float rounding (tested) without touching that model.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from torch import nn

from napari_medseg.models.hf_sam.lora import has_lora

PROMPT_WEIGHTS = ("auto", "finetuned", "base")


def frozen_copy(decoder: nn.Module) -> nn.Module:
    """An evaluation-mode, gradient-free copy of SAM's mask decoder (the base prompt decoder)."""
    base = copy.deepcopy(decoder).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _lora_free(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` that shares every parameter, with LoRA layers unwrapped.

    Each peft LoRA layer is replaced by its base layer; every other module is a shallow copy
    with its own child table, so the original model is never modified.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer  # only reached when LoRA is in use

    if isinstance(module, BaseTunerLayer):
        return _lora_free(module.get_base_layer())
    view = copy.copy(module)
    view._modules = {k: None if m is None else _lora_free(m) for k, m in module._modules.items()}
    return view


def base_view(module: Any, base_decoder: nn.Module) -> Any:
    """The fine-tuned HFSAM ``module`` seen as its untouched base model, without changing it.

    The view shares every weight with ``module`` (no copy of the encoder), but its encoder has
    no LoRA and its mask decoder is ``base_decoder``; callers drop the early feature so the
    fusion module is skipped. Nothing of ``module`` is switched or swapped, so a prompt decoded
    with the view can run while another thread segments with the fine-tuned model.

    Args:
        module: An HFSAM, possibly with LoRA injected and a fine-tuned decoder.
        base_decoder: The frozen copy of SAM's decoder taken before fine-tuning.
    """
    view = copy.copy(module)
    view._modules = dict(module._modules)
    encoder = module.image_encoder
    view._modules["image_encoder"] = _lora_free(encoder) if has_lora(encoder) else encoder
    view._modules["mask_decoder"] = base_decoder.to(module.pixel_mean.device)
    # The view keeps its own decoder caches (they are keyed on the decoder's identity too).
    view._side_cache = None
    return view


def cached_base_view(seg: Any) -> Any:
    """``seg.module``'s :func:`base_view`, built once and rebuilt only when it would be stale.

    Training may replace the module or inject LoRA; the view shares weights, so weight updates
    alone need no rebuild.
    """
    key = (id(seg.module), has_lora(seg.module.image_encoder))
    cached = getattr(seg, "_base_view", None)
    if cached is None or cached[0] != key:
        cached = (key, base_view(seg.module, seg._base_decoder))
        seg._base_view = cached
    return cached[1]


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


def validate_prompts(seg: Any, val: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Score box prompts both ways on the validation slices and record the choice.

    Args:
        seg: The HF-SAM segmenter being fine-tuned.
        val: (C, Y, X) float images in [0, 1] and (Y, X) int labels at the working size.

    Returns:
        ``val_box_dice_tuned`` / ``val_box_dice_base`` (the base once per run) and
        ``val_box_dice``, the one prompts will use; the choice goes to ``hf.prompt_from_base``.
    """
    from napari_medseg.engine.networks.hf_sam_train import validation_box_dice

    cfg = seg.config
    tuned = validation_box_dice(seg, val, base=False)
    if getattr(seg, "_val_base_box", None) is None:
        seg._val_base_box = validation_box_dice(seg, val, base=True)
    base = float(seg._val_base_box)
    mode = str(cfg["prompt_weights"])
    # One painted slice: validation sees only views of it, no evidence for tuned prompts.
    if mode == "auto" and getattr(seg, "_val_from_training", False):
        mode = "base"
    use_base = prompts_prefer_base(mode, tuned, base, float(cfg["prompt_margin"]))
    seg.module.hf.prompt_from_base.fill_(float(use_base))
    chosen = base if use_base else tuned
    return {"val_box_dice": chosen, "val_box_dice_tuned": tuned, "val_box_dice_base": base}


def prompt_note(seg: Any) -> str:
    """The sentence telling the user which weights decode their prompts after fine-tuning."""
    if seg.prompts_use_base:
        return (
            " Prompts keep using the base model: fine-tuning did not improve box prompts on "
            "the validation slices (prompt_weights)."
        )
    return " Prompts use the fine-tuned weights (they beat the base model on validation)."
