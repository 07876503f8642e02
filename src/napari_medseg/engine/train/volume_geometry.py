"""Geometry of few-shot 3-D training: target spacing, patch shape, pooling, resampling.

Kept apart from the patch sampler (volume_data.py) because inference must plan and resample
exactly as training did. Coordinates are (z, y, x) throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.train.data import TrainingDataError

Spacing = tuple[float, float, float]


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Plan:
    """Working geometry: spacing volumes are resampled to, patch shape and pooling factors."""

    target_spacing: Spacing
    patch: tuple[int, int, int]
    pools: list[tuple[int, int, int]]


def near_finest(spacing: np.ndarray) -> list[bool]:
    """Per axis: is the spacing at most twice the finest (nnU-Net's rule for pooling and kernels)."""
    return [bool(v <= 2 * spacing.min() + 1e-6) for v in spacing]


def plan_geometry(
    shapes: Sequence[Sequence[int]],
    spacings: Sequence[Spacing],
    levels: int,
    patch_voxels: int,
    max_volume_voxels: int = 0,
    target: Spacing | None = None,
) -> Plan:
    """Choose target spacing, patch and pooling from the atlases (nnU-Net-like rules).

    Args:
        shapes: (Z, Y, X) shapes of the atlases.
        spacings: Their (z, y, x) voxel spacings.
        levels: Number of down-sampling steps of the U-Net.
        patch_voxels: Largest patch volume in voxels.
        max_volume_voxels: If > 0, coarsen the finest axes until the median atlas has at most
            this many voxels (CPU budget); 0 keeps the median spacing.
        target: Fixed target spacing (e.g. of an already trained model).

    Returns:
        A :class:`Plan`; patch edges are multiples of the pooling product per axis.
    """
    extent = np.median([np.asarray(s) * np.asarray(sp) for s, sp in zip(shapes, spacings)], 0)
    if target is None:
        t = np.median(np.asarray(spacings, float), 0)
        if max_volume_voxels and np.prod(extent / t) > max_volume_voxels:
            lo, hi = float(t.min()), float(extent.max())
            for _ in range(60):  # bisection on the floor spacing c: t_i -> max(t_i, c)
                c = 0.5 * (lo + hi)
                lo, hi = (c, hi) if np.prod(extent / np.maximum(t, c)) > max_volume_voxels else (lo, c)
            t = np.maximum(t, hi)
    else:
        t = np.asarray(target, float)
    size = np.maximum(1, np.round(extent / t)).astype(int)
    patch = np.maximum(4, size)
    while np.prod(patch) > patch_voxels:
        axis = int(np.argmax(patch * t))
        patch[axis] = max(4, int(patch[axis] * 0.9))
        if np.all(patch == 4):
            break
    pools: list[tuple[int, int, int]] = []
    cur, edge = t.copy(), patch.astype(float)
    for _ in range(levels):
        fine = near_finest(cur)
        p = tuple(2 if (fine[a] and edge[a] >= 8) else 1 for a in range(3))
        pools.append(p)  # type: ignore[arg-type]
        cur, edge = cur * p, edge / p
    div = [math.prod(p[a] for p in pools) for a in range(3)]
    patch = np.array([math.ceil(n / d) * d for n, d in zip(patch, div)])
    return Plan(tuple(float(v) for v in t), tuple(int(v) for v in patch), pools)  # type: ignore[arg-type]


def conv_kernels(spacing: Sequence[float], pools: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """nnU-Net's per-level convolution kernels for a spacing and pooling plan.

    An axis gets a kernel of 3 at a level only where its current spacing is at most twice the
    finest one (the rule that also decides pooling), otherwise 1: a 3×3×3 kernel across 10 mm
    cardiac slices at 1.5–2.5 mm in plane mixes tissue that barely corresponds.

    Args:
        spacing: (z, y, x) target spacing of level 0.
        pools: Pooling factors of the ``levels`` down-steps.

    Returns:
        ``levels + 1`` kernels (z, y, x), finest level first (entry i is encoder level i).
    """
    cur = np.asarray(spacing, float)
    kernels: list[tuple[int, int, int]] = []
    for p in [*pools, (1, 1, 1)]:
        kernels.append(tuple(3 if f else 1 for f in near_finest(cur)))  # type: ignore[arg-type]
        cur = cur * np.asarray(p, float)
    return kernels


def resample(data: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Resample a (C, Z, Y, X) float volume from ``spacing`` to ``target`` (trilinear)."""
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(data.shape[1:], spacing, target))
    if shape == data.shape[1:]:
        return data
    x = torch.from_numpy(np.ascontiguousarray(data, np.float32))[None]
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0].numpy()


def resample_labels(label: np.ndarray, shape: Sequence[int], num_classes: int) -> np.ndarray:
    """Resample (Z, Y, X) labels to ``shape`` by interpolating one-hot maps (smooth boundaries)."""
    if tuple(shape) == label.shape:
        return label.astype(np.int64)
    onehot = F.one_hot(torch.from_numpy(label.astype(np.int64)), num_classes).movedim(-1, 0).float()
    out = F.interpolate(onehot[None], size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0].argmax(0).numpy().astype(np.int64)


def pad_to(data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad the last three axes (at the end) up to at least ``shape``."""
    pads = [(0, 0)] * (data.ndim - 3) + [(0, max(0, s - n)) for n, s in zip(data.shape[-3:], shape)]
    return np.pad(data, pads) if any(p[1] for p in pads) else data


def spacing_list(value: Any, n: int, what: str) -> list[Spacing]:
    """One (z, y, x) spacing or one per volume → list of ``n`` spacings (None → 1 mm)."""
    if value is None:
        return [(1.0, 1.0, 1.0)] * n
    arr = np.asarray(value, float)
    if arr.shape == (3,):
        arr = np.tile(arr, (n, 1))
    if arr.shape != (n, 3) or np.any(arr <= 0):
        raise TrainingDataError(f"{what}: give one positive (z, y, x) spacing or one per volume")
    return [tuple(float(v) for v in row) for row in arr]  # type: ignore[misc]
