"""Checkpoints: exact round trip, one-line errors for every bad file, atomic writes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import napari_medseg as nms
from conftest import disc_image
from napari_medseg.engine import checkpoint as ck
from napari_medseg.engine.checkpoint import CheckpointError


@pytest.fixture
def trained(toy_registered, tmp_path):
    seg = toy_registered(device="cpu")
    image, mask = disc_image()
    for _ in seg.finetune(image, mask, steps=3, seed=1):
        pass
    path = seg.save(tmp_path / "toy.safetensors")
    return seg, path, image


def test_round_trip_is_bit_exact(trained):
    seg, path, image = trained
    again = nms.load_model(path, device="cpu")
    assert type(again) is type(seg)
    assert again.class_names == seg.class_names and again.preset == seg.preset
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(seg.logits(x), again.logits(x))
    np.testing.assert_array_equal(seg.segment(image), again.segment(image))
    assert again.provenance["trained_by"] == "napari-medseg finetune"


def _rewrite_header(path, change):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_truncated_file(trained, tmp_path):
    _, path, _ = trained
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        nms.load_model(bad)
    assert "cut.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        nms.load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        nms.load_model(tmp_path / "nope.safetensors")


def test_unknown_name():
    with pytest.raises(KeyError, match="known networks"):
        nms.load_model("no-such-net")


def test_newer_version(trained):
    _, path, _ = trained
    _rewrite_header(path, lambda h: h["__metadata__"].update(format_version="99"))
    with pytest.raises(CheckpointError, match="newer napari-medseg"):
        nms.load_model(path)


def test_other_network(trained):
    _, path, _ = trained
    with pytest.raises(CheckpointError, match="not 'sts-net'"):
        ck.load_checkpoint(path, expect_model="sts-net")
    _rewrite_header(path, lambda h: h["__metadata__"].update(model="mystery-net"))
    with pytest.raises(CheckpointError, match="does not know"):
        nms.load_model(path)


def test_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a napari-medseg checkpoint"):
        nms.load_model(path)


def test_wrong_shape(trained):
    seg, path, _ = trained
    c = ck.load_checkpoint(path)
    key = next(k for k, v in c.tensors.items() if v.ndim == 4)
    c.tensors[key] = torch.zeros(3, 3, 3, 3)
    ck.save_checkpoint(path, c)
    with pytest.raises(CheckpointError, match="has shape"):
        nms.load_model(path)


def test_missing_tensor(trained):
    _, path, _ = trained
    c = ck.load_checkpoint(path)
    c.tensors.pop(next(iter(c.tensors)))
    ck.save_checkpoint(path, c)
    with pytest.raises(CheckpointError, match="missing"):
        nms.load_model(path)


def test_atomic_save_keeps_old_file(trained, monkeypatch):
    seg, path, _ = trained
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        seg.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_loading_never_unpickles(trained, monkeypatch):
    _, path, _ = trained
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    nms.load_model(path, device="cpu")
