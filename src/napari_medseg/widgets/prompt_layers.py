"""Layers of the Prompt widget: prompt Points/Shapes, the preview Labels, undoable commits.

Names and colours follow what micro-sam users know (positive points green ``#00FF00``,
negative red ``#FF0000``; a live ``preview`` Labels layer and a layer of committed objects),
and every helper layer copies the image layer's scale and translate so prompts and masks sit
on the image in world coordinates.

Coordinates: napari layers store data coordinates in their own axes order (row, col);
prompts are converted through world coordinates into the *image* layer's data coordinates,
so helper layers with a different scale/translate still land on the right pixel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.engine.prompt import Prompts
from napari_medseg.widgets._layers import add_labels_like, spatial_shape

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Points, Shapes

POSITIVE_COLOR = np.array([0.0, 1.0, 0.0, 1.0], np.float32)  # "#00FF00"
NEGATIVE_COLOR = np.array([1.0, 0.0, 0.0, 1.0], np.float32)  # "#FF0000"
POINTS_NAME = "medseg point prompts"
SHAPES_NAME = "medseg box prompts"
PREVIEW_NAME = "medseg preview"
OBJECTS_NAME = "medseg objects"


def _geometry(image: Image) -> dict[str, Any]:
    return {
        "scale": tuple(image.scale),
        "translate": tuple(image.translate),
        "affine": image.affine.affine_matrix,
    }


def add_points_layer(viewer: napari.Viewer, image: Image) -> Points:
    """Add an empty Points layer for prompts with an integer ``label`` feature (1 = positive)."""
    ndim = len(spatial_shape(image))
    size = 8.0 * float(min(image.scale[-2:]))  # about 8 screen pixels at 100% zoom
    layer = viewer.add_points(
        np.empty((0, ndim)),
        name=POINTS_NAME,
        features={"label": np.empty(0, np.int64)},
        feature_defaults={"label": 1},
        face_color=POSITIVE_COLOR,
        border_color="white",
        size=size,
        **_geometry(image),
    )
    layer.current_face_color = POSITIVE_COLOR
    layer.mode = "add"
    return layer


def add_shapes_layer(viewer: napari.Viewer, image: Image) -> Shapes:
    """Add an empty Shapes layer for box prompts, in rectangle mode."""
    layer = viewer.add_shapes(
        ndim=len(spatial_shape(image)),
        name=SHAPES_NAME,
        edge_color="#FFFF00",
        face_color=[0.0, 0.0, 0.0, 0.0],
        edge_width=2.0 * float(min(image.scale[-2:])),
        **_geometry(image),
    )
    layer.mode = "add_rectangle"
    return layer


def add_labels_layer(viewer: napari.Viewer, image: Image, name: str, opacity: float = 0.6) -> Labels:
    """Add an empty int32 Labels layer on the image's grid."""
    layer = add_labels_like(viewer, np.zeros(spatial_shape(image), np.int32), image, name)
    layer.opacity = opacity
    return layer


def add_preview_layer(viewer: napari.Viewer, image: Image) -> Labels:
    """Add the live-result Labels layer: one colour (cyan, as napari-segment-anything's mask)."""
    from napari.utils.colormaps import DirectLabelColormap

    layer = add_labels_layer(viewer, image, PREVIEW_NAME, opacity=0.5)
    layer.colormap = DirectLabelColormap(color_dict={None: [0.0, 0.0, 0.0, 0.0], 1: "cyan"})
    return layer


def recolor_points(layer: Points) -> None:
    """Colour each point by its ``label`` feature (green positive, red negative)."""
    n = len(layer.data)
    if n == 0:
        return
    labels = (
        np.asarray(layer.features["label"], np.int64) if "label" in layer.features else np.ones(n, np.int64)
    )
    colors = np.where((labels == 1)[:, None], POSITIVE_COLOR, NEGATIVE_COLOR)
    if layer.face_color.shape != colors.shape or not np.allclose(layer.face_color, colors):
        layer.face_color = colors


def set_polarity(layer: Points, positive: bool) -> None:
    """Make the next points added positive or negative (without touching existing ones)."""
    layer.selected_data = set()  # current_* properties also recolour the selection
    layer.feature_defaults = {"label": 1 if positive else 0}
    layer.current_face_color = POSITIVE_COLOR if positive else NEGATIVE_COLOR


def to_image_data(layer: Any, image: Image, coords: np.ndarray) -> np.ndarray:
    """Map (N, layer.ndim) data coords of ``layer`` to (N, image.ndim) data coords of ``image``.

    Goes through world coordinates, so each layer's own scale/translate/affine is honoured
    (anisotropic volumes included).
    """
    coords = np.asarray(coords, np.float64).reshape(-1, layer.ndim)
    out = np.empty((len(coords), image.ndim), np.float64)
    for i, row in enumerate(coords):
        world = np.asarray(layer.data_to_world(row), np.float64)
        out[i] = np.asarray(image.world_to_data(world), np.float64)[-image.ndim :]
    return out


def slice_prompts(
    points: Points | None, shapes: Shapes | None, image: Image, z: int | None
) -> Prompts | None:
    """Prompts that lie on slice ``z`` (``None`` for 2-D images), in image (row, col) pixels.

    Points whose slice coordinate rounds to ``z`` count; the last Shapes item on that slice
    gives the box (its bounding rectangle). Returns ``None`` when there is no prompt there.
    """
    pts, labs, box = None, None, None
    if points is not None and len(points.data):
        coords = to_image_data(points, image, points.data)
        labels = np.asarray(points.features["label"], np.int64) if "label" in points.features else None
        if labels is None or len(labels) != len(coords):
            labels = np.ones(len(coords), np.int64)
        keep = np.ones(len(coords), bool) if z is None else np.rint(coords[:, 0]).astype(int) == z
        if keep.any():
            pts, labs = coords[keep][:, -2:], labels[keep]
    if shapes is not None and len(shapes.data):
        for verts in shapes.data[::-1]:
            c = to_image_data(shapes, image, verts)
            if z is not None and int(np.rint(c[:, 0].mean())) != z:
                continue
            y0, x0 = c[:, -2:].min(0)
            y1, x1 = c[:, -2:].max(0)
            if y1 - y0 >= 1 and x1 - x0 >= 1:
                box = (float(y0), float(x0), float(y1), float(x1))
                break
    if pts is None and box is None:
        return None
    return Prompts.make(pts, labs, box)


def write_object(
    target: Labels, masks: dict[int | None, np.ndarray], value: int, preserve_labels: bool
) -> int:
    """Write bool masks into ``target`` with ``value`` as ONE undoable step (Ctrl+Z undoes it).

    Args:
        target: Labels layer of the image's spatial shape.
        masks: {slice index: bool (Y, X)} for volumes, {None: bool (Y, X)} for 2-D.
        value: Label id to write.
        preserve_labels: Only paint background pixels (napari's "preserve labels").

    Returns:
        The number of pixels written.

    """
    written = 0
    with target.block_history():
        for z, mask in masks.items():
            idx = np.nonzero(mask)
            if z is not None:
                idx = (np.full(idx[0].shape, z, np.intp), *idx)
            if preserve_labels:
                free = np.asarray(target.data[idx]) == 0
                idx = tuple(a[free] for a in idx)
            if idx[0].size:
                target.data_setitem(idx, value, refresh=False)
                written += int(idx[0].size)
    target.refresh()
    return written
