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
    # Rounded to 1e-6 first: 10.5 slices must round alike whatever the spacing's units
    # (7.3 × 10.5 / 7.3 is 10.500000000000002 in floating point, 10 × 10.5 / 10 is 10.5).
    size = np.maximum(1, np.round(np.round(extent / t, 6))).astype(int)
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


# ----------------------------------------------------------------------------- unknown spacing
#: A volume that states 1 mm on every axis (a file with no voxel size: identity-affine NIfTI,
#: TIFF, NumPy) is treated as anisotropic when an axis looks at least this many times coarser
#: (isotropic LA-2018 reads at most 1.34, ACDC's thick slices 2.6–8.7: see estimate_spacing).
ANISOTROPY_RATIO = 2.5
_CROP = 128  # voxels per axis of the central block the estimate reads (bounds time and memory)


def is_unit(spacing: Sequence[float]) -> bool:
    """True for (1, 1, 1): what readers report when a file carries no voxel size."""
    return all(float(v) == 1.0 for v in spacing)


def _mean_step(v: np.ndarray, axis: int, lag: int) -> float:
    """Mean |v(p + lag·e_axis) − v(p)| over the volume (NaN when the axis is too short)."""
    m = np.moveaxis(v, axis, 0)
    return float(np.mean(np.abs(m[lag:] - m[:-lag]))) if lag < m.shape[0] else float("nan")


def estimate_spacing(volume: np.ndarray, max_lag: int = 24) -> Spacing:
    """Relative (z, y, x) voxel size read from the image itself, the finest axis = 1.

    The ruler is the image's own structure function along its finest axes: the mean
    intensity change over k voxels, k = 1, 2, ... An axis whose one-voxel change equals the
    fine axes' k-voxel change has voxels about k times as large. Anatomy is not isotropic, so
    the figure is rough — ACDC cine MRI (5–10 mm slices, 1.3–1.7 mm pixels) reads 2.6–8.7,
    isotropic LA-2018 1.05–1.34 — but it tells thick slices from cubes.

    Args:
        volume: (Z, Y, X) intensities (any range; the 1st–99th percentiles are used).
        max_lag: Largest ratio that can be read.

    Returns:
        (z, y, x) sizes relative to the finest axis; axes that change less per voxel than
        the finest one read 1.
    """
    sl = tuple(slice(max(0, (n - _CROP) // 2), max(0, (n - _CROP) // 2) + _CROP) for n in volume.shape)
    v = np.asarray(volume[sl], np.float32)
    lo, hi = np.percentile(v, [1, 99])
    v = np.clip((v - lo) / max(float(hi - lo), 1e-6), 0, 1)
    step = np.array([_mean_step(v, a, 1) for a in range(3)])
    if not np.all(np.isfinite(step)) or step.min() <= 0:
        return (1.0, 1.0, 1.0)
    fine = [a for a in range(3) if step[a] <= 1.5 * step.min()]  # the in-plane axes, usually
    out = []
    for a in range(3):
        ref = [b for b in fine if b != a] or fine
        prev, ratio = float(np.mean(step[ref])), 1.0
        for k in range(2, max_lag + 1):  # walk the ruler until it passes this axis's step
            if prev >= step[a]:
                break
            cur = float(np.nanmean([_mean_step(v, b, k) for b in ref]))
            if not np.isfinite(cur):
                break
            ratio = float(k)
            if cur >= step[a]:  # between lags k − 1 and k: interpolate linearly
                ratio = k - 1 + (step[a] - prev) / max(cur - prev, 1e-9)
                break
            prev = cur
        out.append(ratio)
    return (float(out[0]), float(out[1]), float(out[2]))


def assume_spacing(
    spacings: list[Spacing], volumes: Sequence[np.ndarray], known: Sequence[float] | None = None
) -> Spacing | None:
    """The spacing to use for volumes that state none, or None to keep what they state.

    Only when every spacing is (1, 1, 1) (no voxel size in the files): ``known`` (what a
    trained model assumed before) if given, else the median :func:`estimate_spacing` of
    ``volumes`` when an axis reads at least :data:`ANISOTROPY_RATIO` times the finest — thick
    slices stated as cubes would otherwise get 3-D kernels, pooling and tilts across slices.
    Axes below the ratio get 1 (equal in-plane sizes keep quarter turns exact).

    Args:
        spacings: The (z, y, x) spacings given for the volumes.
        volumes: (Z, Y, X) intensities of the same volumes.
        known: A previously assumed spacing.

    Returns:
        (z, y, x) to use instead, rounded to 0.1, or None.
    """
    if not spacings or not all(is_unit(s) for s in spacings):
        return None
    if known:
        return tuple(float(v) for v in known)  # type: ignore[return-value]
    est = np.median([estimate_spacing(v) for v in volumes], 0)
    if est.max() < ANISOTROPY_RATIO:
        return None
    return tuple(round(float(e), 1) if e >= ANISOTROPY_RATIO else 1.0 for e in est)  # type: ignore[return-value]


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
