"""S³-Net losses (pure torch): clustering CE, spatial consistency, affine consistency, Sobel term.

All maps are (B, C, H, W) response maps whose channel argmax is the cluster id. Pseudo-labels
come from an argmax and never carry gradient. Specification: ``specs/networks.md`` §3.3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def clustering_ce(r: torch.Tensor) -> torch.Tensor:
    """Self-training cross-entropy of a response map against its own argmax.

    Args:
        r: (B, C, H, W) response map.

    Returns:
        Scalar loss; gradient flows through ``r`` (not through the argmax targets).
    """
    return F.cross_entropy(r, r.detach().argmax(1))


def spatial_consistency(r: torch.Tensor) -> torch.Tensor:
    """Differentiable continuity loss: mean L1 of vertical plus horizontal neighbour differences.

    This is Kanezaki & Kim's (TIP 2020) continuity term on the response map, the paper's intent
    for S³-Net's spatial loss; the released notebook's Sobel term (:func:`sobel_term`) has no
    gradient.

    Args:
        r: (B, C, H, W) response map, H, W ≥ 2.

    Returns:
        Scalar loss.
    """
    dy = (r[:, :, 1:, :] - r[:, :, :-1, :]).abs().mean()
    dx = (r[:, :, :, 1:] - r[:, :, :, :-1]).abs().mean()
    return dy + dx


@dataclass(frozen=True)
class AffineTransform:
    """A random input transform for the affine-consistency loss.

    Attributes:
        quarter_turns: Rotation by 90° × this (0..3) in the (H, W) plane.
        flip: Mirror the last (X) axis after rotating.
        scale: Zoom about the centre (≥ 1 keeps every output pixel inside the image, so no
            pixel needs an "unknown" target).
    """

    quarter_turns: int = 0
    flip: bool = False
    scale: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to (B, C, H, W) (bilinear zoom); rotations and flips are exact."""
        x = torch.rot90(x, self.quarter_turns, dims=(2, 3))
        if self.flip:
            x = x.flip(3)
        if self.scale != 1.0:
            b = x.shape[0]
            theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / self.scale
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return x


def sample_affine(
    generator: torch.Generator, max_scale: float = 1.25, identity_ok: bool = False
) -> AffineTransform:
    """Draw a transform: uniform quarter turns, a coin-flip mirror, zoom in [1, max_scale].

    Args:
        generator: CPU generator (seeded by the caller for determinism).
        max_scale: Largest zoom factor.
        identity_ok: Allow the no-op transform (otherwise it is redrawn as a 90° turn).
    """
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    scale = 1.0 + float(torch.rand(1, generator=generator)) * (max_scale - 1.0)
    if not identity_ok and k == 0 and not flip:
        k = 1
    return AffineTransform(k, flip, scale)


def affine_consistency(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    r: torch.Tensor,
    transform: AffineTransform,
) -> torch.Tensor:
    """Paper-mode affine loss: the prediction of T(x) should cluster like T(prediction of x).

    Args:
        model: (B, C_in, H', W') → (B, C, H', W') response map (any size).
        x: (B, C_in, H, W) input that produced ``r``.
        r: (B, C, H, W) response map of ``x``; only its argmax (after T) is used as target.
        transform: T.

    Returns:
        Scalar CE(model(T(x)), argmax T(r)); gradient reaches the model through T(x)'s branch.
    """
    target = transform(r.detach()).argmax(1)
    return F.cross_entropy(model(transform(x)), target)


def released_aux_consistency(r: torch.Tensor, aux_rotated: torch.Tensor) -> torch.Tensor:
    """Released notebook's "affine" loss: CE(aux map rotated 90°, argmax of R rotated 90°).

    The input is never transformed, so this ties the pre-deformable auxiliary head to the final
    head's clusters.

    Args:
        r: (B, C, H, W) final response map.
        aux_rotated: (B, C, W, H) auxiliary map already rotated by one quarter turn.
    """
    target = torch.rot90(r.detach(), 1, dims=(2, 3)).argmax(1)
    return F.cross_entropy(aux_rotated, target)


SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])  # d/dx (OpenCV)
SOBEL_XY = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]])


def sobel_term(labels: torch.Tensor, num_colours: int, generator: torch.Generator) -> torch.Tensor:
    """Released notebook's spatial term on the argmax image — a constant, no gradient.

    The label map is coloured with a random RGB palette (0..255), converted to grey (ITU-R 601),
    and differentiated with 3×3 Sobel kernels (d/dx, d/dy, d²/dxdy; reflected borders as in
    OpenCV). The loss is mean|S_y − S_x| + mean|S_xy − S_x| + mean|S_xy − S_y|.

    Args:
        labels: (B, H, W) int64 cluster ids in [0, num_colours).
        num_colours: Palette size (the response map's C).
        generator: CPU generator for the palette.

    Returns:
        Scalar tensor without grad.
    """
    with torch.no_grad():
        palette = torch.randint(0, 256, (num_colours, 3), generator=generator).float()
        grey = (palette[labels.cpu()] @ torch.tensor([0.299, 0.587, 0.114]))[:, None]
        grey = F.pad(grey, (1, 1, 1, 1), mode="reflect")
        kernels = torch.stack([SOBEL_X, SOBEL_X.T, SOBEL_XY])[:, None]
        s = F.conv2d(grey, kernels)
        sx, sy, sxy = s[:, 0], s[:, 1], s[:, 2]
        return (sy - sx).abs().mean() + (sxy - sx).abs().mean() + (sxy - sy).abs().mean()
