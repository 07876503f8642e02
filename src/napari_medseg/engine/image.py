"""Checking user images and bringing them into one layout: (N, C, Y, X) or (C, Z, Y, X)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from napari_medseg.engine.preprocess import IntensityPreset, apply_preset, resolve_preset

log = logging.getLogger(__name__)

MIN_SIDE = 8  # smaller images carry no usable structure and break pooling layers


class ImageError(ValueError):
    """The image cannot be segmented; the message says why and what to do."""


@dataclass(frozen=True)
class PreparedImage:
    """An image checked and scaled to ``[0, 1]``.

    Attributes:
        data: float32, (Z, C, Y, X) for volumes and (1, C, Y, X) for 2D images.
        spatial_shape: The input's spatial shape, (Y, X) or (Z, Y, X).
        rgb: Whether C holds colour channels.
        preset: The intensity preset that was applied.
    """

    data: np.ndarray
    spatial_shape: tuple[int, ...]
    rgb: bool
    preset: IntensityPreset

    @property
    def is_volume(self) -> bool:
        """True for (Z, Y, X) input."""
        return len(self.spatial_shape) == 3


def is_colour(data: np.ndarray, rgb: bool) -> bool:
    """Whether prepared (Z, C, Y, X) data carry colour: RGB whose channels are not all equal
    (grayscale saved as RGB, e.g. many ultrasound PNGs, counts as grayscale).
    """
    if not rgb or data.shape[1] < 2:
        return False
    return bool(np.any(data[:, 1:] != data[:, :1]))


def to_channel_last(image: np.ndarray, channel_axis: int | None) -> tuple[np.ndarray, bool]:
    """Validate an array and move its channel axis last.

    Args:
        image: (Y, X), (Z, Y, X), or either with a channel axis; any numeric dtype.
        channel_axis: Axis holding RGB(A) channels, or ``None``. ``None`` with a trailing axis
            of length 3 or 4 on a 3-D array is read as RGB(A).

    Returns:
        (array of shape spatial + (C,) with C = 1 or 3, whether it is RGB).

    Raises:
        ImageError: Wrong dimensionality, non-numeric data, unsupported channel count,
            too small, empty, all-NaN or constant.
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise ImageError(f"image data must be numeric, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ImageError(f"the image is empty (shape {arr.shape})")
    if channel_axis is None and arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4:
        channel_axis = -1
    if channel_axis is not None:
        arr = np.moveaxis(arr, channel_axis, -1)
        if arr.shape[-1] == 4:
            arr = arr[..., :3]  # alpha carries no anatomy
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] != 3:
            raise ImageError(
                f"channel axis has {arr.shape[-1]} channels; only grey (1) or RGB(A) (3/4) are supported"
            )
    rgb = channel_axis is not None and arr.ndim >= 3 and arr.shape[-1] == 3
    spatial = arr.shape[:-1] if rgb else arr.shape
    if len(spatial) > 3:
        # A leading singleton time/channel axis is harmless; anything else is ambiguous.
        squeezed = tuple(s for s in spatial if s != 1)
        if len(squeezed) <= 3:
            arr = arr.reshape(squeezed + ((3,) if rgb else ()))
            spatial = squeezed
        else:
            raise ImageError(
                f"{len(spatial)}-D image of shape {arr.shape}: choose one time point or channel "
                "first (napari: slice the layer, or pass channel_axis)"
            )
    if len(spatial) < 2:
        raise ImageError(f"image must be 2-D or 3-D, got shape {arr.shape}")
    if min(spatial[-2:]) < MIN_SIDE:
        raise ImageError(
            f"image is too small ({spatial[-2]}x{spatial[-1]} pixels in Y, X); "
            f"at least {MIN_SIDE} pixels per side are needed"
        )
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.any():
            raise ImageError("the image has no finite values (all NaN or inf)")
        if not finite.all():
            log.warning("%d NaN/inf values treated as background", int((~finite).sum()))
    lo, hi = np.nanmin(arr), np.nanmax(arr)
    if lo == hi:
        raise ImageError(f"the image is constant (every value is {lo}): there is nothing to segment")
    if not rgb:
        arr = arr[..., None]
    return arr, rgb


def prepare_image(
    image: np.ndarray,
    channel_axis: int | None = None,
    preset: str | IntensityPreset | None = "auto",
) -> PreparedImage:
    """Validate, scale with an intensity preset, and lay out as (Z, C, Y, X).

    Args:
        image: (Y, X), (Y, X, C), (Z, Y, X) or (Z, Y, X, C) (channel axis anywhere with
            ``channel_axis``); any numeric dtype.
        channel_axis: See :func:`to_channel_last`.
        preset: Name, resolved preset, or ``"auto"``.

    Returns:
        A :class:`PreparedImage`.
    """
    arr, rgb = to_channel_last(image, channel_axis)
    resolved = resolve_preset(preset, arr, rgb)
    scaled = apply_preset(arr, resolved)
    spatial = scaled.shape[:-1]
    if len(spatial) == 2:
        scaled = scaled[None]
    data = np.ascontiguousarray(np.moveaxis(scaled, -1, 1))  # (Z, C, Y, X)
    return PreparedImage(data=data, spatial_shape=tuple(spatial), rgb=rgb, preset=resolved)
