"""Prompt geometry of HF-SAM: coordinates, zoom-in ROI, slice encoding and prompt decoding.

Coordinates: users and napari give data pixels in (row, col) order — points ``(y, x)``, boxes
``(y0, x0, y1, x1)`` with inclusive corners. SAM works in (x, y) pixels of its resized input.
:func:`rc_to_xy` is the one place where the order flips and the scale is applied.

A *frame* is the part of the slice that is encoded: the whole slice, or a zoom-in ROI
``(y0, x0, y1, x1)`` (half-open, integer). The frame is resized so its longest side equals the
encoder input (aspect kept, SAM's ResizeLongestSide), zero-padded bottom/right after intensity
normalisation, and encoded. Masks come back at the frame's resolution and are pasted into the
slice.

Zoom-in rule (``roi_zoom="auto"``): the prompt extent is the box, or the bounding box of two or
more positive points (a single point carries no size, so it never zooms). If its longest side
is below ``roi_threshold`` × the slice's longest side, the encoded frame becomes a square of
side ``max(roi_context × extent, roi_min_side)`` rounded up to a power of two, centred on the
prompt (centre snapped to a grid of side/8 so nearby clicks reuse the cached embedding) and
shifted to stay inside the slice. No zoom happens when that square would cover the slice.
``roi_zoom="always"`` skips the threshold test; ``"off"`` never zooms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.prompt import Embedding, PromptResult, Prompts
from napari_medseg.engine.runner import fit_shape, resize
from napari_medseg.engine.segmenter import match_channels

Frame = tuple[int, int, int, int]


def rc_to_xy(
    points_rc: np.ndarray | Sequence[Sequence[float]],
    origin: tuple[float, float] = (0.0, 0.0),
    scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Data (row, col) points → SAM (x, y) points in the encoder's input pixels.

    Args:
        points_rc: (N, 2) (y, x) in slice pixels.
        origin: (y0, x0) of the encoded frame in slice pixels.
        scale: (sy, sx) input pixels per slice pixel.

    Returns:
        float64 (N, 2) array of (x, y).
    """
    pts = np.asarray(points_rc, np.float64).reshape(-1, 2)
    y = (pts[:, 0] - origin[0]) * scale[0]
    x = (pts[:, 1] - origin[1]) * scale[1]
    return np.stack([x, y], 1)


