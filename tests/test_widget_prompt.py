"""The Prompt widget in a real napari viewer (Xvfb via pytest-xvfb) with a fake promptable model."""

from __future__ import annotations

import os
import tempfile

# napari reads its settings folder at import: keep it out of HOME.
_XDG = tempfile.mkdtemp(prefix="medseg-xdg-")
os.environ.setdefault("XDG_CONFIG_HOME", _XDG)
os.environ.setdefault("XDG_CACHE_HOME", _XDG)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fake_prompt import FakePromptSegmenter, ball_volume  # noqa: E402

pytestmark = pytest.mark.gui

napari = pytest.importorskip("napari")


def disc_image(shape=(64, 80), center=(20, 30), radius=7, rgb=False):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2
    rng = np.random.default_rng(1)
    img = (truth * 180 + rng.integers(0, 40, shape)).astype(np.uint8)
    if rgb:
        img = np.stack([img, img // 2 + 10, img], -1).astype(np.uint8)
    return img, truth


@pytest.fixture
def setup(make_napari_viewer, qtbot):
    from napari_medseg.widgets.prompt import PromptWidget

    def make(image, fake=None, **layer_kw):
        viewer = make_napari_viewer()
        viewer.add_image(image, name="img", **layer_kw)
        fake = fake or FakePromptSegmenter()
        widget = PromptWidget(viewer, model_factory=lambda: fake)
        qtbot.addWidget(widget)
        return viewer, widget, fake

    return make


def wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy, timeout=15000)


def test_point_updates_preview_2d_and_decodes_without_reencoding(setup, qtbot):
    img, truth = disc_image()
    viewer, w, fake = setup(img)
    assert w.points_layer is not None and w.preview_layer.data.shape == img.shape
    w.points_layer.add([[20, 30]])
    wait(qtbot, w)
    np.testing.assert_array_equal(w.preview_layer.data > 0, truth)
    assert fake.encode_count == 1
    # a second prompt change decodes on the main thread from the cached embedding
    w.points_layer.add([[22, 28]])
    assert not w.busy and fake.encode_count == 1 and w.last_decode_ms is not None
    np.testing.assert_array_equal(w.preview_layer.data > 0, truth)
    # colours follow polarity
    np.testing.assert_allclose(w.points_layer.face_color[:, :3], [[0, 1, 0]] * 2)


def test_box_on_rgb_and_negative_point(setup, qtbot):
    img, _ = disc_image(rgb=True)
    yy, xx = np.mgrid[:64, :80]
    second = (yy - 45) ** 2 + (xx - 60) ** 2 <= 36
    img[second] = 200
    viewer, w, fake = setup(img, rgb=True)
    assert w.preview_layer.data.shape == (64, 80)
    w.shapes_layer.add(np.array([[5, 10], [60, 75]]), shape_type="rectangle")
    wait(qtbot, w)
    mask = w.preview_layer.data > 0
    assert mask[20, 30] and mask[45, 60] and not mask[2, 2]
    w.toggle_polarity()
    assert not w.positive_check.isChecked()
    w.points_layer.add([[45, 60]])
    wait(qtbot, w)
    mask = w.preview_layer.data > 0
    assert mask[20, 30] and not mask[45, 60]
    np.testing.assert_allclose(w.points_layer.face_color[0, :3], [1, 0, 0])
    assert int(w.points_layer.features["label"].iloc[0]) == 0


def test_commit_multi_object_class_id_and_undo(setup, qtbot):
    img, truth = disc_image()
    img[40:50, 60:70] = 220
    viewer, w, _ = setup(img)
    w.points_layer.add([[20, 30]])
    wait(qtbot, w)
    assert w.commit() == 1
    target = viewer.layers["medseg objects"]
    np.testing.assert_array_equal(target.data == 1, truth)
    assert len(w.points_layer.data) == 0 and not w.preview_layer.data.any()
    before = target.data.copy()
    w.points_layer.add([[45, 65]])
    wait(qtbot, w)
    assert w.commit() == 2  # next free id
    assert (target.data == 2).sum() == 100
    target.undo()
    np.testing.assert_array_equal(target.data, before)
    target.redo()
    assert (target.data == 2).sum() == 100
    # semantic labelling: a chosen class id
    w.class_spin.setValue(5)
    w.shapes_layer.add(np.array([[10, 20], [30, 40]]), shape_type="rectangle")
    wait(qtbot, w)
    assert w.commit() == 5
    assert (target.data == 5).sum() == truth.sum()
    target.undo()
    assert not (target.data == 5).any() and (target.data == 2).sum() == 100


def test_layer_changes_rebuild_helpers(setup, qtbot):
    img, truth = disc_image()
    viewer, w, _ = setup(img)
    viewer.layers.remove(w.preview_layer.name)
    qtbot.waitUntil(lambda: w.preview_layer is not None and w.preview_layer.name in viewer.layers)
    assert sum(ly.name.startswith("medseg point prompts") for ly in viewer.layers) == 1
    vol, _ = ball_volume()
    viewer.add_image(vol, name="vol")
    qtbot.waitUntil(lambda: w.image_combo.findText("vol") >= 0)
    w.image_combo.setCurrentText("vol")
    assert w.preview_layer.data.shape == vol.shape and w.points_layer.ndim == 3
    assert len([ly for ly in viewer.layers if ly.name.startswith("medseg")]) == 3
    viewer.layers.remove("vol")
    qtbot.waitUntil(lambda: w.image_layer.name == "img")
    assert w.preview_layer.data.shape == img.shape
    viewer.layers.clear()  # must not hang napari's layer list view
    qtbot.waitUntil(lambda: w.image_layer is None)
    assert len(viewer.layers) == 0


def test_key_bindings_on_prompt_layers(setup, qtbot):
    img, truth = disc_image()
    viewer, w, _ = setup(img)
    handler = viewer.window._qt_viewer._key_map_handler
    viewer.layers.selection.active = w.points_layer
    handler.press_key("T")
    assert not w.positive_check.isChecked()
    handler.press_key("T")
    assert w.positive_check.isChecked()
    w.points_layer.add([[20, 30]])
    wait(qtbot, w)
    viewer.layers.selection.active = w.points_layer
    handler.press_key("C")
    target = viewer.layers["medseg objects"]
    np.testing.assert_array_equal(target.data == 1, truth)
    w.points_layer.add([[20, 30]])
    wait(qtbot, w)
    viewer.layers.selection.active = w.points_layer
    handler.press_key("Shift-C")
    assert len(w.points_layer.data) == 0 and not w.preview_layer.data.any()
    # napari's own keys stay untouched on the image layer
    assert "C" not in {str(k) for k in viewer.layers["img"].keymap}


def test_disk_cache_reused_and_invalidated_by_preset(setup, qtbot, tmp_path):
    img, truth = disc_image()
    viewer, w, fake = setup(img)
    w.cache_dir.setText(str(tmp_path))
    w.points_layer.add([[20, 30]])
    wait(qtbot, w)
    assert fake.encode_count == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    w.close_session()
    # "reopen": a fresh model and session on the same image read the disk cache
    fresh = FakePromptSegmenter()
    w.model, w.model_factory = None, lambda: fresh
    w.clear()
    w.points_layer.add([[20, 30]])
    wait(qtbot, w)
    assert fresh.encode_count == 0 and w.session.encode_calls == 0
    np.testing.assert_array_equal(w.preview_layer.data > 0, truth)
    # another intensity preset is another cache key: encode again
    w.preset_combo.setCurrentText("minmax")
    w.points_layer.add([[21, 30]])
    wait(qtbot, w)
    assert fresh.encode_count == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_precompute_then_propagate_3d(setup, qtbot):
    vol, truth = ball_volume()
    viewer, w, fake = setup(vol)
    w.precompute()
    wait(qtbot, w)
    assert fake.encode_count == vol.shape[0]
    viewer.dims.set_current_step(0, 12)
    assert w.current_slice() == 12
    w.points_layer.add([[12, 24, 20]])
    wait(qtbot, w)
    assert fake.encode_count == vol.shape[0]  # precomputed: no encode on click
    np.testing.assert_array_equal(w.preview_layer.data[12] > 0, truth[12])
    assert not w.preview_layer.data[11].any()
    w.propagate()
    wait(qtbot, w)
    target = viewer.layers["medseg objects"]
    zs = np.nonzero((target.data == 1).any((1, 2)))[0]
    true_zs = np.nonzero(truth.any((1, 2)))[0]
    assert abs(zs.min() - true_zs.min()) <= 1 and abs(zs.max() - true_zs.max()) <= 1
    assert (target.data[12] == 1).sum() == truth[12].sum()
    target.undo()
    assert not target.data.any()


def test_cancel_precompute(setup, qtbot):
    vol, _ = ball_volume(shape=(40, 32, 32), center=(20, 16, 16))
    fake = FakePromptSegmenter()
    slow_encode = fake.encode_slice

    def encode(image, roi):
        import time

        time.sleep(0.05)
        return slow_encode(image, roi)

    fake.encode_slice = encode
    viewer, w, _ = setup(vol, fake=fake)
    w.precompute()
    qtbot.waitUntil(lambda: fake.encode_count >= 2, timeout=10000)
    w.cancel()
    wait(qtbot, w)
    assert 2 <= fake.encode_count < 40
    assert w.status.text() == "Cancelled."


def test_scaled_translated_anisotropic_layer(setup, qtbot):
    vol, truth = ball_volume()
    scale, translate = (3.0, 0.7, 0.5), (10.0, -5.0, 4.0)
    viewer, w, fake = setup(vol, scale=scale, translate=translate)
    assert tuple(w.points_layer.scale) == scale and tuple(w.preview_layer.translate) == translate
    world_center = np.array(translate) + np.array(scale) * np.array([12, 24, 20])
    viewer.dims.set_point(0, world_center[0])
    assert w.current_slice() == 12
    w.points_layer.add([w.points_layer.world_to_data(world_center)])
    wait(qtbot, w)
    np.testing.assert_array_equal(w.preview_layer.data[12] > 0, truth[12])
    # a prompt layer on another grid still lands on the object (world -> image data)
    w.clear()
    w.points_layer.scale = (1.0, 1.0, 1.0)
    w.points_layer.translate = (0.0, 0.0, 0.0)
    w.points_layer.add([w.points_layer.world_to_data(world_center)])
    wait(qtbot, w)
    np.testing.assert_array_equal(w.preview_layer.data[12] > 0, truth[12])
    # a box drawn on slice 14 (Shapes layer on the image's grid) prompts slice 14 only
    w.clear()
    viewer.dims.set_point(0, translate[0] + scale[0] * 14)
    rect = np.array([[14, 15, 12], [14, 15, 28], [14, 33, 28], [14, 33, 12]], float)
    w.shapes_layer.add(rect, shape_type="rectangle")
    wait(qtbot, w)
    assert w.current_slice() == 14
    np.testing.assert_array_equal(w.preview_layer.data[14] > 0, truth[14])
    assert not np.delete(w.preview_layer.data, 14, axis=0).any()


def test_opens_from_manifest(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((32, 32)), name="img")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Prompt (HF-SAM)")
    assert type(widget).__name__ == "PromptWidget"
    assert widget.image_layer.name == "img"
    # the manifest hands the widget a proxied viewer: a click still decodes from the cache
    fake = FakePromptSegmenter()
    widget.model_factory = lambda: fake
    widget.points_layer.add([[5, 5]])
    qtbot.waitUntil(lambda: not widget.busy, timeout=15000)
    widget.points_layer.add([[6, 6]])
    assert fake.encode_count == 1 and not widget.busy


@pytest.mark.slow
def test_real_hf_sam_box_prompt(make_napari_viewer, qtbot):
    """LiteMedSAM backbone (shipped weights, CPU): a box around a disc gives the disc."""
    from napari_medseg import load_model
    from napari_medseg.widgets.prompt import PromptWidget

    img, truth = disc_image(shape=(128, 128), center=(60, 70), radius=18)
    viewer = make_napari_viewer()
    viewer.add_image(img, name="img")
    w = PromptWidget(viewer, model_factory=lambda: load_model("hf-sam", device="cpu"))
    qtbot.addWidget(w)
    w.shapes_layer.add(np.array([[38, 48], [82, 92]]), shape_type="rectangle")
    qtbot.waitUntil(lambda: not w.busy, timeout=180_000)
    pred = w.preview_layer.data > 0
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.8, dice
    w.shapes_layer.add(np.array([[36, 46], [84, 94]]), shape_type="rectangle")
    qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
    assert w.session.encode_calls == 1
