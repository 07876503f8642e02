"""Intensity presets: CT windows in HU, auto-detection, one mapping per volume."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.engine.preprocess import apply_preset, detect_preset, get_preset, resolve_preset


def test_ct_soft_tissue_window():
    p = get_preset("ct-soft-tissue")  # level 40, width 400 → [-160, 240]
    hu = np.array([-1000, -160, 40, 240, 3000], np.int16)
    np.testing.assert_allclose(apply_preset(hu, p), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_custom_window_and_errors():
    p = get_preset("ct:-600,1500")
    assert (p.low, p.high) == (-1350, 150)
    with pytest.raises(ValueError, match="ct:40,400"):
        get_preset("ct:abc")
    with pytest.raises(ValueError, match="unknown intensity preset"):
        get_preset("fancy")


def test_auto_detection():
    assert detect_preset(np.zeros((4, 4, 3), np.uint8), rgb=True).name == "rgb"
    assert detect_preset(np.zeros((4, 4), np.uint8), rgb=False).name == "uint8"
    ct = np.array([[-1024, 0], [400, 1200]], np.int16)
    assert detect_preset(ct, rgb=False).name == "ct-soft-tissue"
    assert detect_preset(np.random.rand(4, 4).astype(np.float32), rgb=False).name == "mr"


def test_percentile_is_per_volume_not_per_slice():
    vol = np.stack([np.linspace(0, 10, 100), np.linspace(0, 1000, 100)]).reshape(2, 10, 10)
    out = apply_preset(vol, resolve_preset("mr", vol, False))
    assert out[0].max() < 0.05  # the dark slice stays dark: scaled with the volume's range


def test_preset_round_trip_json():
    p = get_preset("ct-lung")
    assert type(p).from_json(p.to_json()) == p
