"""3-D random regional switch: new labeled volumes from two atlases (EFS-MedSeg, component 1).

Random cuboid regions are exchanged, image and labels together, between two patches of the
same shape: the two atlases cropped at the same relative position, or an atlas and a flipped
or shifted copy of itself. With ``smooth > 0`` the image is blended across a soft border
(natural-looking intensity transitions) and each voxel's label is that of the source that
contributes more than half of its intensity, so labels stay aligned with what the image shows.

Arrays: images (C, Z, Y, X) float32, labels (Z, Y, X) int64; numpy in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SwitchOptions:
    """How regions are switched.

    Attributes:
        regions: Number of cuboids taken from the second source (at least 1).
        min_frac: Smallest cuboid edge as a fraction of the patch edge.
        max_frac: Largest cuboid edge as a fraction of the patch edge.
        smooth: Width of the soft border in voxels (0: sharp cuboid edges).
        self_prob: Probability of switching an atlas with a transformed copy of itself
            instead of with the other atlas.
    """

    regions: int = 2
    min_frac: float = 0.25
    max_frac: float = 0.6
    smooth: float = 2.0
    self_prob: float = 0.3


def region_mask(shape: tuple[int, int, int], rng: np.random.Generator, opts: SwitchOptions) -> np.ndarray:
    """Float (Z, Y, X) mask in [0, 1]: 1 inside the union of random cuboids.

    The soft border ramps linearly over ``opts.smooth`` voxels on both sides of each face.
    """
    mask = np.zeros(shape, np.float32)
    coords = [np.arange(n, dtype=np.float32) for n in shape]
    for _ in range(max(1, opts.regions)):
        axes = []
        for n, c in zip(shape, coords):
            size = max(1, int(round(n * rng.uniform(opts.min_frac, opts.max_frac))))
            start = int(rng.integers(0, max(1, n - size + 1)))
            lo, hi = start - 0.5, start + size - 0.5  # faces between voxels
            if opts.smooth > 0:
                # Signed distance to the nearest face, ramped to [0, 1] over `smooth` voxels.
                d = np.minimum(c - lo, hi - c)
                axes.append(np.clip(0.5 + d / opts.smooth, 0.0, 1.0))
            else:
                axes.append(((c > lo) & (c < hi)).astype(np.float32))
        box = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        mask = np.maximum(mask, box)
    return mask


def switch_regions(
    img_a: np.ndarray,
    lab_a: np.ndarray,
    img_b: np.ndarray,
    lab_b: np.ndarray,
    rng: np.random.Generator,
    opts: SwitchOptions = SwitchOptions(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Put random regions of B into A.

    Args:
        img_a: (C, Z, Y, X) image of source A.
        lab_a: (Z, Y, X) labels of A.
        img_b: Image of source B, same shape as ``img_a``.
        lab_b: Labels of B.
        rng: Random generator.
        opts: Region sizes and border.

    Returns:
        (image, labels, mask): the mixed (C, Z, Y, X) float32 image, its (Z, Y, X) int64
        labels, and the (Z, Y, X) float32 share of B in every voxel.
    """
    if img_a.shape != img_b.shape or lab_a.shape != lab_b.shape or img_a.shape[1:] != lab_a.shape:
        raise ValueError(
            f"regional switch needs equal shapes, got {img_a.shape}/{lab_a.shape} and "
            f"{img_b.shape}/{lab_b.shape}"
        )
    m = region_mask(tuple(lab_a.shape), rng, opts)  # type: ignore[arg-type]
    image = (1.0 - m)[None] * img_a + m[None] * img_b
    labels = np.where(m > 0.5, lab_b, lab_a).astype(np.int64)
    return image.astype(np.float32), labels, m


def transformed_copy(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, max_shift: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """A flipped (random in-plane axes) and cyclically shifted copy, image and labels alike.

    Args:
        image: (C, Z, Y, X).
        label: (Z, Y, X).
        max_shift: Largest shift as a fraction of each axis.
    """
    img, lab = image, label
    for axis in (1, 2):  # Y, X: the slice axis of anisotropic scans is rarely worth flipping
        if rng.random() < 0.5:
            img, lab = np.flip(img, axis + 1), np.flip(lab, axis)
    shift = [int(rng.integers(-int(n * max_shift), int(n * max_shift) + 1)) for n in lab.shape]
    img = np.roll(img, shift, axis=(1, 2, 3))
    lab = np.roll(lab, shift, axis=(0, 1, 2))
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def random_switch(
    atlas_a: tuple[np.ndarray, np.ndarray],
    atlas_b: tuple[np.ndarray, np.ndarray] | None,
    rng: np.random.Generator,
    opts: SwitchOptions = SwitchOptions(),
) -> tuple[np.ndarray, np.ndarray, str]:
    """One switched training patch from atlas A and (usually) atlas B.

    Args:
        atlas_a: (image (C, Z, Y, X), labels (Z, Y, X)) patch of the first atlas.
        atlas_b: Patch of the second atlas at the same relative position, or ``None`` when
            only one atlas exists (then A is always switched with a copy of itself).
        rng: Random generator.
        opts: Switch options.

    Returns:
        (image, labels, kind) with kind ``"pair"`` or ``"self"``.
    """
    if atlas_b is None or rng.random() < opts.self_prob:
        img_b, lab_b = transformed_copy(*atlas_a, rng)
        kind = "self"
    else:
        img_b, lab_b = atlas_b
        kind = "pair"
    image, labels, _ = switch_regions(atlas_a[0], atlas_a[1], img_b, lab_b, rng, opts)
    return image, labels, kind
