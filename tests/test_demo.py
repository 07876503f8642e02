"""The README's first command: the demo opens a sample with the widgets and HF-SAM selected."""

from __future__ import annotations

import pytest


@pytest.mark.gui
@pytest.mark.parametrize("sample", ["3d", "2d"])
def test_demo_viewer(make_napari_viewer, sample):
    from napari_medseg.widgets.demo import WIDGETS, build_demo

    viewer = make_napari_viewer()
    widgets = build_demo(viewer, sample)
    assert set(widgets) == set(WIDGETS)
    names = [layer.name for layer in viewer.layers]
    assert any("sample" in n for n in names)
    images = [layer for layer in viewer.layers if layer._type_string == "image"]
    assert len(images) == 1 and images[0].name.endswith("(sample)")
    assert widgets["Segment"].network.currentData().endswith(":hf-sam")
