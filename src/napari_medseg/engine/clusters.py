"""Turning cluster maps (S³-Net output) into masks, and scoring them.

A cluster map is an integer array whose values are cluster ids; it carries no notion of
"lesion". The user chooses clusters by clicking on them (:func:`cluster_at`); benchmarks score
with :func:`best_cluster` (an oracle: the single cluster closest to the ground truth, no
cropping) and with label-free rules such as :func:`centre_cluster`. Coordinates are (row, col)
for 2-D and (z, row, col) for 3-D, as napari gives them in data space.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from napari_medseg.engine.metrics import dice


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber the ids of a cluster map 1..K by decreasing size (1 = largest).

    Ties are broken by the smaller original id, so the result is deterministic.

    Args:
        labels: Integer array of any shape (every value is a cluster, 0 included).

    Returns:
        int32 array of the same shape with values in 1..K.
    """
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.lexsort((ids, -counts))  # primary key: count, descending
    rank = np.empty(len(ids), dtype=np.int32)
    rank[order] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return rank[inverse.reshape(labels.shape)]


def average_linkage_groups(distance: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """Group items by weighted average linkage (UPGMA), cutting the tree at ``threshold``.

    Two groups merge, closest first, while their distance is at most ``threshold``; the
    distance of a merged group to any other is the mean of its members' distances weighted by
    ``weights`` (so with pixel counts as weights, a fragment of 500 pixels counts 500 times
    one of a single pixel). Average linkage is reducible, so merging greedily in this order
    cuts the same tree that a full dendrogram would give.

    Args:
        distance: (n, n) symmetric distances, any values on the diagonal.
        weights: (n,) positive weight of every item.
        threshold: Largest distance at which two groups still merge.

    Returns:
        (n,) int64 group ids 1..G (in no particular order).
    """
    d = np.array(distance, dtype=np.float64)
    np.fill_diagonal(d, np.inf)
    w = np.asarray(weights, dtype=np.float64).copy()
    parent = np.arange(len(w))
    # Each row's nearest other group, kept up to date so that a merge costs O(n), not O(n²).
    row_min, row_arg = d.min(axis=1), d.argmin(axis=1)
    while True:  # ends when the closest pair is farther than threshold (inf: one group left)
        i = int(np.argmin(row_min))
        j = int(row_arg[i])
        if not row_min[i] <= threshold:
            break
        merged = (w[i] * d[i] + w[j] * d[j]) / (w[i] + w[j])
        merged[[i, j]] = np.inf
        d[i, :], d[:, i] = merged, merged
        d[j, :], d[:, j] = np.inf, np.inf
        w[i] += w[j]
        parent[parent == j] = i
        row_min[j] = np.inf
        stale = (row_arg == i) | (row_arg == j)
        stale[i], stale[j] = True, False
        rows = np.flatnonzero(stale)
        row_min[rows], row_arg[rows] = d[rows].min(axis=1), d[rows].argmin(axis=1)
        closer = merged < row_min
        row_min[closer], row_arg[closer] = merged[closer], i
    return np.unique(parent, return_inverse=True)[1].astype(np.int64) + 1


def consensus_clusters(
    maps: Sequence[np.ndarray],
    threshold: float = 0.75,
    min_fraction: float = 1e-3,
) -> np.ndarray:
    """Consensus of several cluster maps of one image (evidence accumulation).

    Pixels that carry the same tuple of ids in every map form a *fragment*. Two fragments
    disagree by the share of maps that put them in different clusters; fragments are merged
    by average linkage weighted by their pixel counts (:func:`average_linkage_groups`) until
    the mean disagreement between groups, over their pixels, would exceed ``threshold``.
    Weighting by pixels keeps the many small fragments along cluster borders, on which the
    runs disagree, from outvoting the large ones they agree on. (Until 2026-12-06 every
    fragment counted once, at ``threshold=0.65``: with R runs the disagreements are
    multiples of 1/R, so ties were many and the order in which tied groups merged moved
    BUSI's best-region Dice by 0.08; docs/models/s3-net.md.)
    Fragments smaller than ``min_fraction`` of the pixels do not take part in the linkage
    (they are many and noisy) and join the group of the large fragment they disagree with
    least. Ids are arbitrary in each map, so only co-membership counts.

    Args:
        maps: R ≥ 1 integer cluster maps of one shape (e.g. (Y, X)), from runs with
            different seeds.
        threshold: Largest mean disagreement (0–1) within a merged group; 0.75 merges what
            at least a quarter of the runs (on average over the pixels) put together.
        min_fraction: Smallest fragment, as a share of the pixels, that joins the linkage.

    Returns:
        int32 map of the same shape with ids 1..K, 1 = the largest consensus cluster.
    """
    shape = np.shape(maps[0])
    if any(np.shape(m) != shape for m in maps):
        raise ValueError("consensus_clusters: all maps must have the same shape")
    stack = np.stack([np.asarray(m).ravel() for m in maps], axis=1)
    tuples, inverse, counts = np.unique(stack, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    large = np.flatnonzero(counts >= min_fraction * stack.shape[0])
    if large.size == 0:  # every fragment tiny: take the largest alone as the seed group
        large = np.array([int(np.argmax(counts))])
    ref = tuples[large]
    disagree = (ref[:, None, :] != ref[None, :, :]).mean(axis=-1)
    group_large = average_linkage_groups(disagree, counts[large], threshold)
    group = np.zeros(len(tuples), dtype=np.int64)
    group[large] = group_large
    small = np.setdiff1d(np.arange(len(tuples)), large)
    if small.size:
        nearest = (tuples[small][:, None, :] != ref[None, :, :]).mean(axis=-1).argmin(axis=1)
        group[small] = group_large[nearest]
    return relabel_by_size(group[inverse].reshape(shape))


def _neighbour_pairs(pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) ids of every pair of 8-neighbouring pixels of a (Y, X) map that differ, both ways."""
    pairs = [
        (pieces[:, :-1], pieces[:, 1:]),
        (pieces[:-1, :], pieces[1:, :]),
        (pieces[:-1, :-1], pieces[1:, 1:]),
        (pieces[:-1, 1:], pieces[1:, :-1]),
    ]
    a = np.concatenate([p.ravel() for p, _ in pairs] + [q.ravel() for _, q in pairs])
    b = np.concatenate([q.ravel() for _, q in pairs] + [p.ravel() for p, _ in pairs])
    keep = a != b
    return a[keep], b[keep]


def split_regions(labels: np.ndarray, min_fraction: float = 0.01) -> np.ndarray:
    """Split every cluster into its connected pieces; pieces too small to matter join a neighbour.

    S³-Net's clusters group pixels by colour, not by place: a lesion often shares its id with
    dark image corners, hair or shadows elsewhere, so no single cluster is the lesion. After
    this, each connected piece (8-connectivity) is a region of its own and a click or the
    best-region score can take the lesion without the rest. Pieces smaller than
    ``min_fraction`` of the pixels (specks, thin borders between clusters) join the
    neighbouring piece they share the longest border with, preferring pieces that are large
    enough themselves, so the number of regions stays small. A (Z, Y, X) map is split slice
    by slice (S³-Net clusters each slice on its own).

    Args:
        labels: (Y, X) or (Z, Y, X) integer cluster map.
        min_fraction: Smallest region kept, as a share of the slice's pixels (0 = keep every
            piece).

    Returns:
        int32 map of the same shape with ids 1..K per slice, 1 = the largest region.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3:
        return np.stack([split_regions(s, min_fraction) for s in labels])
    if labels.ndim != 2:
        raise ValueError(f"split_regions: expected a (Y, X) or (Z, Y, X) map, got shape {labels.shape}")
    pieces = np.zeros(labels.shape, dtype=np.int64)
    n = 0
    for k in np.unique(labels):
        comp, m = ndimage.label(labels == k, structure=np.ones((3, 3), dtype=bool))
        pieces[comp > 0] = comp[comp > 0] + n
        n += m
    min_pixels = min_fraction * labels.size
    while True:
        sizes = np.bincount(pieces.ravel(), minlength=n + 1)
        small = (sizes > 0) & (sizes < min_pixels)
        if not small.any() or np.count_nonzero(sizes) < 2:
            break
        a, b = _neighbour_pairs(pieces)
        codes, border = np.unique(a * (n + 1) + b, return_counts=True)
        src, dst = codes // (n + 1), codes % (n + 1)
        # Best neighbour of each small piece: a large one if it has any, then the longest border.
        rank = np.where(small[dst], 0, 1) * (border.max() + 1) + border
        on_small = small[src]
        src, dst, rank = src[on_small], dst[on_small], rank[on_small]
        order = np.lexsort((-rank, src))
        first = np.r_[True, src[order][1:] != src[order][:-1]]
        src, dst = src[order][first], dst[order][first]
        to_large = ~small[dst]
        if to_large.any():
            # Large targets are never merged away in this pass, so all such moves can be made at once.
            src, dst = src[to_large], dst[to_large]
        else:
            # Only small pieces around: merge the smallest one and look again (no chains or cycles).
            i = int(np.argmin(sizes[src]))
            src, dst = src[i : i + 1], dst[i : i + 1]
        target = np.arange(n + 1)
        target[src] = dst
        pieces = target[pieces]
    return relabel_by_size(pieces)


def _check_point(point: Sequence[float], shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(point) != len(shape):
        raise ValueError(
            f"point {tuple(point)} has {len(point)} coordinates; labels are {len(shape)}-D {shape}"
        )
    idx = tuple(int(round(float(c))) for c in point)
    if any(i < 0 or i >= s for i, s in zip(idx, shape)):
        raise ValueError(f"point {tuple(point)} lies outside the labels of shape {shape}")
    return idx


def cluster_at(
    labels: np.ndarray,
    points: Iterable[Sequence[float]],
    connected: bool = False,
    same_slice: bool = False,
    fill_holes: bool = False,
) -> np.ndarray:
    """Mask of the clusters under the given points.

    Args:
        labels: (Y, X) or (Z, Y, X) integer cluster map.
        points: (row, col) points for 2-D, (z, row, col) for 3-D, in data pixel coordinates
            (rounded to the nearest pixel).
        connected: Keep only the connected piece (8-/26-connectivity) of each cluster that
            contains the point, instead of every pixel with that id (useful when a lesion shares
            its colour cluster with, e.g., dark image corners).
        same_slice: 3-D only: select in the point's slice only. S³-Net optimises each slice on
            its own, so the same id in another slice is a different cluster; its ids are
            ordered by size per slice, which usually but not always keeps them alike.
        fill_holes: Fill the holes of the kept mask (per slice for 3-D: S³-Net clusters
            slices on their own). Lesions often split into a dark centre and a lighter rim
            that are different clusters; a click on the rim then gives a ring.

    Returns:
        bool array of ``labels``'s shape; all False when ``points`` is empty.

    Raises:
        ValueError: A point with the wrong number of coordinates or outside the array.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2-D or 3-D, got shape {labels.shape}")
    mask = np.zeros(labels.shape, dtype=bool)
    for point in points:
        idx = _check_point(point, labels.shape)
        if mask[idx]:
            continue  # already inside a kept region
        region = labels == labels[idx]
        if same_slice and labels.ndim == 3:
            only = np.zeros_like(region)
            only[idx[0]] = region[idx[0]]
            region = only
        if connected:
            comp, _ = ndimage.label(region, structure=np.ones((3,) * labels.ndim, dtype=bool))
            region = comp == comp[idx]
        mask |= region
    if fill_holes:
        mask = _fill_holes(mask)
    return mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes of a (Y, X) mask filled, or of each slice of a (Z, Y, X) mask."""
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    return np.stack([ndimage.binary_fill_holes(m) for m in mask])


def best_cluster(labels: np.ndarray, target: np.ndarray) -> tuple[int, float]:
    """Oracle score: the single cluster with the highest Dice against the target, uncropped.

    This is the figure this project reports for S³-Net (specs/networks.md §3.4); unlike the
    released ``create_mask`` it does not crop the prediction with the dilated ground truth.

    Args:
        labels: Integer cluster map.
        target: Ground-truth mask of the same shape (non-zero = lesion).

    Returns:
        (cluster id, Dice); (0, 0.0) when the labels are empty.
    """
    labels = np.asarray(labels)
    target = np.asarray(target) > 0
    best = (0, 0.0)
    for k in np.unique(labels):
        d = dice(labels == k, target)
        if d > best[1]:
            best = (int(k), d)
    return best


def centre_cluster(labels: np.ndarray, connected: bool = False, fill_holes: bool = False) -> np.ndarray:
    """Label-free rule: the cluster under the array's centre (a click in the middle).

    Args:
        labels: (Y, X) or (Z, Y, X) cluster map.
        connected, fill_holes: See :func:`cluster_at`.

    Returns:
        bool mask of ``labels``'s shape.
    """
    centre = tuple((s - 1) / 2.0 for s in np.shape(labels))
    return cluster_at(labels, [centre], connected=connected, fill_holes=fill_holes)


def gt_cropped_dice(labels: np.ndarray, target: np.ndarray) -> float:
    """The released code's protocol (``utils.create_mask``) — for reference only.

    Dilates the target with a 5×5 square twice, takes the most frequent non-zero cluster id
    inside the target, and crops that cluster to the dilated target before scoring. Both the
    choice and the crop use the ground truth, so the figure overstates what a user gets.

    Args:
        labels: (Y, X) cluster map (cluster id 0 can never be chosen, as in the code).
        target: (Y, X) ground-truth mask.

    Returns:
        Dice of the cropped cluster (0.0 if no non-zero cluster touches the target).
    """
    labels = np.asarray(labels)
    target = np.asarray(target) > 0
    grown = ndimage.binary_dilation(target, structure=np.ones((5, 5), dtype=bool), iterations=2)
    inside = labels[target]
    inside = inside[inside != 0]
    if inside.size == 0:
        return 0.0
    ids, counts = np.unique(inside, return_counts=True)
    chosen = ids[np.argmax(counts)]
    return dice((labels == chosen) & grown, target)
