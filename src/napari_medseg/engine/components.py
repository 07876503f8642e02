"""Connected-component post-processing of label maps (nnU-Net-style "keep the largest").

A few-shot 3-D model trained from two atlases often paints a few voxels of a structure far
from the anatomy (a heart-like blob in the stomach). For structures that are one connected
piece in every atlas, only the largest predicted piece is kept; the rule is learned from the
atlases, so classes that come in several pieces (both kidneys as one class) are left alone.
Where all structures together form one piece in every atlas (the heart's chambers and wall),
one piece of their union is kept first, as in nnU-Net's post-processing, but chosen as the
piece that holds every structure rather than the biggest: a false "right ventricle" elsewhere
that is bigger than the true one then no longer wins that class.

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


def _is_single_piece(mask: np.ndarray, share: float) -> bool:
    """Whether the largest piece of a non-empty ``mask`` holds ≥ ``share`` of its voxels."""
    _, sizes = _components(mask)
    return bool(sizes.max() >= share * sizes.sum())


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
            single &= _is_single_piece(mask, share)
        if seen and single:
            out.append(c)
    return out


def single_piece_union(labels: Sequence[np.ndarray], share: float = 0.95) -> bool:
    """Whether two or more foreground classes together are one piece in every map.

    Args:
        labels: Label maps (the atlases), each (Z, Y, X).
        share: Tolerance for stray painted voxels, as in :func:`single_piece_classes`.

    Returns:
        False when any map is empty or its foreground comes in several pieces, and with a
        single foreground class (the per-class rule already covers it).
    """
    masks = [np.asarray(lab) > 0 for lab in labels]
    classes = set().union(*(np.unique(np.asarray(lab)).tolist() for lab in labels)) - {0}
    return len(classes) > 1 and all(m.any() and _is_single_piece(m, share) for m in masks)


def _outside_main_piece(labels: np.ndarray, bridge: int = 0, select: str = "size") -> np.ndarray:
    """Foreground voxels of ``labels`` outside its main piece (all False with ≤ 1 piece).

    ``labels`` is a label map or a boolean mask (one class); ``bridge`` and ``select`` as
    ``union_bridge`` and ``union_select`` of :func:`keep_largest`. The defaults give the
    largest piece by strict connectivity.
    """
    fg = labels > 0
    grown = ndimage.binary_dilation(fg, np.ones((3,) * fg.ndim, bool), bridge) if bridge else fg
    comp, n = ndimage.label(grown, structure=np.ones((3,) * fg.ndim, dtype=bool))
    if n <= 1:
        return np.zeros_like(fg)
    k = int(labels.max()) + 1
    # counts[i, c]: voxels of class c in piece i + 1 (the grown margin itself counts nothing).
    counts = np.bincount(comp[fg] * k + labels[fg], minlength=(n + 1) * k).reshape(n + 1, k)[1:, 1:]
    if select == "size":
        score = counts.sum(1).astype(float)
    elif select == "balanced":  # geometric mean over classes: the piece holding every structure
        score = np.log1p(counts).mean(1)
    else:
        raise ValueError(f'union_select must be "balanced" or "size", got {select!r}')
    return fg & (comp != int(np.argmax(score)) + 1)


def keep_largest(
    labels: np.ndarray,
    classes: Iterable[int],
    union: bool = False,
    union_bridge: int = 1,
    union_select: str = "balanced",
) -> np.ndarray:
    """Copy of ``labels`` where each class in ``classes`` keeps only its largest piece.

    Args:
        labels: Integer label map (Z, Y, X) or (Y, X), 0 = background.
        classes: Class ids reduced to their largest piece.
        union: First keep only the main piece of all foreground classes together (for
            anatomy that is one piece in every atlas, see :func:`single_piece_union`).
        union_bridge: In that first step, pieces at most 2·``union_bridge`` voxels apart
            count as one, so a structure the prediction detached by a thin gap (a right
            ventricle off the septum) is kept; 0 = strict connectivity.
        union_select: Which piece is the main one: ``"balanced"`` the largest geometric mean
            of its per-class voxel counts (one class alone = its size), so a big false blob
            of one class loses to the smaller piece that holds every structure; ``"size"``
            the most voxels (nnU-Net's rule).

    Returns:
        The new map; voxels of the removed pieces become background (0).
    """
    out = np.array(labels, copy=True)
    if union:
        out[_outside_main_piece(out, union_bridge, union_select)] = 0
    for c in classes:
        mask = out == c
        if mask.any():
            out[_outside_main_piece(mask)] = 0
    return out
