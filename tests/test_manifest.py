"""The npe2 manifest validates and every command's python_name imports."""

from __future__ import annotations

import importlib

import npe2


def test_manifest_validates_and_imports():
    pm = npe2.PluginManifest.from_distribution("napari-medseg")
    assert pm.name == "napari-medseg"
    for cmd in pm.contributions.commands or []:
        module, _, attr = cmd.python_name.partition(":")
        obj = importlib.import_module(module)
        assert hasattr(obj, attr), cmd.python_name
    kinds = {c.command for c in pm.contributions.sample_data or []}
    assert {"napari-medseg.sample_ct_2d", "napari-medseg.sample_3d"} <= kinds


def test_sample_data_load():
    from napari_medseg._sample_data import sample_2d, sample_3d

    ((img2, meta2, kind2),) = sample_2d()
    assert img2.shape == (512, 512, 3) and meta2["rgb"] and kind2 == "image"
    (img3, meta3, _), (lab3, _, kind_l) = sample_3d()
    assert img3.ndim == 3 and meta3["scale"] == (2.0, 2.0, 2.0)
    assert (
        lab3.shape == img3.shape
        and kind_l == "labels"
        and set(map(int, lab3.max(axis=(0, 1, 2), keepdims=False).ravel())) == {2}
    )
