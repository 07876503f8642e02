"""HF-SAM's training loss: prompt-free (paper) plus a prompted term that keeps prompting intact.

Prompt-free term: 0.1·CE + 0.9·Dice (background included) on the decoder's low-resolution
K+1-class logits against nearest-resized labels (HF-SAM's loss, ``losses.py`` kind ``hfsam``).

Prompted term (ours): the decoder and transformer are shared with the prompted mode, so
training only the prompt-free output would slowly erase zero-shot prompting. For each image of
the batch one painted class present in the crop is picked; a box around it (jittered by up to
10 % of its size per side) or 1–3 positive points inside it (plus one negative point outside
with probability 0.5) are given, and the single prompted mask is trained with BCE + Dice
against that class's mask. Images whose crop shows no foreground are left out of this term.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.segmenter import match_channels
from napari_medseg.engine.train.losses import segmentation_loss


def _binary_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice of (B, H, W) logits against a (B, H, W) {0, 1} target."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + dice.mean()


def sample_prompts(
    labels: np.ndarray, rng: np.random.Generator, box_prob: float
) -> tuple[list[int], np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Prompts sampled from (B, S, S) integer labels, in SAM's (x, y) input pixels.

    Returns:
        (indices of images with foreground, chosen class per such image, boxes (n, 4) or None,
        point coords (n, P, 2) or None, point labels (n, P) or None). One kind (box or points)
        for the whole batch so the prompt encoder sees one tensor.
    """
    keep, classes, masks = [], [], []
    for i, lab in enumerate(labels):
        present = np.unique(lab[lab > 0])
        if present.size:
            keep.append(i)
            k = int(rng.choice(present))
            classes.append(k)
            masks.append(lab == k)
    if not keep:
        return [], np.zeros(0, np.int64), None, None, None
    if rng.random() < box_prob:
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
            jy, jx = 0.1 * (y1 - y0 + 1), 0.1 * (x1 - x0 + 1)
            d = rng.uniform(-1, 1, 4) * np.array([jx, jy, jx, jy])
            boxes.append(np.array([x0, y0, x1, y1], float) + d)
        return keep, np.array(classes), np.stack(boxes), None, None
    n_pos = int(rng.integers(1, 4))
    neg = rng.random() < 0.5
    coords, labs = [], []
    for m in masks:
        fg = np.argwhere(m)
        pts = fg[rng.integers(len(fg), size=n_pos)]
        lab = [1] * n_pos
        if neg:
            bg = np.argwhere(~m)
            if len(bg):
                pts = np.concatenate([pts, bg[rng.integers(len(bg), size=1)]])
                lab.append(0)
            else:  # the class fills the crop: repeat a positive point
                pts = np.concatenate([pts, pts[:1]])
                lab.append(1)
        coords.append(pts[:, ::-1].astype(float))  # (row, col) → (x, y)
        labs.append(lab)
    return keep, np.array(classes), None, np.stack(coords), np.array(labs)


def hfsam_loss(
    seg: Any, module: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch (see the module docstring).

    Args:
        seg: The HF-SAM segmenter (config, rng).
        module: The HFSAM network.
        batch: ``image`` (B, C, S, S) float in [0, 1]; ``label`` (B, S, S) int64.
    """
    image, labels = batch["image"], batch["label"]
    x = module.preprocess(match_channels(image, 3))
    if seg.lora_active:
        emb, early = module.encode(x)
    else:  # a frozen encoder needs no graph
        with torch.no_grad():
            emb, early = module.encode(x)
    early = early if module.hf.uses_early else None
    free = module.decode_free(emb, early)
    low_side = free.shape[-1]
    low_labels = F.interpolate(labels[:, None].float(), (low_side, low_side), mode="nearest-exact")[
        :, 0
    ].long()
    loss, terms = segmentation_loss(free, low_labels, "hfsam")
    weight = float(seg.config.get("prompt_loss_weight", 1.0))
    if weight > 0:
        rng = seg.train_rng
        keep, classes, boxes, coords, plabs = sample_prompts(
            labels.cpu().numpy(), rng, float(seg.config.get("prompt_box_prob", 0.7))
        )
        if keep:
            dev = image.device
            idx = torch.as_tensor(keep, device=dev)
            points = None
            if coords is not None and plabs is not None:
                points = (
                    torch.as_tensor(coords, dtype=torch.float32, device=dev),
                    torch.as_tensor(plabs, dtype=torch.int64, device=dev),
                )
            box_t = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32, device=dev)
            low, _ = module.decode(
                emb[idx], None if early is None else early[idx], points, box_t, None, multimask=False
            )
            target = (low_labels[idx] == torch.as_tensor(classes, device=dev)[:, None, None]).float()
            prompted = _binary_dice_bce(low[:, 0], target)
            loss = loss + weight * prompted
            terms["prompted"] = float(prompted.detach())
    return loss, terms


def validation_box_dice(seg: Any, val: list[tuple[np.ndarray, np.ndarray]], base: bool = False) -> float:
    """Mean Dice of one box prompt per painted class on the validation slices.

    Args:
        seg: The HF-SAM segmenter.
        val: (C, Y, X) float images in [0, 1] and (Y, X) int labels at the working size.
        base: Score the untouched base model (no LoRA, SAM's decoder, no fusion) instead of the
            current fine-tuned weights.

    Returns:
        Mean Dice over (slice, class) pairs; NaN when no class is painted.
    """
    from napari_medseg.engine.metrics import dice
    from napari_medseg.engine.networks import hf_sam_prompt as hp
    from napari_medseg.engine.prompt import Prompts, mask_box

    seg.module.eval()
    module = seg.prompt_module(base=base)
    scores = []
    with torch.inference_mode():
        for image, label in val:
            emb = hp.encode_frame(module, image, None, seg.input_size, seg.device)
            if base:
                emb.pop("early", None)
            for k in np.unique(label[label > 0]):
                target = label == k
                prompts = Prompts.make(box=mask_box(target))
                result = hp.decode_prompt_set(module, emb, prompts, target.shape, None, seg.input_size)
                scores.append(dice(result.mask, target))
    return float(np.mean(scores)) if scores else float("nan")
