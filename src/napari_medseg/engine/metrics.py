"""Overlap metrics on label arrays (numpy)."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    denom = pred.sum() + target.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, target).sum() / denom)


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of every foreground class present in ``target`` or ``pred`` (ids 1..K-1)."""
    out: dict[int, float] = {}
    for k in range(1, num_classes):
        t, p = target == k, pred == k
        if t.any() or p.any():
            out[k] = dice(p, t)
    return out


def mean_foreground_dice(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present (1.0 if none is present anywhere)."""
    per = dice_per_class(pred, target, num_classes)
    return float(np.mean(list(per.values()))) if per else 1.0
