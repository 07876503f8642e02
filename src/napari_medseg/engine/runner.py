"""Slice and tile runners: fit any image to a network's input and bring the answer back.

Coordinates are (Y, X) / (Z, Y, X) throughout. Logits are resampled bilinearly and only then
turned into labels, so class boundaries come back smooth at the input's resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.device import OutOfMemory, free_cuda_cache, is_oom
from napari_medseg.engine.progress import Progress

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def fit_shape(shape: Sequence[int], working_size: int) -> tuple[int, ...]:
    """Shape after scaling so that the longest side equals ``working_size`` (aspect kept)."""
    scale = working_size / max(shape)
    return tuple(max(1, int(round(s * scale))) for s in shape)


def resize(x: torch.Tensor, shape: Sequence[int], labels: bool = False) -> torch.Tensor:
    """Resize (B, C, *S) to spatial ``shape``: (bi/tri)linear for images, nearest for labels."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    if labels:
        return F.interpolate(x.float(), size=tuple(shape), mode="nearest-exact").to(x.dtype)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=False)


def _window(patch: Sequence[int], device: torch.device) -> torch.Tensor:
    """Separable blending weights that fall towards the patch borders (never to zero)."""
    w: torch.Tensor | None = None
    for n in patch:
        ramp = torch.minimum(torch.arange(n, device=device) + 1.0, n - torch.arange(n, device=device))
        ramp = (ramp / ramp.max()).clamp_min(0.05)
        w = ramp if w is None else w[..., None] * ramp
    assert w is not None
    return w


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of windows of length ``patch`` covering ``size`` with ``overlap`` (0..1)."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    return [min(i * step, size - patch) for i in range(n)]


def sliding_window(
    x: torch.Tensor,
    fn: LogitsFn,
    patch: Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 4,
) -> Generator[Progress, None, torch.Tensor]:
    """Run ``fn`` over overlapping windows of one image and blend the logits.

    Args:
        x: (C, *S) input, S = (Y, X) or (Z, Y, X). Dimensions smaller than the patch are
            zero-padded.
        fn: (B, C, *patch) → (B, K, *patch) logits.
        patch: Window size per spatial dimension.
        overlap: Fraction of a window shared with its neighbour.
        batch_size: Windows per call of ``fn``.

    Yields:
        :class:`Progress` after each batch of windows (a cancel point).

    Returns:
        (K, *S) blended logits.
    """
    spatial = tuple(x.shape[1:])
    pads = [max(0, p - s) for p, s in zip(patch, spatial)]
    if any(pads):
        pad_arg: list[int] = []
        for p in reversed(pads):
            pad_arg += [0, p]
        x = F.pad(x, pad_arg)
    padded = tuple(x.shape[1:])
    grids = [window_starts(s, p, overlap) for s, p in zip(padded, patch)]
    starts = [tuple(c) for c in np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, len(patch))]
    weight = _window(patch, x.device)
    out: torch.Tensor | None = None
    norm = torch.zeros(padded, device=x.device)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        crops = torch.stack(
            [x[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(st, patch))] for st in chunk]
        )
        with torch.inference_mode():
            logits = fn(crops).float()
        if out is None:
            out = torch.zeros((logits.shape[1],) + padded, device=x.device)
        for st, lg in zip(chunk, logits):
            region = tuple(slice(s, s + p) for s, p in zip(st, patch))
            out[(slice(None),) + region] += lg * weight
            norm[region] += weight
        yield Progress(min(i + batch_size, len(starts)), len(starts), "tiles")
    assert out is not None
    out = out / norm
    return out[(slice(None),) + tuple(slice(0, s) for s in spatial)]


