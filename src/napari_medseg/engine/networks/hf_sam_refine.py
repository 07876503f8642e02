"""Self-prompted refinement of HF-SAM's prompt-free output: boxes from its own pieces.

After a few-shot fine-tune the prompt-free head usually finds the object but draws its
outline loosely, while SAM's box-prompted decoder draws outlines well once it knows where to
look. So every sizeable connected piece of every predicted class becomes a box prompt (its
bounding box + 2 px), and the class is replaced by the union of the prompted masks. Pieces
much smaller than the class's largest piece are dropped as noise. Pieces with holes (a
myocardium ring around a cavity) are kept as predicted, because a box prompt answers with a
filled object. Measured gains after 5-image fine-tunes are in docs/models/hf-sam.md.

Arrays: one 2-D label map (Y, X) of class ids, 0 = background; boxes (y0, x0, y1, x1) in pixels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
from scipy import ndimage

from napari_medseg.engine.image import is_colour
from napari_medseg.engine.progress import Progress
from napari_medseg.engine.prompt import Prompts, mask_box

# Box (y0, x0, y1, x1) → (bool (Y, X) mask, the model's predicted IoU of it in 0..1).
BoxDecoder = Callable[[tuple[float, float, float, float]], tuple[np.ndarray, float]]


def has_holes(piece: np.ndarray, tolerance: float = 0.1) -> bool:
    """Whether filling the holes of a bool (Y, X) piece grows it by more than ``tolerance``."""
    return bool(ndimage.binary_fill_holes(piece).sum() > (1.0 + tolerance) * piece.sum())


def confident_union(answers: list[tuple[np.ndarray, float]], margin: float | None, reach: int) -> np.ndarray:
    """Union of the answers scored within ``margin`` of the best, and of those next to them.

    Args:
        answers: (bool (Y, X) mask, score) per box-prompted piece of one class; not empty.
        margin: Score margin below the best answer; ``None`` keeps every answer.
        reach: An answer within this many pixels (city-block) of a kept one is kept too,
            repeatedly, so a chain of fragments joins its confident piece.

    Returns:
        bool (Y, X) union of the kept answers.
    """
    best = max(score for _, score in answers)
    kept = [margin is None or score >= best - margin for _, score in answers]
    union = np.logical_or.reduce([m for (m, _), k in zip(answers, kept, strict=True) if k])
    while not all(kept):
        near = ndimage.binary_dilation(union, iterations=reach) if reach > 0 else union
        joining = [i for i, (m, _) in enumerate(answers) if not kept[i] and (m & near).any()]
        if not joining:
            break
        for i in joining:
            kept[i] = True
            union = union | answers[i][0]
    return union


# The margin "auto" uses on grayscale images (measured in docs/models/hf-sam.md).
AUTO_SCORE_MARGIN = 0.02


def resolve_score_margin(value: float | str | None, colour: bool) -> float | None:
    """The ``refine_score_margin`` option for one image.

    ``"auto"`` drops doubted pieces on grayscale images (ultrasound, CT, MRI), where the
    few-shot head's false pieces are look-alike tissue that SAM scores lower, and keeps every
    piece on colour images (endoscopy, dermoscopy), where the head often sees one object in
    far-apart fragments: BUSI +0.016 (20 images) / +0.059 (60), Kvasir-SEG −0.025 / −0.015,
    PH² ±0 with the filter on.

    Args:
        value: ``"auto"``, a margin (float) or ``None`` (keep every piece).
        colour: Whether the image carries colour (:func:`~napari_medseg.engine.image.is_colour`).

    Raises:
        ValueError: Any other string.
    """
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"refine_score_margin must be 'auto', a number or None, got {value!r}")
        return None if colour else AUTO_SCORE_MARGIN
    return None if value is None else float(value)


def refine_slice(
    labels: np.ndarray,
    decode_box: BoxDecoder,
    min_share: float = 0.2,
    min_pixels: int = 16,
    score_margin: float | None = None,
    reach: float = 0.02,
) -> np.ndarray:
    """Replace each class's pieces by the masks their bounding boxes prompt.

    Args:
        labels: (Y, X) integer class map of the prompt-free model.
        decode_box: Box (y0, x0, y1, x1) → (bool (Y, X) mask, predicted IoU) (a prompt
            session of the model).
        min_share: Pieces smaller than this share of the class's largest piece are dropped.
        min_pixels: Pieces smaller than this are dropped.
        score_margin: Box-prompted pieces whose answer scores more than this below the best
            answer of their class are dropped, unless their answer lies within ``reach`` of a
            kept one (:func:`confident_union`); ``None`` keeps them all. Pieces with holes
            are never prompted, so never dropped by it.
        reach: That distance as a share of the slice's longest side.

    Returns:
        A new (Y, X) map of ``labels``' dtype. A pixel that two classes' refined masks claim
        keeps its prompt-free class if that is one of them, else the lower class id.
    """
    out = np.zeros_like(labels)
    claimed = np.zeros(labels.shape, dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    for c in np.unique(labels):
        if c == 0:
            continue
        comp, n = ndimage.label(labels == c, structure=eight)
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        floor = max(min_pixels, min_share * sizes.max())
        refined = np.zeros(labels.shape, dtype=bool)
        answers: list[tuple[np.ndarray, float]] = []
        for i in np.flatnonzero(sizes >= floor) + 1:
            piece = comp == i
            box = mask_box(piece)
            if has_holes(piece) or box is None:
                refined |= piece
                continue
            mask, score = decode_box(box)
            mask = np.asarray(mask, dtype=bool)
            answers.append((mask if mask.any() else piece, float(score)))  # empty: keep the piece
        if answers:
            refined |= confident_union(answers, score_margin, round(reach * max(labels.shape)))
        out[refined & ~claimed] = c
        contested = refined & claimed & (labels == c)
        out[contested] = c
        claimed |= refined
    return out


def refine_view(seg: Any) -> Any:
    """``seg`` with the prompt weights that its ``refine_weights`` option asks for.

    ``"finetuned"`` gives a shallow copy with its own config: it shares the module and weights,
    and a prompt session open on ``seg`` in another widget keeps its own choice.
    """
    choice = str(seg.config["refine_weights"])
    if choice not in ("finetuned", "prompts"):
        raise ValueError(f"refine_weights must be 'finetuned' or 'prompts', got {choice!r}")
    if choice == "prompts":
        return seg
    view = copy.copy(seg)
    view.config = {**seg.config, "prompt_weights": "finetuned"}
    return view


def iter_refine_labels(
    seg: Any, labels: np.ndarray, image: np.ndarray, channel_axis: int | None
) -> Generator[Progress, None, np.ndarray]:
    """Refine an HF-SAM model's prompt-free ``labels`` slice by slice (``refine`` option).

    Args:
        seg: The HF-SAM segmenter that produced ``labels``.
        labels: int labels of ``image``'s spatial shape ((Y, X) or (Z, Y, X)); changed in place.
        image, channel_axis: What ``seg.segment`` was given.

    Yields:
        :class:`Progress` per slice (cancel points).
    """
    mode = str(seg.config["refine"])
    if mode not in ("boxes", "off"):
        raise ValueError(f"refine must be 'boxes' or 'off', got {mode!r}")
    if mode == "off" or not labels.any():
        return labels
    session = refine_view(seg).prompt(image, channel_axis)
    slices = labels.reshape((-1, *session.slice_shape))  # a view: refined in place
    share = float(seg.config["refine_min_share"])
    margin = resolve_score_margin(
        seg.config["refine_score_margin"], is_colour(session.image.data, session.image.rgb)
    )
    reach = float(seg.config["refine_reach"])
    for z in range(len(slices)):
        if slices[z].any():

            def decode(box: tuple[float, float, float, float], z: int = z) -> tuple[np.ndarray, float]:
                result = session.predict_result(Prompts.make(box=box), z)
                return result.mask, result.score

            slices[z] = refine_slice(slices[z], decode, share, score_margin=margin, reach=reach)
        yield Progress(z + 1, len(slices), f"refining slice {z + 1}/{len(slices)}")
    return labels
