"""Connected-component post-processing of label maps (nnU-Net-style "keep the largest").

A few-shot 3-D model trained from two atlases often paints a few voxels of a structure far
from the anatomy (a heart-like blob in the stomach). For structures that are one connected
piece in every atlas, only the largest predicted piece is kept; the rule is learned from the
atlases, so classes that come in several pieces (both kidneys as one class) are left alone.

Arrays: label maps (Z, Y, X) or (Y, X) of integer class ids, 0 = background; numpy in/out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component map, sizes of components 1..n) with full (8/26) connectivity."""
    comp, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return comp, np.bincount(comp.ravel(), minlength=n + 1)[1:]


def single_piece_classes(labels: Sequence[np.ndarray], num_classes: int, share: float = 0.95) -> list[int]:
    """Classes whose largest connected piece holds ≥ ``share`` of their voxels in every map.

    Args:
        labels: Label maps (the atlases), each (Z, Y, X).
        num_classes: Classes including background.
        share: Tolerance for stray painted voxels.

    Returns:
        Sorted foreground class ids (classes absent from every map are excluded).
    """
    out = []
    for c in range(1, num_classes):
        seen, single = False, True
        for lab in labels:
            mask = np.asarray(lab) == c
            if not mask.any():
                continue
            seen = True
            _, sizes = _components(mask)
            single &= bool(sizes.max() >= share * sizes.sum())
        if seen and single:
            out.append(c)
    return out


def keep_largest(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Copy of ``labels`` where each class in ``classes`` keeps only its largest piece.

    Voxels of the removed pieces become background (0).
    """
    out = np.array(labels, copy=True)
    for c in classes:
        mask = out == c
        if not mask.any():
            continue
        comp, sizes = _components(mask)
        if sizes.size > 1:
            out[mask & (comp != int(np.argmax(sizes)) + 1)] = 0
    return out
