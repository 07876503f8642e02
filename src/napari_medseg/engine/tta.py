"""Test-time views: resolving a ``tta`` option, and 2-D class probabilities averaged over flips.

A network fine-tuned on a few painted slices answers differently for an image and its mirror
image; averaging the two (or four) answers removes part of that noise. Only views that
training showed the network are used: left-right mirroring for models trained upright
(``orientation="upright"``), all four flips for models trained on every orientation.
Measured on HF-SAM in docs/models/hf-sam.md.

Tensors: (B, C, H, W) images in, (B, K, H, W) logits out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# Spatial dims flipped per view, in the order the view counts take them: 1 = as is,
# 2 = + left-right mirror, 4 = + upside down and both (= a half turn).
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
VIEW_COUNTS = (1, 2, 4)


def resolve_views(option: int | str, trained: int | None) -> int:
    """Views a ``tta`` option asks for: ``"auto"`` → what training stored (``trained``, None →
    1), else the option itself as an int (at least 1). Shared by every network's ``tta``.
    """
    return max(1, int((trained or 1) if option == "auto" else option))


def views_for_orientation(orientation: str) -> int:
    """Mirrored views a model trained with ``orientation`` ("upright" / "any") has seen."""
    return 2 if orientation == "upright" else 4


def flip_averaged_logits(logits: LogitsFn, x: torch.Tensor, views: int) -> torch.Tensor:
    """Log of the class probabilities averaged over ``views`` mirrored copies of ``x``.

    Args:
        logits: (B, C, H, W) → (B, K, H, W) raw class scores.
        x: (B, C, H, W) input batch.
        views: 1, 2 or 4 (see :data:`FLIPS`); 1 returns ``logits(x)`` unchanged.

    Returns:
        (B, K, H, W) float32 log-probabilities (argmax and softmax behave as on logits).
    """
    if views not in VIEW_COUNTS:
        raise ValueError(f"test-time views must be one of {VIEW_COUNTS}, got {views!r}")
    if views == 1:
        return logits(x)
    total: torch.Tensor | None = None
    for dims in FLIPS[:views]:
        out = logits(x.flip(dims) if dims else x)
        prob = (out.flip(dims) if dims else out).float().softmax(1)
        total = prob if total is None else total + prob
    assert total is not None
    # clamp: a class no view chose gets a tiny probability instead of log(0) = -inf.
    return (total / views).clamp_min(1e-8).log()
