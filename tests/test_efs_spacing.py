"""Volumes whose files state no voxel size (1 on every axis): anisotropy read from the image."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

import napari_medseg as nms
from napari_medseg.engine.train.volume_geometry import assume_spacing, estimate_spacing, plan_geometry

TINY = {"widths": [4, 8, 16], "patch_voxels": 8 * 24 * 24, "device": "cpu"}


def smooth_field(shape: tuple[int, int, int] = (60, 64, 64), seed: int = 0) -> np.ndarray:
    """Isotropic random texture: Gaussian-filtered white noise (σ = 3 voxels on every axis)."""
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.normal(size=shape), 3.0).astype(np.float32)


def thick_phantom(seed: int, shape=(8, 40, 40), zscale: float = 5.0):
    """Two nested ellipsoids imaged with slices ``zscale`` times thicker than the pixels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    d = np.sqrt(((z - c[0]) * zscale) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    lab = (d < 13).astype(np.uint8) + (d < 6)
    img = gaussian_filter(20 + lab * 40.0, (0, 1, 1)) + rng.normal(0, 2, shape)
    return img.astype(np.float32), lab


def test_estimate_spacing_tells_thick_slices_from_cubes() -> None:
    vol = smooth_field()
    assert max(estimate_spacing(vol)) < 1.5  # isotropic texture reads isotropic
    z, y, x = estimate_spacing(vol[::5])  # every 5th slice kept: 5× thicker slices
    assert 4.0 <= z <= 6.0 and y < 1.5 and x < 1.5, (z, y, x)
    s = estimate_spacing(vol[:, ::4])  # the coarse axis need not be the first
    assert 3.0 <= s[1] <= 5.0 and s[0] < 1.5 and s[2] < 1.5, s
    assert estimate_spacing(np.zeros((4, 8, 8), np.float32)) == (1.0, 1.0, 1.0)  # flat: no reading


def test_assume_spacing_only_replaces_a_stated_unit_spacing() -> None:
    thick = [smooth_field(seed=s)[::5] for s in (1, 2)]
    unit = [(1.0, 1.0, 1.0)] * 2
    got = assume_spacing(unit, thick)
    assert got is not None and 4.0 <= got[0] <= 6.0 and got[1:] == (1.0, 1.0)
    assert assume_spacing([(5.0, 1.0, 1.0)] * 2, thick) is None  # a real spacing is kept
    assert assume_spacing(unit, [smooth_field(seed=3)]) is None  # isotropic content: 1 is plausible
    assert assume_spacing(unit, thick, known=(6.0, 1.0, 1.0)) == (6.0, 1.0, 1.0)  # a model's earlier choice


def test_unit_spacing_atlases_train_and_segment_as_anisotropic(tmp_path) -> None:
    """Atlases stated as 1 mm cubes get the thick-slice geometry, kept for inference and reloads."""
    torch.manual_seed(0)
    seg = nms.load_model("efs-medseg", **TINY, anisotropic_kernels=True)
    atlas, lab = thick_phantom(0)
    unl = [thick_phantom(1)[0]]
    records = list(seg.finetune([atlas], [lab], unlabeled=unl, steps=2, spacing=(1.0, 1.0, 1.0)))
    assumed = seg.config["assumed_spacing"]
    assert assumed is not None and assumed[0] >= 2.5 and assumed[1:] == [1.0, 1.0], assumed
    assert seg.config["target_spacing"][0] >= 2.5  # thick slices, not cubes
    assert seg.config["kernels"][0] == [1, 3, 3]  # ... so no 3-wide kernel across them
    assert "assumed" in records[0].message
    img, _ = thick_phantom(2)
    stated = seg.segment(img, spacing=(1.0, 1.0, 1.0))
    np.testing.assert_array_equal(stated, seg.segment(img, spacing=tuple(assumed)))
    np.testing.assert_array_equal(stated, seg.segment(img))  # no spacing at all: the same
    loaded = nms.load_model(seg.save(tmp_path / "u.safetensors"), device="cpu")
    assert loaded.config["assumed_spacing"] == assumed
    np.testing.assert_array_equal(loaded.segment(img, spacing=(1.0, 1.0, 1.0)), stated)
    cubes = nms.load_model("efs-medseg", **TINY)  # a real spacing given: nothing assumed
    for _ in cubes.finetune([atlas], [lab], steps=1, spacing=(5.0, 1.0, 1.0)):
        pass
    assert cubes.config["assumed_spacing"] is None


def test_patch_plan_does_not_depend_on_the_spacing_units() -> None:
    """10 and 11 slices (median 10.5) plan the same patch whether slices read 10 mm or 7.3 units."""
    shapes = [(10, 232, 256), (11, 216, 256)]
    mm = plan_geometry(shapes, [(10.0, 1.5, 1.5)] * 2, 3, 16 * 48 * 48, 250_000)
    units = plan_geometry(shapes, [(7.3, 1.0, 1.0)] * 2, 3, 16 * 48 * 48, 250_000)
    assert units.patch == mm.patch == (10, 64, 64) and units.pools == mm.pools


def test_cli_trains_identity_affine_nifti_with_an_assumed_spacing(tmp_path, capsys) -> None:
    """NIfTI files with an identity affine (as ACDC's): the CLI says what it assumed."""
    from napari_medseg.cli import main
    from napari_medseg.engine.io import read_image, write_image

    for i in (0, 1):
        img, lab = thick_phantom(i)
        write_image(tmp_path / "img" / f"c{i}.nii.gz", img)  # no scale: identity affine
        write_image(tmp_path / "lab" / f"c{i}.nii.gz", lab)
    assert read_image(tmp_path / "img" / "c0.nii.gz").scale == (1.0, 1.0, 1.0)
    ckpt = tmp_path / "m.safetensors"
    args = ["--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "-o", str(ckpt)]
    torch.manual_seed(0)
    assert main(["train", "efs-medseg", *args, "--steps", "1", "--device", "cpu"]) == 0
    assert "note: the volumes state no voxel size" in capsys.readouterr().err
    assert nms.load_model(ckpt).config["assumed_spacing"][0] >= 2.5
    out = tmp_path / "pred.nii.gz"
    assert (
        main(["segment", str(ckpt), str(tmp_path / "img" / "c1.nii.gz"), "-o", str(out), "--device", "cpu"])
        == 0
    )
    assert read_image(out).data.shape == (8, 40, 40)
