"""Online 2-D augmentation on (C, H, W) images and (H, W) labels, numpy in and out.

Transforms are callables ``(image, label, rng) -> (image, label)`` so a network can put its
own (e.g. STS-Net's small-target zoom) in front of the generic ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def flip_rot90(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal/vertical flip and 90° rotation (label-exact)."""
    k = int(rng.integers(4))
    image, label = np.rot90(image, k, axes=(1, 2)), np.rot90(label, k)
    if rng.random() < 0.5:
        image, label = image[:, :, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def flip_lr(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random left-right flip only: keeps which side is up (label-exact)."""
    if rng.random() < 0.5:
        image, label = image[:, :, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def affine(
    image: np.ndarray,
    label: np.ndarray,
    angle: float,
    scale: float,
    shift: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate (degrees) and scale about the centre; bilinear image, nearest label.

    Args:
        image: (C, H, W) float.
        label: (H, W) int.
        angle: Rotation in degrees.
        scale: Zoom factor (>1 enlarges the content).
        shift: Translation as a fraction of (H, W).
    """
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[cos, -sin, 2 * shift[1]], [sin, cos, 2 * shift[0]]], dtype=torch.float32)[None]
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    lab = torch.from_numpy(np.ascontiguousarray(label)).float()[None, None]
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img[0].numpy(), lab[0, 0].numpy().astype(label.dtype)


def make_random_affine(
    max_angle: float, scale_range: tuple[float, float], p: float, max_shift: float = 0.0
) -> Transform:
    """A transform applying :func:`affine` with probability ``p``.

    ``max_shift`` > 0 also translates by up to that share of each side (uniform, times the
    zoom), so an object is seen away from where the few training images happen to show it.
    """

    def apply(
        image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() >= p:
            return image, label
        angle = float(rng.uniform(-max_angle, max_angle))
        scale = float(np.exp(rng.uniform(*np.log(scale_range))))
        if max_shift <= 0:
            return affine(image, label, angle, scale)  # no draw: the same stream as before
        dy, dx = (float(v) for v in rng.uniform(-max_shift, max_shift, 2))
        return affine(image, label, angle, scale, (dy, dx))

    return apply


def make_intensity(strength: float) -> Transform:
    """Random brightness, contrast and gamma, clipped to ``[0, 1]``."""

    def apply(
        image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        gamma = float(np.exp(rng.uniform(-strength, strength)))
        contrast = 1 + float(rng.uniform(-strength, strength))
        bright = float(rng.uniform(-strength, strength)) * 0.5
        out = np.clip(image, 0, 1) ** gamma
        out = (out - out.mean()) * contrast + out.mean() + bright
        return np.clip(out, 0, 1).astype(np.float32), label

    return apply


def crop_zoom(
    image: np.ndarray, label: np.ndarray, fraction: float, corner: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a window of ``fraction`` × (H, W) and resize it back to (H, W).

    Args:
        image: (C, H, W) float.
        label: (H, W) int.
        fraction: Side of the window as a share of each side (0 < fraction ≤ 1).
        corner: Top-left corner of the window as shares (y, x) of the free room.
    """
    h, w = label.shape
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    y0, x0 = round((h - ch) * corner[0]), round((w - cw) * corner[1])
    img = torch.from_numpy(np.ascontiguousarray(image[:, y0 : y0 + ch, x0 : x0 + cw], dtype=np.float32))
    lab = torch.from_numpy(np.ascontiguousarray(label[y0 : y0 + ch, x0 : x0 + cw])).float()
    img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    lab = F.interpolate(lab[None, None], size=(h, w), mode="nearest")[0, 0]
    return img.numpy(), lab.numpy().astype(label.dtype)


def elastic(
    image: np.ndarray, label: np.ndarray, sigma: float, rng: np.random.Generator, grid: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement: Gaussian offsets (std ``sigma`` × side) on a ``grid``² lattice,
    interpolated bicubically over the image; bilinear image, nearest label.
    """
    h, w = label.shape
    offsets = torch.from_numpy(rng.normal(0.0, 2.0 * sigma, size=(1, 2, grid, grid)).astype(np.float32))
    field = F.interpolate(offsets, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
    ys = torch.linspace(-1, 1, h)
    xs = torch.linspace(-1, 1, w)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    grid_xy = (base + field)[None]
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    lab = torch.from_numpy(np.ascontiguousarray(label)).float()[None, None]
    img = F.grid_sample(img, grid_xy, mode="bilinear", padding_mode="border", align_corners=True)
    lab = F.grid_sample(lab, grid_xy, mode="nearest", padding_mode="border", align_corners=True)
    return img[0].numpy(), lab[0, 0].numpy().astype(label.dtype)


def sam_paper_transform(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """HF-SAM's (H-SAM's) training views: one of rotation, zoomed crop or elastic warp.

    With p 0.45 a rotation by up to ±20°; else with p 0.75 a crop of 20–80 % of each side
    (the same share for both) resized back; else an elastic warp (specs/networks.md §4.6).
    """
    u = rng.random()
    if u < 0.45:
        return affine(image, label, float(rng.uniform(-20, 20)), 1.0)
    if u < 0.45 + 0.55 * 0.75:
        corner = (float(rng.random()), float(rng.random()))
        return crop_zoom(image, label, float(rng.uniform(0.2, 0.8)), corner)
    return elastic(image, label, 0.04, rng)


PRESETS: dict[str, tuple[float, tuple[float, float], float, float]] = {
    # name: (max angle, scale range, affine probability, intensity strength)
    "light": (10.0, (0.9, 1.1), 0.3, 0.1),
    "default": (25.0, (0.8, 1.25), 0.5, 0.2),
    "strong": (40.0, (0.7, 1.4), 0.7, 0.3),
}
# Presets that also translate: name → (base preset, largest shift as a share of each side).
SHIFTED: dict[str, tuple[str, float]] = {"shift": ("default", 0.2)}


def generic_transforms(preset: str, orientation: str = "any") -> list[Transform]:
    """The shared augmentation chain for a preset name (``"none"`` gives no transform).

    ``orientation="upright"`` replaces the quarter turns and vertical flips by left-right
    flips, for images whose top is always the same side (ultrasound, radiology slices).
    """
    if preset == "none":
        return []
    first = flip_lr if orientation == "upright" else flip_rot90
    if preset == "paper":
        return [first, sam_paper_transform]
    base, shift = SHIFTED.get(preset, (preset, 0.0))
    angle, scales, p, strength = PRESETS[base]
    return [first, make_random_affine(angle, scales, p, shift), make_intensity(strength)]


def apply_chain(
    transforms: Sequence[Transform], image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply transforms in order."""
    for t in transforms:
        image, label = t(image, label, rng)
    return image, label


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    size: int,
    rng: np.random.Generator,
    foreground_bias: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop (or zero-pad) to ``size``²; with probability ``foreground_bias`` the crop contains
    a random foreground pixel, so small targets are not cropped away.
    """
    c, h, w = image.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
        label = np.pad(label, ((0, ph), (0, pw)))
        h, w = label.shape
    fg = np.argwhere(label > 0) if rng.random() < foreground_bias else np.empty((0, 2))
    if len(fg):
        cy, cx = fg[int(rng.integers(len(fg)))]
        y0 = int(np.clip(cy - rng.integers(size), 0, h - size))
        x0 = int(np.clip(cx - rng.integers(size), 0, w - size))
    else:
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return image[:, y0 : y0 + size, x0 : x0 + size], label[y0 : y0 + size, x0 : x0 + size]
