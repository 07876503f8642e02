"""Medical I/O: NIfTI round trip keeps spacing and affine; TIFF/PNG; napari reader/writer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.engine.io import read_image, write_image
from napari_medseg.io_napari import get_reader, write_labels


@pytest.fixture
def nifti(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.integers(-1000, 1000, (20, 16, 8)).astype(np.int16)  # (X, Y, Z) on disk
    affine = np.array([[0.7, 0, 0, -10], [0, 0.8, 0.1, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(xyz, affine), str(path))
    return path, xyz, affine


def test_nifti_reader_axes_scale_affine(nifti):
    path, xyz, affine = nifti
    reader = get_reader(str(path))
    assert reader is not None
    ((data, meta, kind),) = reader(str(path))
    assert kind == "image" and data.shape == (8, 16, 20)
    np.testing.assert_array_equal(data, xyz.T)
    assert meta["scale"] == pytest.approx((np.hypot(2.5, 0.1), 0.8, 0.7), abs=1e-4)
    np.testing.assert_allclose(meta["metadata"]["affine"], affine)


def test_labels_written_back_overlay_the_image(nifti, tmp_path):
    path, xyz, affine = nifti
    ((data, meta, _),) = get_reader(str(path))(str(path))
    labels = (data > 0).astype(np.uint8)
    out = tmp_path / "ct_labels.nii.gz"
    write_labels(str(out), labels, {"scale": meta["scale"], "metadata": meta["metadata"]})
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), (xyz > 0).astype(np.uint8))
    ((again, meta2, kind2),) = get_reader(str(out))(str(out))
    assert kind2 == "labels" and np.array_equal(again, labels)


def test_reader_declines_other_files():
    assert get_reader("image.png") is None
    assert get_reader(["a.nii.gz", "b.tif"]) is None


@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy", ".nii"])
def test_round_trip_formats(tmp_path, suffix):
    data = (np.arange(24 * 30).reshape(24, 30) % 200).astype(np.uint8)
    p = write_image(tmp_path / f"x{suffix}", data)
    np.testing.assert_array_equal(read_image(p).data, data)


def test_tiff_volume_and_rgb_png(tmp_path):
    vol = np.random.default_rng(1).random((4, 10, 12)).astype(np.float32)
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "v.tif", vol)).data, vol)
    rgb = np.random.default_rng(2).integers(0, 255, (10, 12, 3)).astype(np.uint8)
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "c.png", rgb)).data, rgb)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="cannot read junk.nii.gz"):
        read_image(junk)
    with pytest.raises(ValueError, match="unsupported"):
        read_image(_touch(tmp_path / "x.xyz"))
    with pytest.raises(ValueError, match="2-D images only"):
        write_image(tmp_path / "v.png", np.zeros((3, 4, 5), np.uint8))


def _touch(p):
    p.write_bytes(b"1")
    return p