def predict_slice_logits(
    image: torch.Tensor,
    fn: LogitsFn,
    input_size: int,
    working_size: int,
    overlap: float = 0.25,
    batch_size: int = 4,
) -> Generator[Progress, None, torch.Tensor]:
    """Logits for one 2-D slice at its own resolution.

    The slice is scaled so that its longest side is ``working_size``. If it then fits the
    network's ``input_size`` it is zero-padded (bottom/right) and run once; otherwise it is
    tiled with overlapping windows. Logits are scaled back to the slice's shape.

    Args:
        image: (C, Y, X) float tensor on the network's device.
        fn: (B, C, input_size, input_size) → (B, K, input_size, input_size).
        input_size: Network input side length.
        working_size: Longest side the slice is resampled to (training uses the same).

    Returns:
        (K, Y, X) logits.
    """
    shape = tuple(image.shape[1:])
    work = fit_shape(shape, working_size)
    x = resize(image[None], work)[0]
    logits = yield from sliding_window(x, fn, (input_size, input_size), overlap, batch_size)
    return resize(logits[None], shape)[0]


def batched_fit_logits(slices: torch.Tensor, fn: LogitsFn, input_size: int) -> torch.Tensor:
    """Fast path for several slices that each fit the input after scaling.

    Args:
        slices: (B, C, Y, X), all of one shape.
        fn: Network call on (B, C, input_size, input_size).
        input_size: Network input side length.

    Returns:
        (B, K, Y, X) logits.
    """
    shape = tuple(slices.shape[2:])
    work = fit_shape(shape, input_size)
    x = resize(slices, work)
    x = F.pad(x, [0, input_size - work[1], 0, input_size - work[0]])
    logits = fn(x).float()[:, :, : work[0], : work[1]]
    return resize(logits, shape)


def run_slices(
    data: np.ndarray,
    fn: LogitsFn,
    input_size: int,
    working_size: int,
    device: torch.device,
    batch_size: int = 4,
    overlap: float = 0.25,
) -> Generator[Progress, None, np.ndarray]:
    """Segment every slice of a (Z, C, Y, X) stack with a 2-D network.

    Args:
        data: float32 (Z, C, Y, X) in the network's input scaling.
        fn: Logits function; see :func:`predict_slice_logits`.
        input_size: Network input side length.
        working_size: Longest side slices are resampled to; tiles are used above ``input_size``.
        device: Where ``fn`` runs.
        batch_size: Slices (or tiles) per network call.

    Yields:
        :class:`Progress` per batch of slices (and per batch of tiles within a slice).

    Returns:
        int32 labels (Z, Y, X) = argmax over the logits' classes.
    """
    z = data.shape[0]
    out = np.zeros((z,) + data.shape[2:], dtype=np.int32)
    tiled = working_size > input_size
    step = 1 if tiled else max(1, batch_size)
    start = 0
    # Gradients are switched off around each network call, never across a yield: grad mode is
    # thread-local and would otherwise leak into the consumer's code between iterations.
    while start < z:
        chunk = torch.from_numpy(data[start : start + step]).to(device)
        try:
            if tiled:
                gen = predict_slice_logits(chunk[0], fn, input_size, working_size, overlap, batch_size)
                logits = (yield from _forward_tiles(gen, start, z))[None]
            else:
                with torch.inference_mode():
                    logits = batched_fit_logits(chunk, fn, input_size)
        except RuntimeError as err:
            # A CUDA out-of-memory error retries with half the slices (or tiles) per call.
            if not is_oom(err):
                raise
            free_cuda_cache()
            if step == 1 and (not tiled or batch_size == 1):
                raise OutOfMemory(
                    f"out of memory on {device} even for one slice at a time; choose a "
                    "smaller working size, close other GPU programs, or run on the CPU"
                ) from err
            step, batch_size = max(1, step // 2), max(1, batch_size // 2)
            continue
        out[start : start + len(chunk)] = logits.argmax(1).to(torch.int32).cpu().numpy()
        start += len(chunk)
        yield Progress(start, z, f"slice {start}/{z}")
    return out


def _forward_tiles(
    gen: Generator[Progress, None, torch.Tensor], start: int, z: int
) -> Generator[Progress, None, torch.Tensor]:
    """Re-label tile progress as progress within slice ``start``."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        yield Progress(start, z, f"slice {start + 1}/{z}: tile {p.done}/{p.total}")


def drain(gen: Generator[Progress, None, object]) -> object:
    """Run a progress generator to the end and return its value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
