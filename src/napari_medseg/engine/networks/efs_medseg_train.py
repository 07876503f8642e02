"""EFS-MedSeg's training objective (the Segmenter hook ``training_loss`` calls :func:`efs_loss`).

Loss = Dice+CE on the atlas patches (view 1; optionally deep-supervised) + ``recon_weight`` ·
Dice-weighted reconstruction + ``kl_weight`` · KL + ``contrast_weight`` · anatomy contrast
between two intensity views, and optionally a FixMatch-style pseudo-label term on the
unlabeled patches (docs/models/efs-medseg.md, Training).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.engine.train.losses import segmentation_loss
from napari_medseg.models.efs_medseg_losses import (
    anatomy_contrastive_loss,
    dice_weight_map,
    kl_loss,
    soft_dice_per_class,
    weighted_reconstruction_loss,
)


def efs_loss(
    seg: Any, module: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised Dice+CE on both views, VAE (weighted recon + KL), anatomy contrast.

    Args:
        seg: The EFS-MedSeg Segmenter (its ``config`` and ``class_names``).
        module: The :class:`EfsMedSegNet`.
        batch: See :meth:`VolumeData.sample_batch`; images (B, 1, Z, Y, X), labels (B, Z, Y, X).

    Returns:
        (loss, named terms for the progress records).
    """
    cfg = seg.config
    sq = cfg.get("dice_denominator", "squared") == "squared"  # checked by prepare_for_training
    y = batch["label"]
    b = y.shape[0]
    x1 = torch.cat([batch["image"], batch["u_image"]]) if "u_image" in batch else batch["image"]
    out = module.forward_train(x1)
    logits = out["logits"]
    loss, terms = segmentation_loss(logits[:b], y, "dice_ce", sq)
    if "aux_logits_1" in out:
        loss = deep_supervision_loss(out, y, loss, terms, sq)
    probs = logits.detach().float().softmax(1)
    conf, pred = probs.max(1)
    # Atlas voxels are weighted by their true class, unlabeled ones by their predicted class.
    classes = torch.cat([y, pred[b:]])
    class_dice = soft_dice_per_class(logits[:b].detach(), y)
    pseudo_w = float(cfg.get("pseudo_weight", 0.0)) if "u_image" in batch else 0.0
    out2: dict[str, torch.Tensor] = {}
    if "embed" in out or pseudo_w > 0:
        x2 = torch.cat([batch["image2"], batch["u_image2"]]) if "u_image2" in batch else batch["image2"]
        if cfg["contrast_stopgrad"] or "embed" not in out:
            # The second view is a fixed target (SimSiam-style stop-gradient): one backward
            # pass per step instead of two, which matters on a CPU.
            with torch.no_grad():
                out2 = module.forward_train(x2, sample=False)
        else:
            out2 = module.forward_train(x2, sample=False)
            sup2, _ = segmentation_loss(out2["logits"][:b], y, "dice_ce", sq)
            loss = 0.5 * (loss + sup2)  # supervision on both views
    if pseudo_w > 0:
        # FixMatch-style: the other view's confident prediction labels the unlabeled voxels.
        p2 = out2["logits"][b:].detach().float().softmax(1)
        c2, y2 = p2.max(1)
        keep = (c2 >= float(cfg["pseudo_threshold"])).float()
        ce_u = F.cross_entropy(logits[b:].float(), y2, reduction="none")
        pseudo = (ce_u * keep).mean()
        loss = loss + pseudo_w * pseudo
        terms["pseudo"] = float(pseudo.detach())
    if "embed" in out:
        small = tuple(out["embed"].shape[2:])
        cls_s = F.interpolate(classes[:, None].float(), size=small, mode="nearest-exact")[:, 0].long()
        valid = torch.ones_like(conf, dtype=torch.bool)
        valid[b:] = conf[b:] >= float(cfg["pseudo_threshold"])
        valid_s = F.interpolate(valid[:, None].float(), size=small, mode="nearest-exact")[:, 0] > 0.5
        con = anatomy_contrastive_loss(
            out["embed"],
            out2["embed"],
            cls_s,
            valid_s,
            float(cfg["contrast_temperature"]),
            int(cfg["contrast_samples"]),
        )
        loss = loss + float(cfg["contrast_weight"]) * con
        terms["contrast"] = float(con.detach())
    if "recon" in out:
        w = dice_weight_map(classes, class_dice, float(cfg["recon_alpha"]))
        rec = weighted_reconstruction_loss(out["recon"], x1, w)
        kl = kl_loss(out["mu"], out["logvar"])
        loss = loss + float(cfg["recon_weight"]) * rec + float(cfg["kl_weight"]) * kl
        terms.update(recon=float(rec.detach()), kl=float(kl.detach()))
    terms.update({f"dice_{seg.class_names[c]}": float(class_dice[c]) for c in range(1, len(class_dice))})
    return loss, terms


def deep_supervision_loss(
    out: dict[str, torch.Tensor],
    y: torch.Tensor,
    loss: torch.Tensor,
    terms: dict[str, float],
    squared_dice: bool = True,
) -> torch.Tensor:
    """nnU-Net-style weighted mean of the full-resolution and auxiliary Dice+CE terms.

    Level i weighs 2**-i; labels (B, Z, Y, X) are taken down to each level's grid by
    nearest neighbour. The weights are normalised, so the supervised term keeps its scale
    against the reconstruction and contrast terms.
    """
    b = y.shape[0]
    total, weight, i = loss, 1.0, 1
    while f"aux_logits_{i}" in out:
        aux = out[f"aux_logits_{i}"][:b]
        y_i = F.interpolate(y[:, None].float(), size=aux.shape[2:], mode="nearest-exact")[:, 0].long()
        term, _ = segmentation_loss(aux, y_i, "dice_ce", squared_dice)
        total = total + 0.5**i * term
        weight += 0.5**i
        terms[f"aux{i}"] = float(term.detach())
        i += 1
    return total / weight
