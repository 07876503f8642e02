"""Segmentation losses on logits (B, K, *S) and integer labels (B, *S)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    include_background: bool = True,
    eps: float = 1e-5,
    squared: bool = True,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 - mean soft Dice over classes, on softmax probabilities.

    Args:
        logits: (B, K, *S) raw scores.
        labels: (B, *S) int64 class ids in ``[0, K)``.
        include_background: Whether class 0 counts in the mean.
        eps: Smoothing added to numerator and denominator.
        squared: Denominator Σp² + Σt² (SAMed/H-SAM/HF-SAM, V-Net) if True, else Σp + Σt
            (nnU-Net's soft Dice).
        weight: Optional (B, *S) non-negative voxel weights on every sum (0 = ignored).
    """
    k = logits.shape[1]
    probs = logits.float().softmax(1)
    onehot = F.one_hot(labels.long(), k).movedim(-1, 1).float()
    probs_w, onehot_w = probs, onehot
    if weight is not None:
        w = weight.float().unsqueeze(1)
        probs_w, onehot_w = probs * w, onehot * w
    dims = (0,) + tuple(range(2, logits.ndim))
    inter = (probs * onehot_w).sum(dims)
    denom = ((probs * probs_w) if squared else probs_w).sum(dims) + onehot_w.sum(dims)
    per_class = 1 - (2 * inter + eps) / (denom + eps)
    if not include_background and k > 1:
        per_class = per_class[1:]
    return per_class.mean()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017) without class weights."""
    logp = F.log_softmax(logits.float(), 1)
    logp_t = logp.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return (-((1 - logp_t.exp()) ** gamma) * logp_t).mean()


LOSSES = ("ce", "dice", "dice_ce", "focal", "hfsam")


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str = "dice_ce", squared_dice: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """A named loss and its terms.

    Args:
        logits: (B, K, *S).
        labels: (B, *S) int64.
        kind: ``"ce"`` (STS-Net as released), ``"dice"``, ``"dice_ce"`` (CE + Dice, equal
            weights), ``"focal"``, or ``"hfsam"`` (0.1·CE + 0.9·Dice incl. background, the
            HF-SAM paper's loss).
        squared_dice: Dice denominator form, see :func:`soft_dice_loss`.

    Returns:
        (loss, {term name: value}).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    labels = labels.long()
    terms: dict[str, torch.Tensor] = {}
    if kind in ("ce", "dice_ce", "hfsam"):
        terms["ce"] = F.cross_entropy(logits.float(), labels)
    if kind in ("dice", "dice_ce", "hfsam"):
        terms["dice"] = soft_dice_loss(
            logits, labels, include_background=kind == "hfsam", squared=squared_dice
        )
    if kind == "focal":
        terms["focal"] = focal_loss(logits, labels)
    if kind == "hfsam":
        loss = 0.1 * terms["ce"] + 0.9 * terms["dice"]
    else:
        loss = sum(terms.values())  # type: ignore[assignment]
    return loss, {k: float(v.detach()) for k, v in terms.items()}
