"""The Segment dock widget in a real napari viewer (Xvfb via pytest-xvfb), with the toy network."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

# napari reads its settings folder at import: keep it out of HOME.
_XDG = tempfile.mkdtemp(prefix="medseg-xdg-")
os.environ.setdefault("XDG_CONFIG_HOME", _XDG)
os.environ.setdefault("XDG_CACHE_HOME", _XDG)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.gui

napari = pytest.importorskip("napari")

from napari.layers import Labels  # noqa: E402

from napari_medseg.engine import registry  # noqa: E402
from napari_medseg.engine.api import load_model  # noqa: E402
from napari_medseg.widgets import _layers  # noqa: E402
from napari_medseg.widgets.segment import SegmentWidget  # noqa: E402
from napari_medseg.widgets.session import session_models  # noqa: E402


def volume(z: int = 3, size: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2.5) ** 2 < (size / 5) ** 2) * 100.0
    return (disc[None] + rng.normal(20, 8, (z, size, size))).astype(np.float32)


@pytest.fixture
def trained_toy(toy_registered, tmp_path):
    """Path of a saved toy checkpoint marked as trained."""
    seg = toy_registered(device="cpu")
    seg.trained = True
    return seg.save(tmp_path / "toy.safetensors")


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot):
    def make(**image_kw):
        viewer = make_napari_viewer()
        image = viewer.add_image(image_kw.pop("data", volume()), name="img", **image_kw)
        widget = SegmentWidget(viewer)
        qtbot.addWidget(widget)
        return viewer, widget, image

    return make


def wait_idle(qtbot, widget, timeout=30000):
    qtbot.waitUntil(lambda: widget.job is not None and not widget.job.running, timeout=timeout)


def test_untrained_network_is_disabled_with_reason_then_runs_from_checkpoint(
    viewer_widget, trained_toy, qtbot
):
    scale, translate = (2.0, 0.5, 0.7), (10.0, -3.0, 4.0)
    viewer, w, image = viewer_widget(scale=scale, translate=translate)
    before = image.data.copy()
    w.select_network("toy-test-net")
    assert not w.run_button.isEnabled()
    assert "fine-tune it first" in w.reason.text()
    w.checkpoint.setText(str(trained_toy) + ".missing")
    assert "not found" in w.blocking_reason()
    w.checkpoint.setText(str(trained_toy))
    assert w.run_button.isEnabled() and w.blocking_reason() == ""

    w.run()
    assert w.cancel_button.isEnabled()
    wait_idle(qtbot, w)
    out = viewer.layers["img [toy-test-net]"]
    assert isinstance(out, Labels)
    np.testing.assert_allclose(out.scale, scale)
    np.testing.assert_allclose(out.translate, translate)
    expected = load_model(trained_toy, device="cpu").segment(before)
    np.testing.assert_array_equal(out.data, expected)
    np.testing.assert_array_equal(image.data, before)  # the input layer is untouched
    assert w.progress.value() == w.progress.maximum()
    assert not w.cancel_button.isEnabled()


def test_cancel_stops_at_next_slice_and_adds_no_layer(
    viewer_widget, trained_toy, toy_registered, qtbot, monkeypatch
):
    fast = toy_registered.logits

    def slow_logits(self, x):  # the toy is so fast the worker would finish before Cancel lands
        time.sleep(0.1)
        return fast(self, x)

    monkeypatch.setattr(toy_registered, "logits", slow_logits)
    viewer, w, _ = viewer_widget(data=volume(z=60, size=48))
    w.select_network("toy-test-net")
    w.checkpoint.setText(str(trained_toy))
    seen = []

    def on_progress(p):
        seen.append(p)
        if p.total > 0 and w.job is not None:
            w.cancel()

    job = w.run()
    job.worker.yielded.connect(on_progress)
    wait_idle(qtbot, w)
    assert job._outcome == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["img"]
    counted = [p for p in seen if p.total > 0]
    assert counted and counted[-1].done < counted[-1].total
    assert "cancelled" in w.status.text()
    assert w.run_button.isEnabled()


def test_labels_layer_selected_gives_clear_message(viewer_widget, trained_toy):
    viewer, w, _ = viewer_widget()
    w.select_network("toy-test-net")
    w.checkpoint.setText(str(trained_toy))
    viewer.add_labels(np.zeros((3, 40, 40), np.uint8), name="painted")
    assert w.run() is None
    assert "'painted' is a Labels layer" in w.status.text()
    assert len(viewer.layers) == 2


def test_failed_run_reports_and_changes_no_layer(viewer_widget, trained_toy, qtbot):
    viewer, w, image = viewer_widget(data=np.full((2, 32, 32), 7.0, np.float32))
    w.select_network("toy-test-net")
    w.checkpoint.setText(str(trained_toy))
    w.run()
    wait_idle(qtbot, w)
    assert w.job._outcome == "failed"
    assert "constant" in w.status.text()
    assert [layer.name for layer in viewer.layers] == ["img"]
    assert np.all(image.data == 7.0)


def test_session_model_is_listed_at_once_and_runs(viewer_widget, toy_registered, qtbot):
    viewer, w, image = viewer_widget(data=volume(z=2), scale=(3.0, 1.0, 1.0))
    seg = toy_registered(device="cpu")
    seg.trained = True
    entry = session_models(viewer).add("toy-test-net", seg, label="img")
    w.select_network(entry.name)  # listed without any refresh by the caller
    assert w.run_button.isEnabled()
    assert not w.checkpoint.isEnabled()
    w.run()
    wait_idle(qtbot, w)
    out = viewer.layers[f"img [{entry.name}]"]
    np.testing.assert_allclose(out.scale, image.scale)
    np.testing.assert_array_equal(out.data, seg.segment(image.data))
    # the store belongs to this viewer only
    other = type("OtherViewer", (), {})()
    assert session_models(other).names() == [] and session_models(viewer).names() == [entry.name]


def test_rgb_image_and_custom_ct_preset(viewer_widget, trained_toy, qtbot):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)
    viewer, w, image = viewer_widget(data=rgb, rgb=True, translate=(5.0, 6.0))
    w.select_network("toy-test-net")
    w.checkpoint.setText(str(trained_toy))
    w.preset.setCurrentText("ct-custom")
    assert w.ct_row.isVisibleTo(w)
    w.ct_level.setValue(50)
    w.ct_width.setValue(300)
    assert w._preset_name() == "ct:50,300"
    w.preset.setCurrentText("rgb")
    w.run()
    wait_idle(qtbot, w)
    out = viewer.layers["img [toy-test-net]"]
    assert out.data.shape == (40, 48)
    np.testing.assert_allclose(out.translate, (5.0, 6.0))


def test_points_to_indices_maps_between_layer_geometries(make_napari_viewer):
    viewer = make_napari_viewer()
    labels = viewer.add_labels(np.zeros((4, 20, 30), np.uint8), scale=(2, 0.5, 0.5), translate=(0, 10, 0))
    # a 2-D click layer in world units with its own scale: world (y, x) = data * 2
    pts = viewer.add_points([[10.0, 2.5], [100.0, 100.0]], scale=(2, 2))
    idx = _layers.points_to_indices(pts, labels, labels.data.shape, current_world=(4.0, 0.0, 0.0))
    # world (20, 5) → labels data (20, 10): row 20 is outside the 20 rows, so both are dropped
    assert idx.shape == (0, 3)
    pts2 = viewer.add_points([[8.0, 2.5]], scale=(2, 2))  # world (16, 5) → data (12, 10)
    idx = _layers.points_to_indices(pts2, labels, labels.data.shape, current_world=(4.0, 0.0, 0.0))
    np.testing.assert_array_equal(idx, [[2, 12, 10]])


@pytest.fixture
def clusters_network(toy_registered):
    """A toy network whose card says its output is clusters (like s3-net)."""
    card = dataclasses.replace(
        toy_registered.card, name="toy-clusters", output="clusters", needs_labels=False
    )
    cls = type("ToyClusters", (toy_registered,), {"card": card})
    registry.register(card, cls)
    yield cls
    registry._CARDS.pop(card.name, None)
    registry._CLASSES.pop(card.name, None)


def test_keep_clusters_under_clicked_points(viewer_widget, clusters_network, qtbot):
    viewer, w, _ = viewer_widget(data=volume(z=1)[0], scale=(0.5, 0.5), translate=(2.0, 3.0))
    w.select_network("toy-clusters")
    assert w.clusters_box.isVisibleTo(w)
    w.select_network("toy-test-net")
    assert not w.clusters_box.isVisibleTo(w)
    clusters = np.zeros((40, 40), np.int32)
    clusters[:20] = 1
    clusters[20:, :20] = 2
    clusters[20:, 20:] = 3
    lab = viewer.add_labels(clusters, name="img [toy-clusters]", scale=(0.5, 0.5), translate=(2.0, 3.0))
    w.select_network("toy-clusters")
    w.clusters_box.labels.set_layer(lab.name)
    pts = w.clusters_box.add_click_layer()
    assert pts is not None and pts.mode == "add"
    pts.add([[30, 5], [35, 38]])  # clicks (in the click layer's data space) on clusters 2 and 3
    pytest.importorskip("napari_medseg.engine.clusters")
    assert w.clusters_box.connected_only.isChecked() and w.clusters_box.fill_holes.isChecked()
    out = w.clusters_box.keep_clicked_clusters()
    assert out is not None
    np.testing.assert_array_equal(out.data > 0, clusters >= 2)
    # Cluster 3 in two pieces: by default only the clicked piece; unticked, the whole cluster.
    split = clusters.copy()
    split[2:8, 2:8] = 3
    split_layer = viewer.add_labels(split, name="split", scale=(0.5, 0.5), translate=(2.0, 3.0))
    w.clusters_box.labels.set_layer(split_layer.name)
    np.testing.assert_array_equal(w.clusters_box.keep_clicked_clusters().data > 0, clusters >= 2)
    w.clusters_box.connected_only.setChecked(False)
    np.testing.assert_array_equal(w.clusters_box.keep_clicked_clusters().data > 0, split >= 2)
    w.clusters_box.connected_only.setChecked(True)
    w.clusters_box.labels.set_layer(lab.name)
    # clicks from a layer with another geometry: world (2 + 0.5 * 5, 3 + 0.5 * 5) → cluster 1
    other = viewer.add_points([[2.0 + 0.5 * 5, 3.0 + 0.5 * 5]], name="world clicks")
    w.clusters_box.points.set_layer(other.name)
    out = w.clusters_box.keep_clicked_clusters()
    np.testing.assert_array_equal(out.data > 0, clusters == 1)
    np.testing.assert_allclose(out.translate, (2.0, 3.0))
    # a ring cluster around a centre one: "fill holes" keeps the filled disc
    ring = clusters.copy()
    ring[22:38, 2:18] = 3  # cluster 2 now rings a square of 3 in the lower-left quarter
    ring_layer = viewer.add_labels(ring, name="ring", scale=(0.5, 0.5), translate=(2.0, 3.0))
    w.clusters_box.labels.set_layer(ring_layer.name)
    w.clusters_box.points.set_layer(pts.name)
    pts.data = [[21, 1]]  # on the rim (cluster 2)
    w.clusters_box.fill_holes.setChecked(False)
    np.testing.assert_array_equal(w.clusters_box.keep_clicked_clusters().data > 0, ring == 2)
    w.clusters_box.fill_holes.setChecked(True)
    out = w.clusters_box.keep_clicked_clusters()
    np.testing.assert_array_equal(out.data > 0, (ring == 2) | ((ring == 3) & (np.arange(40) < 20)[None, :]))
    np.testing.assert_array_equal(lab.data, clusters)  # user layers untouched
    np.testing.assert_array_equal(ring_layer.data, ring)


def test_hf_sam_refine_checkbox_reaches_the_run_and_spares_the_session_model(viewer_widget, qtbot):
    from test_hf_sam import disc_image, finetune_disc, tiny

    img, _ = disc_image()
    viewer, w, _ = viewer_widget(data=img.astype(np.float32))
    assert w.options.editor("refine") is None  # the first network listed is not hf-sam
    seg = tiny("sam_vit_b", lora_rank=2)
    finetune_disc(seg, steps=2, lr=1e-2)
    entry = session_models(viewer).add("hf-sam", seg, label="img")
    w.select_network(entry.name)
    refine = w.options.editor("refine")
    assert refine is not None and not w.options.isHidden() and refine.isChecked()
    refine.setChecked(False)
    doubt = w.options.editor("refine_score_margin")  # Drop pieces SAM doubts: auto by default
    assert doubt is not None and doubt.currentText() == "auto (grayscale)"
    assert w.options.values()["refine_score_margin"] == "auto"
    doubt.setCurrentText("off")
    assert w.options.values()["refine_score_margin"] is None
    doubt.setCurrentText("on")
    assert w.options.values()["refine_score_margin"] == 0.02
    doubt.setCurrentText("auto (grayscale)")
    mirrors = w.options.editor("tta")  # Mirrored views: starts as trained, "off" reaches the run
    assert mirrors is not None and mirrors.currentText() == "auto (as trained)"
    assert seg.test_time_views() == 2  # the gray disc trained upright: slice + left-right mirror
    mirrors.setCurrentText("off")
    w.run()
    wait_idle(qtbot, w)
    out = viewer.layers[f"img [{entry.name}]"]
    assert seg.config["refine"] == "boxes" and seg.config["tta"] == "auto"  # session model kept
    raw = seg.segment(img)
    seg.config["refine"], seg.config["tta"] = "off", 1
    np.testing.assert_array_equal(out.data, seg.segment(img))
    seg.config["refine"], seg.config["tta"] = "boxes", "auto"
    assert not np.array_equal(raw, out.data)  # unticking really skipped the refinement


def test_s3_net_run_options_reach_the_run_and_survive_refreshes(viewer_widget, toy_registered, qtbot):
    """The S³-Net form shows its defaults; edited values are what the run uses."""
    img = volume(z=1, size=24)[0]
    viewer, w, _ = viewer_widget(data=img)
    w.select_network("s3-net")
    assert w.options.keys() == [
        "mode",
        "restarts",
        "channels",
        "flatten",
        "regions",
        "working_size",
        "max_iter",
        "seed",
    ]
    assert w.options.values() == {
        "mode": "paper",
        "restarts": 1,
        "channels": 64,
        "flatten": 0.0,
        "regions": False,
        "working_size": 0,
        "max_iter": 50,
        "seed": 0,
    }
    w.options.editor("restarts").setValue(2)
    w.options.editor("max_iter").setValue(3)
    w.options.editor("working_size").setValue(32)
    session_models(viewer).add("toy-test-net", toy_registered(device="cpu"))  # refreshes the list
    assert w.options.values()["restarts"] == 2  # the user's edits are not reset
    w.run()
    wait_idle(qtbot, w)
    out = viewer.layers["img [s3-net]"]
    seg = w._model_cache[1]
    assert (seg.config["restarts"], seg.config["max_iter"], seg.config["working_size"]) == (2, 3, 32)
    expected = load_model("s3-net", device="cpu", restarts=2, max_iter=3, working_size=32).segment(img)
    np.testing.assert_array_equal(out.data, expected)
    w.select_network("toy-test-net")
    assert w.options.isHidden()


def test_s3_net_recipe_fills_the_form_and_edits_show_custom(viewer_widget, qtbot):
    """Choosing a recipe sets its options; editing one shows 'custom'; the run uses the form."""
    img = volume(z=1, size=24)[0]
    viewer, w, _ = viewer_widget(data=img)
    w.select_network("s3-net")
    assert w.options.recipe.currentText().startswith("Paper") and w.options.recipe_name() == "paper"
    w.options.recipe.activated.emit(1)  # what a user's choice of the second entry sends
    values = w.options.values()
    assert (values["channels"], values["restarts"], values["flatten"], values["seed"]) == (16, 7, 0.25, 0)
    assert values["regions"] is True
    assert w.options.recipe_name() == "consensus" and w.options.recipe.currentIndex() == 1
    w.options.editor("restarts").setValue(2)
    assert w.options.recipe.currentText() == "custom"
    w.options.editor("max_iter").setValue(3)
    w.options.editor("working_size").setValue(32)
    w.run()
    wait_idle(qtbot, w)
    expected = load_model("s3-net", device="cpu", recipe="consensus", restarts=2, max_iter=3, working_size=32)
    np.testing.assert_array_equal(viewer.layers["img [s3-net]"].data, expected.segment(img))
    w.options.recipe.activated.emit(0)
    assert w.options.values()["channels"] == 64 and w.options.values()["restarts"] == 1
    assert w.options.values()["regions"] is False  # back to the paper's clusters


def test_options_form_follows_the_chosen_checkpoint(viewer_widget, toy_registered, tmp_path):
    """A checkpoint decides the network, so the form shows that network's saved settings."""
    path = load_model("s3-net", device="cpu", restarts=4, flatten=0.25).save(tmp_path / "s3.safetensors")
    _, w, _ = viewer_widget()
    w.select_network("toy-test-net")
    assert w.options.isHidden()
    w.checkpoint.setText(str(path))
    assert not w.options.isHidden()
    values = w.options.values()
    assert (values["restarts"], values["flatten"], values["mode"]) == (4, 0.25, "paper")
    assert w.options.recipe_name() == "custom" and w.options.recipe.currentText() == "custom"
    w.options.editor("restarts").setValue(2)
    w.refresh_networks()
    assert w.options.values()["restarts"] == 2  # same checkpoint: the edit stays
    w.checkpoint.setText("")
    assert w.options.isHidden()  # back to the toy, which has no options
