"""Weights registry: offline errors name file and folder; hand-placed files are used."""

from __future__ import annotations

import hashlib

import pytest

from napari_medseg.engine import weights as w


def test_offline_error_names_file_and_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_MEDSEG_WEIGHTS", str(tmp_path))
    with pytest.raises(w.WeightsUnavailable) as err:
        w.fetch_weights("sam_vit_b", download=False)
    msg = str(err.value)
    assert "sam_vit_b_01ec64.pth" in msg and str(tmp_path) in msg and "NAPARI_MEDSEG_WEIGHTS" in msg


def test_hand_placed_file_is_used_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_MEDSEG_WEIGHTS", str(tmp_path))
    payload = b"weights!"
    entry = w.WeightsEntry(
        "tiny",
        "tiny.pth",
        "https://example.invalid/tiny.pth",
        hashlib.sha256(payload).hexdigest()[:8],
        0.0,
        "MIT",
        "test",
    )
    monkeypatch.setitem(w.WEIGHTS, "tiny", entry)
    (tmp_path / "tiny.pth").write_bytes(payload)
    assert w.fetch_weights("tiny", download=False) == tmp_path / "tiny.pth"
    (tmp_path / "tiny.pth").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        w.fetch_weights("tiny", download=False)


def test_unknown_weights():
    with pytest.raises(KeyError, match="known"):
        w.fetch_weights("nope")


def test_litemedsam_ships_with_package():
    path = w.litemedsam_path()
    assert path.is_file() and path.stat().st_size > 30e6


def test_every_entry_is_complete():
    for e in w.WEIGHTS.values():
        assert e.url.startswith("https://") and len(e.sha256) >= 8 and e.licence
