"""Extra (image, labels) training pairs for the Fine-tune widget.

A few-shot model often learns from more than one painted image — EFS-MedSeg is built around
two labeled atlases, and a 2-D network profits from a second painted photograph. Besides the
main Image/Labels choice, the widget lists every other Labels layer with the Image layer it
belongs to; the user ticks the pairs to add.

A Labels layer belongs to an Image layer of the same spatial shape; when several have that
shape, the one whose name shares the longest prefix with the labels' name wins (napari names a
new Labels layer after nothing in particular, but ours — "<image> labels" — and most users'
names start with the image's), then the first in the layer list.
"""

from __future__ import annotations

import os
from typing import Any

import napari
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QListWidget, QListWidgetItem

from napari_medseg.widgets._layers import spatial_shape


def image_for_labels(viewer: napari.Viewer, labels: Labels) -> Image | None:
    """The Image layer a Labels layer was most likely painted on (see the module docstring)."""
    shape = tuple(int(s) for s in labels.data.shape)
    candidates = [
        layer for layer in viewer.layers if isinstance(layer, Image) and spatial_shape(layer) == shape
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda im: len(os.path.commonprefix([im.name, labels.name])))


def extra_pairs(viewer: napari.Viewer, main_labels: Labels | None) -> list[tuple[Image, Labels]]:
    """Every Labels layer except ``main_labels`` with its Image layer (unmatched ones left out)."""
    pairs = []
    for layer in viewer.layers:
        if isinstance(layer, Labels) and layer is not main_labels:
            image = image_for_labels(viewer, layer)
            if image is not None:
                pairs.append((image, layer))
    return pairs


def pair_text(image: Image, labels: Labels) -> str:
    """List entry of a pair: ``"<labels>  ←  <image>"``."""
    return f"{labels.name}  ←  {image.name}"


def checkable(text: str, key: Any, checked: bool) -> QListWidgetItem:
    """A checklist entry showing ``text`` that carries ``key`` (Qt.UserRole)."""
    item = QListWidgetItem(text)
    item.setData(Qt.ItemDataRole.UserRole, key)
    item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
    item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
    return item


def ticked(widget: QListWidget) -> list[Any]:
    """Keys of the ticked entries of a checklist."""
    items = (widget.item(i) for i in range(widget.count()))
    return [it.data(Qt.ItemDataRole.UserRole) for it in items if it.checkState() == Qt.CheckState.Checked]
