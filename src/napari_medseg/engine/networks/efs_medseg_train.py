"""EFS-MedSeg's training objective (the Segmenter hook ``training_loss`` calls :func:`efs_loss`).

Loss = Dice+CE on the atlas patches (view 1; optionally deep-supervised) + ``recon_weight`` ·
Dice-weighted reconstruction + ``kl_weight`` · KL + ``contrast_weight`` · anatomy contrast
between two intensity views, and optionally a FixMatch-style pseudo-label term on the
unlabeled patches and a bidirectional atlas↔unlabeled copy-paste term
(docs/models/efs-medseg.md, Training).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.engine.train.losses import segmentation_loss, soft_dice_loss
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
    copy_w = float(cfg.get("copy_paste_weight", 0.0)) if "cp_mask" in batch else 0.0
    if "embed" in out or pseudo_w > 0 or copy_w > 0:
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
    if copy_w > 0:
        cp = copy_paste_loss(module, batch, out2["logits"][b:], cfg, sq)
        loss = loss + copy_w * cp
        terms["copy_paste"] = float(cp.detach())
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


def copy_paste_batch(
    batch: dict[str, torch.Tensor], teacher_logits: torch.Tensor, cfg: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed patches of the bidirectional copy-paste (BCP, Bai et al. 2023) and their targets.

    Unlabeled patch j is mixed with atlas patch ``j mod B`` through the cuboid mask
    ``cp_mask``: with ``cp_dir`` 1 the unlabeled patch fills the cuboids, with 0 the atlas
    does. Targets are the atlas labels in the atlas part (weight 1) and the teacher's (the
    unlabeled patch's other intensity view, no gradient) prediction in the unlabeled part,
    weighted ``copy_paste_pseudo`` where its confidence reaches ``pseudo_threshold``, else 0.

    Args:
        batch: ``image`` (B, C, Z, Y, X), ``label`` (B, Z, Y, X), ``u_image`` (U, C, Z, Y, X),
            ``cp_mask`` (U, 1, Z, Y, X) in [0, 1], ``cp_dir`` (U,).
        teacher_logits: (U, K, Z, Y, X) logits of the unlabeled patches' second view.
        cfg: ``pseudo_threshold`` and ``copy_paste_pseudo``.

    Returns:
        (image (U, C, Z, Y, X), target (U, Z, Y, X) int64, weight (U, Z, Y, X) float).
    """
    u = batch["u_image"]
    idx = torch.arange(u.shape[0]) % batch["label"].shape[0]
    atlas, y_atlas = batch["image"][idx], batch["label"][idx]
    conf, y_u = teacher_logits.detach().float().softmax(1).max(1)
    w_u = float(cfg["copy_paste_pseudo"]) * (conf >= float(cfg["pseudo_threshold"])).float()
    m = batch["cp_mask"].to(u.dtype)
    inward = batch["cp_dir"].bool().view(-1, 1, 1, 1, 1)
    share = torch.where(inward, m, 1.0 - m)  # the unlabeled patch's share of every voxel
    from_u = share[:, 0] > 0.5
    image = ((1.0 - share) * atlas + share * u).contiguous()
    target = torch.where(from_u, y_u, y_atlas.long())
    return image, target, torch.where(from_u, w_u, torch.ones_like(w_u))


def copy_paste_loss(
    module: nn.Module,
    batch: dict[str, torch.Tensor],
    teacher_logits: torch.Tensor,
    cfg: dict[str, Any],
    squared_dice: bool = True,
) -> torch.Tensor:
    """Weighted Dice + CE of the segmenter on :func:`copy_paste_batch`'s mixed patches."""
    image, target, weight = copy_paste_batch(batch, teacher_logits, cfg)
    logits = module(image)
    ce = (F.cross_entropy(logits.float(), target, reduction="none") * weight).sum()
    ce = ce / weight.sum().clamp_min(1.0)
    return ce + soft_dice_loss(logits, target, False, squared=squared_dice, weight=weight)
