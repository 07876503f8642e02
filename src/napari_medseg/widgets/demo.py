"""``napari-medseg demo``: napari with a sample, the three widgets, and HF-SAM selected."""

from __future__ import annotations

from typing import Any

import napari

WIDGETS = ("Segment", "Prompt (HF-SAM)", "Fine-tune")


def build_demo(viewer: napari.Viewer, sample: str = "3d") -> dict[str, Any]:
    """Load a sample into ``viewer`` and dock the plugin's widgets.

    Args:
        viewer: The viewer to fill.
        sample: ``"3d"`` (MNI152 MRI with tissue labels) or ``"2d"`` (fundus photograph).

    Returns:
        The docked widgets by display name.
    """
    from napari_medseg._sample_data import sample_2d, sample_3d

    layers = []
    for data, meta, kind in sample_3d() if sample == "3d" else sample_2d():
        layers.append(getattr(viewer, f"add_{kind}")(data, **meta))
    image = next(layer for layer in layers if isinstance(layer, napari.layers.Image))
    viewer.layers.selection.active = image
    if image.ndim == 3:
        viewer.dims.set_current_step(0, image.data.shape[0] // 2)
    widgets: dict[str, Any] = {}
    for name in WIDGETS:
        _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name, tabify=True)
        widgets[name] = widget
    widgets["Segment"].select_network("hf-sam")
    return widgets


def run_demo(sample: str = "3d", run: bool = True) -> int:
    """Open the demo viewer; returns the exit status for the CLI."""
    viewer = napari.Viewer(title="napari-medseg demo")
    build_demo(viewer, sample)
    if run:
        napari.run()
    return 0