def box_to_xyxy(
    box: Sequence[float], origin: tuple[float, float] = (0.0, 0.0), scale: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """(y0, x0, y1, x1) data box → SAM's (x0, y0, x1, y1) in input pixels (float64, (4,))."""
    y0, x0, y1, x1 = (float(v) for v in box)
    return rc_to_xy([(y0, x0), (y1, x1)], origin, scale).reshape(4)


def frame_of(roi: Frame | None, shape: tuple[int, int]) -> Frame:
    """The encoded frame: the ROI, or the whole (Y, X) slice."""
    return roi if roi is not None else (0, 0, int(shape[0]), int(shape[1]))


def frame_scale(frame: Frame, input_size: int) -> tuple[tuple[int, int], tuple[float, float]]:
    """((rh, rw) resized frame size, (sy, sx) scale) for a frame fitted into ``input_size``."""
    fh, fw = frame[2] - frame[0], frame[3] - frame[1]
    rh, rw = fit_shape((fh, fw), input_size)
    return (int(rh), int(rw)), (rh / fh, rw / fw)


def prompt_extent(prompts: Prompts) -> tuple[float, float, float, float] | None:
    """(y0, x0, y1, x1) region a prompt set refers to, or ``None`` if it has no size."""
    if prompts.box is not None:
        return prompts.box
    if prompts.points is not None and prompts.point_labels is not None:
        pos = prompts.points[prompts.point_labels == 1]
        if len(pos) >= 2:
            (y0, x0), (y1, x1) = pos.min(0), pos.max(0)
            return float(y0), float(x0), float(y1), float(x1)
    return None


def plan_roi(
    prompts: Prompts,
    shape: tuple[int, int],
    mode: str = "auto",
    threshold: float = 0.15,
    context: float = 3.0,
    min_side: int = 32,
) -> Frame | None:
    """Zoom-in frame for ``prompts`` on a (Y, X) slice, or ``None`` (see the module docstring)."""
    if mode == "off":
        return None
    if mode not in ("auto", "always"):
        raise ValueError(f"roi_zoom must be auto, always or off, got {mode!r}")
    ext = prompt_extent(prompts)
    if ext is None:
        return None
    h, w = int(shape[0]), int(shape[1])
    size = max(ext[2] - ext[0], ext[3] - ext[1]) + 1
    if mode == "auto" and size >= threshold * max(h, w):
        return None
    side = 2 ** math.ceil(math.log2(max(context * size, min_side, 2)))
    if side >= max(h, w):
        return None
    grid = max(1, side // 8)
    cy = round((ext[0] + ext[2]) / 2 / grid) * grid
    cx = round((ext[1] + ext[3]) / 2 / grid) * grid
    y0 = int(min(max(cy - side // 2, 0), max(h - side, 0)))
    x0 = int(min(max(cx - side // 2, 0), max(w - side, 0)))
    return (y0, x0, min(h, y0 + side), min(w, x0 + side))


@torch.inference_mode()
def encode_frame(
    module: Any, image: np.ndarray, roi: Frame | None, input_size: int, device: torch.device
) -> Embedding:
    """Encode one (C, Y, X) float slice in [0, 1] (or its ROI).

    Returns:
        ``embedding`` (1, 256, h, w), ``early`` (1, C_early, h, w) when fusion is on, and
        ``resized`` (2,) = the frame's size inside the padded input.
    """
    y0, x0, y1, x1 = frame_of(roi, image.shape[1:])
    x = torch.from_numpy(np.ascontiguousarray(image[:, y0:y1, x0:x1], np.float32))[None].to(device)
    (rh, rw), _ = frame_scale((y0, x0, y1, x1), input_size)
    x = module.preprocess(match_channels(resize(x, (rh, rw)), 3))
    # Pad after normalisation, as SAM and LiteMedSAM do (the pad is 0 in normalised units).
    x = F.pad(x, [0, input_size - rw, 0, input_size - rh])
    emb, early = module.encode(x)
    out = {"embedding": emb, "resized": torch.tensor([rh, rw], dtype=torch.float32)}
    if module.hf.uses_early:
        out["early"] = early
    return out


def _resized(emb: Embedding) -> tuple[int, int]:
    r = emb["resized"]
    return int(round(float(r[0]))), int(round(float(r[1])))


def frame_logits_to_slice(low: torch.Tensor, emb: Embedding, frame: Frame, input_size: int) -> torch.Tensor:
    """(M, L, L) low-res logits of a frame → (M, fh, fw) logits at the frame's resolution."""
    rh, rw = _resized(emb)
    up = F.interpolate(low[None].float(), (input_size, input_size), mode="bilinear", align_corners=False)
    up = up[..., :rh, :rw]
    return resize(up, (frame[2] - frame[0], frame[3] - frame[1]))[0]


def slice_low_res(full: torch.Tensor, low_side: int) -> torch.Tensor:
    """(Y, X) logits of a whole slice → (1, 1, L, L) low-res logits in the slice's own frame."""
    rh, rw = fit_shape(tuple(full.shape), low_side)
    small = resize(full[None, None].float(), (rh, rw))
    return F.pad(small, [0, low_side - rw, 0, low_side - rh], value=float(small.min()))


def mask_input_for_frame(
    low_full: torch.Tensor, shape: tuple[int, int], frame: Frame, low_side: int
) -> torch.Tensor:
    """Previous low-res logits of the whole slice → (1, 1, L, L) logits in ``frame``."""
    rh, rw = fit_shape(shape, low_side)
    full = resize(low_full.reshape(1, 1, low_side, low_side)[..., :rh, :rw].float(), shape)[0, 0]
    return slice_low_res(full[frame[0] : frame[2], frame[1] : frame[3]], low_side)


def prompt_tensors(
    prompts: Prompts, frame: Frame, input_size: int, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """SAM point and box tensors for one prompt set in ``frame`` (batch of 1)."""
    _, scale = frame_scale(frame, input_size)
    origin = (float(frame[0]), float(frame[1]))
    points = None
    if prompts.points is not None and prompts.point_labels is not None:
        xy = torch.as_tensor(rc_to_xy(prompts.points, origin, scale), dtype=torch.float32, device=device)
        labels = torch.as_tensor(prompts.point_labels, dtype=torch.int64, device=device)
        points = (xy[None], labels[None])
    boxes = None
    if prompts.box is not None:
        boxes = torch.as_tensor(box_to_xyxy(prompts.box, origin, scale), dtype=torch.float32, device=device)[
            None
        ]
    return points, boxes


def decode_prompt_set(
    module: Any, emb: Embedding, prompts: Prompts, shape: tuple[int, int], roi: Frame | None, input_size: int
) -> PromptResult:
    """Decode one prompt set into a bool (Y, X) mask; see :class:`PromptResult`."""
    device = emb["embedding"].device
    frame = frame_of(roi, shape)
    points, boxes = prompt_tensors(prompts, frame, input_size, device)
    mask_in = None
    if prompts.mask_input is not None:
        mask_in = mask_input_for_frame(prompts.mask_input.to(device), shape, frame, module.low_res_side)
    low, iou = module.decode(
        emb["embedding"], emb.get("early"), points, boxes, mask_in, multimask=prompts.multimask
    )
    best = int(iou[0].argmax()) if prompts.multimask else 0
    logits = frame_logits_to_slice(low[0, best : best + 1], emb, frame, input_size)[0]
    if roi is None:
        full = logits
        low_full = low[0, best : best + 1][None]
    else:
        full = torch.full(tuple(shape), -20.0, device=logits.device)
        full[frame[0] : frame[2], frame[1] : frame[3]] = logits
        low_full = slice_low_res(full, module.low_res_side)
    return PromptResult(mask=(full > 0).cpu().numpy(), score=float(iou[0, best]), low_res=low_full.cpu())


def decode_boxes(
    module: Any, emb: Embedding, boxes: np.ndarray, shape: tuple[int, int], input_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Several boxes on one whole-slice embedding in one decoder call.

    Args:
        boxes: (N, 4) (y0, x0, y1, x1) data pixels.

    Returns:
        (bool masks (N, Y, X), predicted IoU (N,)).
    """
    device = emb["embedding"].device
    frame = frame_of(None, shape)
    _, scale = frame_scale(frame, input_size)
    xyxy = np.stack([box_to_xyxy(b, (0.0, 0.0), scale) for b in np.asarray(boxes, float).reshape(-1, 4)])
    with torch.inference_mode():
        low, iou = module.decode(
            emb["embedding"],
            emb.get("early"),
            None,
            torch.as_tensor(xyxy, dtype=torch.float32, device=device),
        )
        logits = frame_logits_to_slice(low[:, 0], emb, frame, input_size)
    return (logits > 0).cpu().numpy(), iou[:, 0].cpu().numpy()
