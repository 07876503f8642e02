"""Layer ↔ array helpers shared by the dock widgets.

Everything napari-specific about reading an Image layer, naming and placing an output Labels
layer, and moving point coordinates between layers lives here, so the widgets stay about UI.
Coordinates are napari's: data axes in (Z, Y, X) / (Y, X) order, world = data * scale + translate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import napari
import numpy as np
from napari.layers import Image, Labels, Layer, Points
from qtpy.QtWidgets import QComboBox, QWidget


class LayerError(ValueError):
    """The chosen layer cannot be used; the message says which layer and what to pick instead."""


def check_image_layer(layer: Layer | None, purpose: str = "segment") -> Image:
    """Return ``layer`` if it is an Image layer, else raise :class:`LayerError` saying why.

    Args:
        layer: Usually ``viewer.layers.selection.active``.
        purpose: Verb for the message (``"segment"``, ``"train on"``).

    """
    if layer is None:
        raise LayerError(f"no layer selected: select the Image layer to {purpose} in the layer list")
    if isinstance(layer, Labels):
        raise LayerError(
            f"'{layer.name}' is a Labels layer: select the Image layer to {purpose} "
            "(Labels layers hold segmentations, not intensities)"
        )
    if not isinstance(layer, Image):
        raise LayerError(
            f"'{layer.name}' is a {type(layer).__name__} layer: select an Image layer to {purpose}"
        )
    return layer


def image_array(layer: Image) -> tuple[np.ndarray, int | None]:
    """Pixel data of an Image layer for the engine.

    Multiscale layers give their full-resolution level; lazy (dask/zarr) data is loaded.

    Returns:
        (array of the layer's data shape, channel axis: ``-1`` for RGB(A) layers else ``None``).

    """
    data = layer.data[0] if layer.multiscale else layer.data
    return np.asarray(data), (-1 if layer.rgb else None)


def spatial_shape(layer: Image) -> tuple[int, ...]:
    """Spatial shape (no RGB axis) of an Image layer's full-resolution data."""
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(int(s) for s in data.shape)
    return shape[:-1] if layer.rgb else shape


def output_name(image_name: str, network: str) -> str:
    """Name of a result layer: ``"<image> [<network>]"``."""
    return f"{image_name} [{network}]"


def add_labels_like(
    viewer: napari.Viewer,
    labels: np.ndarray,
    like: Layer,
    name: str,
    metadata: dict[str, Any] | None = None,
) -> Labels:
    """Add a new Labels layer placed exactly over ``like`` (same scale, translate and affine).

    Args:
        viewer: Target viewer.
        labels: Integer array of ``like``'s spatial shape.
        like: The layer the result was computed from.
        name: Layer name (napari appends a number if taken).
        metadata: Stored in the layer's metadata, merged over ``like``'s (the NIfTI affine is
            kept so the labels can be written back with the image's geometry).

    """
    meta = {**dict(like.metadata), **(metadata or {})}
    return viewer.add_labels(
        np.asarray(labels),
        name=name,
        scale=tuple(like.scale),
        translate=tuple(like.translate),
        affine=like.affine.affine_matrix,
        metadata=meta,
    )


def data_to_world(coords: np.ndarray, scale: Sequence[float], translate: Sequence[float]) -> np.ndarray:
    """(N, D) data coordinates → world coordinates (scale, then translate; trailing axes align)."""
    coords = np.atleast_2d(np.asarray(coords, dtype=float))
    d = coords.shape[1]
    return coords * np.asarray(scale, float)[-d:] + np.asarray(translate, float)[-d:]


def world_to_data(coords: np.ndarray, scale: Sequence[float], translate: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`data_to_world`."""
    coords = np.atleast_2d(np.asarray(coords, dtype=float))
    d = coords.shape[1]
    return (coords - np.asarray(translate, float)[-d:]) / np.asarray(scale, float)[-d:]


def points_to_indices(
    points: Points,
    target: Layer,
    shape: Sequence[int],
    current_world: Sequence[float] | None = None,
) -> np.ndarray:
    """Points of a Points layer as integer indices into ``target``'s data.

    The points go to world coordinates with the Points layer's scale/translate and back into
    ``target``'s data coordinates. A 2-D point on a 3-D target takes its missing leading
    axes (e.g. Z) from ``current_world`` (``viewer.dims.point``, the slice shown now).
    Points outside ``shape`` are dropped.

    Args:
        points: Points layer (any scale/translate).
        target: The layer whose data the indices address.
        shape: ``target``'s data shape.
        current_world: The viewer's current world position (``viewer.dims.point``).

    Returns:
        int64 (N, len(shape)) indices in data order.

    """
    ndim = len(shape)
    raw = np.asarray(points.data, float).reshape(-1, points.ndim)
    world = data_to_world(raw, points.scale, points.translate)
    if world.shape[1] > ndim:
        world = world[:, -ndim:]
    if world.shape[1] < ndim:
        missing = ndim - world.shape[1]
        here = np.zeros(ndim) if current_world is None else np.asarray(current_world, float)[-ndim:]
        world = np.concatenate([np.tile(here[:missing], (len(world), 1)), world], axis=1)
    idx = np.round(world_to_data(world, target.scale, target.translate)).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    return idx[inside]


def label_class_names(layer: Labels) -> list[str] | None:
    """Foreground class names from a Labels layer's ``features`` table, if it has them.

    A ``name``/``class_name``/``class`` column is read; rows are matched to label values by an
    ``index`` column when present, else row ``i`` is label value ``i`` (row 0 = background).

    Returns:
        Names of label values 1..max (``""`` for unnamed ones), or ``None`` when there are none.

    """
    features = getattr(layer, "features", None)
    if features is None or len(features) == 0:
        return None
    column = next((c for c in ("name", "class_name", "class") if c in features.columns), None)
    if column is None:
        return None
    if "index" in features.columns:
        values = [int(v) for v in features["index"]]
    else:
        values = list(range(len(features)))
    pairs = zip(values, features[column], strict=True)
    names = {v: str(n) for v, n in pairs if v > 0 and isinstance(n, str)}
    if not names:
        return None
    return [names.get(v, "") for v in range(1, max(names) + 1)]


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of given types, kept up to date.

    Args:
        viewer: The viewer whose layer list is followed.
        types: Layer classes to list.
        allow_none: Add a "(none)" entry first.
        parent: Qt parent.

    """

    def __init__(
        self,
        viewer: napari.Viewer,
        types: tuple[type[Layer], ...],
        allow_none: bool = False,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._types = types
        self._allow_none = allow_none
        self._listeners: list[Callable[[], None]] = []
        events = viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved, events.changed):
            ev.connect(self.refresh)
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Re-list the layers, keeping the current choice when it still exists."""
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        if self._allow_none:
            self.addItem("(none)")
        for layer in self._viewer.layers:
            if isinstance(layer, self._types):
                self.addItem(layer.name)
        index = self.findText(current)
        self.setCurrentIndex(index if index >= 0 else (1 if self._allow_none and self.count() > 1 else 0))
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Layer | None:
        """Return the chosen layer, or ``None``."""
        name = self.currentText()
        if not name or name == "(none)" or name not in self._viewer.layers:
            return None
        return self._viewer.layers[name]

    def set_layer(self, name: str) -> None:
        """Select the layer called ``name`` if listed."""
        self.refresh()
        index = self.findText(name)
        if index >= 0:
            self.setCurrentIndex(index)
