"""3-D patch warping (rotation/zoom) and connected-component post-processing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_medseg.engine.components import keep_largest, single_piece_classes, single_piece_union
from napari_medseg.engine.train.spatial_aug import (
    SpatialOptions,
    _rot,
    contract_patch,
    random_field,
    random_matrix,
    warp_patch,
)


def _blocky(seed: int, shape=(12, 40, 40), block=4):
    """Labels constant on block³ cubes and an image coding them (0.1 * label)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 4, [math.ceil(n / block) for n in shape])
    lab = np.kron(small, np.ones((block,) * 3, dtype=np.int64))[: shape[0], : shape[1], : shape[2]]
    return (0.1 * lab)[None].astype(np.float32), lab


def test_identity_matrix_is_a_plain_crop() -> None:
    img, lab = _blocky(0)
    start, patch = (2, 5, 7), (8, 16, 20)
    centre = [s + (p - 1) / 2 for s, p in zip(start, patch)]
    out, olab = warp_patch(img, lab, centre, patch, (10.0, 1.5, 1.5), np.eye(3))
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    np.testing.assert_allclose(out[0], img[0][sl], atol=1e-5)
    np.testing.assert_array_equal(olab, lab[sl])


def test_quarter_turn_in_plane_is_rot90() -> None:
    img, lab = _blocky(1)
    out, olab = warp_patch(img, lab, [6, 20, 20], (3, 9, 9), (10.0, 1.5, 1.5), _rot(0, math.pi / 2))
    ref = img[0, 5:8, 16:25, 16:25]
    np.testing.assert_allclose(out[0], np.rot90(ref, -1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(olab, np.rot90(lab[5:8, 16:25, 16:25], -1, axes=(1, 2)))
    assert not np.allclose(out[0], ref)


def test_random_warp_keeps_labels_on_their_image() -> None:
    img, lab = _blocky(2, (16, 48, 48))
    rng = np.random.default_rng(0)
    opts = SpatialOptions(rotate_3d=30.0)
    for spacing in [(10.0, 1.5, 1.5), (1.0, 1.0, 1.0)]:
        m = random_matrix(spacing, rng, opts)
        out, olab = warp_patch(img, lab, [8, 24, 24], (8, 24, 24), spacing, m)
        decoded = np.round(out[0] / 0.1).astype(int)
        # Trilinear image vs nearest labels differ only near block borders.
        assert (decoded == olab).mean() > 0.75  # misaligned: about 0.3
        assert set(np.unique(olab)) <= {0, 1, 2, 3}


def test_anisotropic_volumes_rotate_in_plane_only() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        m = random_matrix((10.0, 1.5, 1.5), rng, SpatialOptions())
        zoom = 1.0 / abs(m[0, 0])
        assert 0.7 - 1e-9 <= zoom <= 1.4 + 1e-9
        np.testing.assert_allclose(m[0, 1:], 0.0)
        np.testing.assert_allclose(m[1:, 0], 0.0)
    m = random_matrix((1.0, 1.0, 1.0), rng, SpatialOptions(scale=(1.0, 1.0)))
    assert abs(m[0, 1]) + abs(m[0, 2]) > 1e-3  # isotropic: tilted out of plane too
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-9)  # a pure rotation without zoom


def test_quarter_turn_tta_only_where_training_turns_that_far() -> None:
    assert SpatialOptions().covers_quarter_turns((10.0, 1.5, 1.5))  # ACDC-like: ±180° in plane
    assert not SpatialOptions().covers_quarter_turns((1.0, 1.0, 1.0))  # LA-like: ±30° per axis
    assert not SpatialOptions(rotate_inplane=45.0).covers_quarter_turns((10.0, 1.5, 1.5))
    assert not SpatialOptions(prob=0.0).covers_quarter_turns((10.0, 1.5, 1.5))


def test_stretch_scales_in_plane_axes_apart_and_off_is_unchanged() -> None:
    spacing = (10.0, 1.5, 1.5)
    m0 = random_matrix(spacing, np.random.default_rng(4), SpatialOptions())
    rng = np.random.default_rng(4)
    m = random_matrix(spacing, rng, SpatialOptions(stretch=0.3))
    singular = np.linalg.svd(m[1:, 1:])[1]
    assert singular[0] / singular[1] > 1.01  # an in-plane circle becomes an ellipse
    np.testing.assert_allclose(m[0, 1:], 0.0)  # thick slices stay unmixed
    np.testing.assert_allclose(abs(m[0, 0]), abs(m0[0, 0]))  # slice axis keeps the common zoom
    # Off (the default): no field, and the same random draws give the same matrix as before.
    assert random_field((4, 8, 8), spacing, rng, SpatialOptions()) is None
    np.testing.assert_array_equal(
        random_matrix(spacing, np.random.default_rng(4), SpatialOptions(stretch=0.0)), m0
    )


def test_elastic_field_is_smooth_in_plane_and_keeps_labels_on_their_image() -> None:
    img, lab = _blocky(5, (16, 48, 48))
    spacing, patch = (10.0, 1.5, 1.5), (8, 24, 24)
    opts = SpatialOptions(elastic=3.0, elastic_grid=12.0)
    field = random_field(patch, spacing, np.random.default_rng(0), opts)
    assert field is not None and field.shape == (*patch, 3)
    np.testing.assert_allclose(field[..., 0], 0.0)  # anisotropic: no through-plane shift
    assert field[..., 1:].std() > 1.0  # it moves things (mm)
    # Smooth: neighbouring voxels move by less than a voxel relative to each other (no folds).
    assert np.abs(np.diff(field[..., 1], axis=1)).max() < spacing[1]  # mm per voxel step
    out, olab = warp_patch(img, lab, [8, 24, 24], patch, spacing, np.eye(3), field)
    plain, plab = warp_patch(img, lab, [8, 24, 24], patch, spacing, np.eye(3))
    assert (olab != plab).mean() > 0.05  # the shapes changed ...
    assert (np.round(out[0] / 0.1).astype(int) == olab).mean() > 0.75  # ... together


def test_slice_shift_moves_each_thick_slice_as_a_whole_with_its_labels() -> None:
    img, lab = _blocky(6, (16, 48, 48))
    spacing, patch = (10.0, 1.5, 1.5), (8, 24, 24)
    opts = SpatialOptions(slice_shift=3.0)
    field = random_field(patch, spacing, np.random.default_rng(1), opts)
    assert field is not None and field.shape == (*patch, 3)
    np.testing.assert_allclose(field[..., 0], 0.0)  # no through-plane shift
    # One in-plane shift per slice: constant within a slice, different between slices.
    np.testing.assert_allclose(field[..., 1:], np.broadcast_to(field[:, :1, :1, 1:], field[..., 1:].shape))
    assert field[:, 0, 0, 1:].std() > 1.0
    out, olab = warp_patch(img, lab, [8, 24, 24], patch, spacing, np.eye(3), field)
    plain, plab = warp_patch(img, lab, [8, 24, 24], patch, spacing, np.eye(3))
    assert (olab != plab).mean() > 0.05
    assert (np.round(out[0] / 0.1).astype(int) == olab).mean() > 0.75
    # Near-isotropic volumes have no slices to misalign: no field at all.
    assert random_field(patch, (1.0, 1.0, 1.0), np.random.default_rng(1), opts) is None
    # With the elastic part too, its draws come first, so elastic-only runs are unchanged.
    with_shift = SpatialOptions(elastic=3.0, slice_shift=3.0)
    both = random_field(patch, spacing, np.random.default_rng(2), with_shift)
    alone = random_field(patch, spacing, np.random.default_rng(2), SpatialOptions(elastic=3.0))
    assert both is not None and alone is not None
    np.testing.assert_allclose((both - alone)[..., 1:].std(axis=(1, 2)).max(), 0.0, atol=1e-9)


def _heart(shape=(6, 64, 64), cavity=12.0, wall=4.0):
    """A disc (3, 'cavity') inside a ring (2, 'wall') on every slice; image codes 0.1 * label."""
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    r = np.hypot(yy - 30.0, xx - 34.0)
    sl = np.where(r < cavity, 3, np.where(r < cavity + wall, 2, 0))
    lab = np.broadcast_to(sl, shape).astype(np.int64).copy()
    lab[0] = 0  # one slice without the structure
    return (0.1 * lab)[None].astype(np.float32), lab


def test_contraction_shrinks_the_cavity_thickens_its_wall_and_keeps_labels_on_the_image() -> None:
    img, lab = _heart()
    spacing = (10.0, 1.5, 1.5)
    opts = SpatialOptions(contract=1.0, contract_strength=1.5)
    seen = thicker = 0
    for seed in range(12):
        out, olab = contract_patch(img, lab, spacing, np.random.default_rng(seed), opts)
        assert out.shape == img.shape and olab.shape == lab.shape
        assert (np.round(out[0] / 0.1).astype(int) == olab).mean() > 0.97  # moved together
        np.testing.assert_array_equal(olab[0], 0)  # an empty slice stays empty
        cavity = (olab[1:] == 3).sum()
        assert cavity <= (lab[1:] == 3).sum()  # never grows
        if cavity < 0.9 * (lab[1:] == 3).sum():  # a marked contraction about either structure
            seen += 1
            # The wall moved in with the cavity but its outer edge less: along the row through
            # the centre (a radius of both structures) the wall never thins, and often thickens
            # by a whole voxel or more.
            wall, before = (olab[1:, 30] == 2).sum(), (lab[1:, 30] == 2).sum()
            assert wall >= before
            thicker += int(wall > before)
            # Far from the structure nothing moved.
            np.testing.assert_array_equal(olab[:, :, -2:], lab[:, :, -2:])
    assert seen >= 4 and thicker >= 3
    # No foreground: unchanged.
    blank = np.zeros_like(lab)
    same, same_lab = contract_patch(img, blank, spacing, np.random.default_rng(0), opts)
    assert same is img and same_lab is blank


def test_keep_largest_and_single_piece_rule() -> None:
    lab = np.zeros((6, 20, 20), np.int32)
    lab[1:5, 2:10, 2:10] = 1  # class 1: one big piece ...
    lab[2, 16:18, 16:18] = 1  # ... and a stray blob
    lab[1:3, 12:15, 2:5] = 2  # class 2: two similar pieces
    lab[3:5, 12:15, 15:18] = 2
    assert single_piece_classes([lab], 3) == [1]  # a 4-voxel stray blob is tolerated (< 5 %)
    assert single_piece_classes([lab], 4, share=0.99) == []  # class 3 absent, 2 in two pieces
    out = keep_largest(lab, [1])
    assert (out[2, 16:18, 16:18] == 0).all() and (out[1:5, 2:10, 2:10] == 1).all()
    np.testing.assert_array_equal(out == 2, lab == 2)  # other classes untouched
    np.testing.assert_array_equal(lab[2, 16, 16], 1)  # input not modified


def test_keep_largest_union_first() -> None:
    # An "organ" of two touching classes, and a bigger false blob of class 1 elsewhere
    # (it wins class 1 on its own, but it is not part of the largest foreground piece).
    lab = np.zeros((6, 30, 30), np.int32)
    lab[1:5, 2:6, 2:8] = 1  # true class-1 part: 96 voxels
    lab[1:5, 6:12, 2:8] = 2  # touching class 2: 144 voxels
    lab[1:5, 18:24, 18:24] = 1  # false class-1 blob: 144 voxels
    assert single_piece_union([lab[:, :12]]) and not single_piece_union([lab])
    assert not single_piece_union([np.zeros_like(lab)])
    assert not single_piece_union([(lab[:, :12] > 0).astype(np.int32)])  # one class: per-class rule
    per_class = keep_largest(lab, [1, 2])
    assert (per_class[1:5, 2:6, 2:8] == 0).all()  # the true part loses to the bigger blob
    out = keep_largest(lab, [1, 2], union=True)
    assert (out[1:5, 2:6, 2:8] == 1).all() and (out[1:5, 6:12, 2:8] == 2).all()
    assert (out[1:5, 18:24, 18:24] == 0).all()
    np.testing.assert_array_equal(keep_largest(lab, [], union=True), out)  # union alone
    # A piece detached from the organ by a gap of two voxels still belongs to it; three do not.
    near, far = lab.copy(), lab.copy()
    near[1:5, 14:17, 2:8] = 1  # rows 12-13 empty
    far[1:5, 15:17, 2:8] = 1  # rows 12-14 empty
    assert (keep_largest(near, [], union=True)[1:5, 14:17, 2:8] == 1).all()
    assert (keep_largest(far, [], union=True)[1:5, 15:17, 2:8] == 0).all()
    # The main piece is the one holding every class, even when a one-class blob is bigger.
    big = lab.copy()
    big[0:6, 16:28, 16:28] = 1  # 864 voxels of class 1 alone, against the organ's 240
    kept = keep_largest(big, [1, 2], union=True)
    assert (kept[1:5, 2:12, 2:8] > 0).all() and (kept[:, 16:, 16:] == 0).all()
    by_size = keep_largest(big, [1, 2], union=True, union_select="size")
    assert (by_size[1:5, 2:12, 2:8] == 0).all() and (by_size[:, 16:28, 16:28] == 1).all()
    with pytest.raises(ValueError, match="union_select"):
        keep_largest(big, [1, 2], union=True, union_select="biggest")
