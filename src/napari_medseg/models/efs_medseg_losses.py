"""EFS-MedSeg training losses (pure torch): Dice-weighted reconstruction, KL, anatomy contrast.

The abstract fixes only the intent of each term; the formulas are our hypotheses and are
recorded in docs/models/efs-medseg.md. Shapes: logits (B, K, *S), labels (B, *S) int64,
images (B, C, *S); S = (Z, Y, X).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_per_class(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice of every class over the whole batch.

    Args:
        logits: (B, K, *S).
        labels: (B, *S) int64 in ``[0, K)``.

    Returns:
        (K,) float in [0, 1]; a class absent from both prediction and labels scores 1.
    """
    k = logits.shape[1]
    probs = logits.float().softmax(1)
    onehot = F.one_hot(labels.long(), k).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (2 * inter + eps) / (denom + eps)


def dice_weight_map(classes: torch.Tensor, class_dice: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Per-voxel reconstruction weight ``1 + alpha * (1 - Dice[class])``.

    Regions of classes the segmenter currently gets wrong (low Dice) weigh more, so the shared
    features are pushed hardest where the segmentation does not yet match the atlas.

    Args:
        classes: (B, *S) int64 class map (atlas labels or predicted labels).
        class_dice: (K,) per-class Dice in [0, 1] (no gradient needed).
        alpha: Extra weight of a class with Dice 0.

    Returns:
        (B, 1, *S) float weights ≥ 1.
    """
    w = 1.0 + alpha * (1.0 - class_dice.detach().clamp(0, 1))
    return w[classes.long()].unsqueeze(1)


def weighted_reconstruction_loss(
    recon: torch.Tensor, image: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Weighted mean squared error, normalised by the weights (scale-free in ``alpha``).

    Args:
        recon: (B, C, *S) reconstruction.
        image: (B, C, *S) target in [0, 1].
        weight: (B, 1, *S) non-negative weights.
    """
    err = (recon.float() - image.float()).pow(2).mean(1, keepdim=True)
    return (weight * err).sum() / weight.sum().clamp_min(1e-6)


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) averaged over latent elements."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


def anatomy_contrastive_loss(
    embed1: torch.Tensor,
    embed2: torch.Tensor,
    classes: torch.Tensor,
    valid: torch.Tensor | None = None,
    temperature: float = 0.5,
    samples_per_class: int = 64,
) -> torch.Tensor:
    """Voxel-to-prototype InfoNCE between two views, positives chosen by anatomy.

    For each volume b and class c present in it, the prototype ``P[v, b, c]`` is the mean
    embedding of view v over the voxels of class c. Voxels sampled from one view are pulled to
    the prototype of their own structure in the *other* view of the same volume and pushed from
    the prototypes of every other structure (of any volume in the batch). Prototypes of the
    same structure in other volumes are masked out: they are not negatives.

    Args:
        embed1: (B, E, *s) unit embeddings of view 1.
        embed2: (B, E, *s) unit embeddings of view 2 (same geometry as view 1).
        classes: (B, *s) int64 structure ids (atlas labels or predicted labels).
        valid: (B, *s) bool, voxels allowed as anchors/prototype members (e.g. confident
            predictions); ``None`` = all.
        temperature: Softmax temperature (0.5 as in the predecessor's NT-Xent).
        samples_per_class: Anchor voxels drawn per (volume, class).

    Returns:
        Scalar loss; 0 (with gradient) when fewer than two structures are present.
    """
    b, e = embed1.shape[:2]
    flat1 = embed1.float().reshape(b, e, -1)
    flat2 = embed2.float().reshape(b, e, -1)
    cls = classes.reshape(b, -1).long()
    ok = torch.ones_like(cls, dtype=torch.bool) if valid is None else valid.reshape(b, -1)
    k = int(cls.max().item()) + 1 if cls.numel() else 1
    onehot = F.one_hot(cls, k).float() * ok[..., None].float()  # (B, N, K)
    counts = onehot.sum(1)  # (B, K)
    present = counts > 0
    if int(present.sum()) < 2:
        return embed1.sum() * 0.0
    protos = []
    for flat in (flat1, flat2):
        p = torch.einsum("ben,bnk->bke", flat, onehot) / counts.clamp_min(1)[..., None]
        protos.append(F.normalize(p[present], dim=-1))  # (P, E), P = present (b, c) pairs
    owner_b, owner_c = present.nonzero(as_tuple=True)
    losses = []
    for flat, other in ((flat1, protos[1]), (flat2, protos[0])):
        anchors, targets, bad = [], [], []
        for i, (bi, ci) in enumerate(zip(owner_b.tolist(), owner_c.tolist())):
            idx = ((cls[bi] == ci) & ok[bi]).nonzero(as_tuple=True)[0]
            pick = idx[torch.randint(len(idx), (min(samples_per_class, len(idx)),), device=idx.device)]
            anchors.append(flat[bi][:, pick].T)
            targets.append(torch.full((len(pick),), i, device=flat.device))
            same = (owner_c == ci) & (owner_b != bi)
            bad.append(same[None].expand(len(pick), -1))
        a = torch.cat(anchors)
        logits = a @ other.T / temperature
        logits = logits.masked_fill(torch.cat(bad), float("-inf"))
        losses.append(F.cross_entropy(logits, torch.cat(targets)))
    return sum(losses) / 2  # type: ignore[return-value]
