"""The Fine-tune dock widget in a real napari viewer (Xvfb via pytest-xvfb), toy network."""

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
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.gui

napari = pytest.importorskip("napari")

from napari.layers import Labels  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_medseg.engine import registry  # noqa: E402
from napari_medseg.engine.api import load_model  # noqa: E402
from napari_medseg.engine.checkpoint import read_metadata  # noqa: E402
from napari_medseg.engine.train.options import network_train_defaults  # noqa: E402
from napari_medseg.widgets.finetune import FinetuneWidget  # noqa: E402
from napari_medseg.widgets.segment import SegmentWidget  # noqa: E402
from napari_medseg.widgets.session import session_models  # noqa: E402


def painted_volume(z: int = 3, size: int = 32):
    """(Z, Y, X) noisy discs and labels painted on every slice but the middle one."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((z, size, size), np.float32)
    labels = np.zeros((z, size, size), np.uint8)
    for k in range(z):
        disc = (yy - 12 - 2 * k) ** 2 + (xx - 16 + k) ** 2 < 49
        image[k] = disc * 100 + rng.normal(20, 8, disc.shape)
        if k != z // 2:
            labels[k] = disc
    return image, labels


@pytest.fixture
def setup(make_napari_viewer, qtbot, toy_registered, tmp_path):
    def make(z=3, scale=(2.0, 0.5, 0.5), steps=6):
        viewer = make_napari_viewer()
        image, labels = painted_volume(z)
        img = viewer.add_image(image, name="ct", scale=scale, translate=(5.0, 0.0, 1.0))
        lab = viewer.add_labels(labels, name="painted", scale=scale, translate=(5.0, 0.0, 1.0))
        w = FinetuneWidget(viewer)
        qtbot.addWidget(w)
        w.network.setCurrentText("toy-test-net")
        w.image.set_layer("ct")
        w.labels.set_layer("painted")
        w.steps.setValue(steps)
        w.batch_size.setValue(2)
        w.checkpoint.setText(str(tmp_path / "ft.safetensors"))
        return viewer, w, img, lab

    return make


def wait_idle(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: widget.job is not None and not widget.job.running, timeout=timeout)


def test_defaults_come_from_the_network(setup):
    _, w, _, _ = setup()
    w.network.setCurrentText("toy-test-net")
    w._network_changed()
    opts = network_train_defaults("toy-test-net")
    assert (opts.lr, opts.batch_size, opts.augment) == (1e-2, 4, "light")
    assert w.lr.value() == pytest.approx(1e-2) and w.augment.currentText() == "light"
    assert w.orientation.currentText() == "any" and w.orientation.isEnabled()
    w.orientation.setCurrentText("upright")
    assert w.options()["orientation"] == "upright"
    assert not w.unlabeled.isVisibleTo(w)  # a 2-D network: no unlabeled volumes


def test_finetune_end_to_end_model_appears_in_segment_widget(setup, qtbot, tmp_path):
    viewer, w, img, lab = setup(steps=6)
    lab.features = pd.DataFrame({"index": [0, 1], "name": ["background", "liver"]})
    seg_widget = SegmentWidget(viewer)
    qtbot.addWidget(seg_widget)
    painted_before = lab.data.copy()
    job = w.start()
    assert job is not None and w.cancel_button.isEnabled() and not w.start_button.isEnabled()
    wait_idle(qtbot, w)
    assert job._outcome == "done", w.status.text()
    # the model is in this viewer's session and listed by the Segment widget at once
    store = session_models(viewer)
    assert store.names() == ["toy-test-net · ct #1"]
    seg_widget.select_network("toy-test-net · ct #1")
    assert seg_widget.run_button.isEnabled()
    # checkpoint on disk, with the class name from the layer's features
    path = tmp_path / "ft.safetensors"
    assert path.is_file() and store.get("toy-test-net · ct #1").checkpoint == path
    assert read_metadata(path)["model"] == "toy-test-net"
    restored = load_model(path, device="cpu")
    assert restored.class_names == ["background", "liver"]
    # progress and live plot
    assert w.progress.value() == 6 and len(w.plot.loss) == 6 and len(w.plot.dice) >= 1
    np.testing.assert_array_equal(lab.data, painted_before)
    # Apply to all slices → a new Labels layer on the image's geometry
    w.apply_to_all()
    wait_idle(qtbot, w)
    out = viewer.layers["ct [toy-test-net · ct #1]"]
    assert isinstance(out, Labels) and out.data.shape == img.data.shape
    np.testing.assert_allclose(out.scale, img.scale)
    np.testing.assert_allclose(out.translate, img.translate)
    np.testing.assert_array_equal(out.data, restored.segment(img.data))


def test_cancel_stops_within_a_step_and_keeps_best_checkpoint(
    setup, qtbot, tmp_path, toy_registered, monkeypatch
):
    fast = toy_registered.training_loss

    def slow_loss(self, module, batch):  # keep the worker from finishing before Cancel lands
        time.sleep(0.05)
        return fast(self, module, batch)

    monkeypatch.setattr(toy_registered, "training_loss", slow_loss)
    viewer, w, _, _ = setup(steps=40)  # validation every 4 steps
    job = w.start()
    steps_seen = []

    def on_progress(p):
        if hasattr(p, "step"):
            steps_seen.append(p.step)
            if p.step == 5:
                w.cancel()

    job.worker.yielded.connect(on_progress)
    wait_idle(qtbot, w)
    assert job._outcome == "cancelled"
    assert max(steps_seen) <= 6  # at most the step running when Cancel was pressed
    path = tmp_path / "ft.safetensors"
    assert path.is_file()
    meta = read_metadata(path)
    assert meta["model"] == "toy-test-net"
    load_model(path, device="cpu")  # loadable
    entry = session_models(viewer).get("toy-test-net · ct #1")
    assert entry.info["cancelled"] and entry.info["step"] == 4
    assert "best model kept" in w.progress.format()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("nothing painted", "nothing is painted"),
        ("shape mismatch", "has shape"),
        ("labels as image", "is a Labels layer"),
        ("no labels layer", "choose the Labels layer"),
    ],
)
def test_bad_inputs_give_messages_before_training(setup, case, expected):
    viewer, w, _, lab = setup()
    if case == "nothing painted":
        lab.data = np.zeros_like(lab.data)
    elif case == "shape mismatch":
        viewer.add_labels(np.ones((3, 16, 16), np.uint8), name="small")
        w.labels.set_layer("small")
    elif case == "labels as image":
        viewer.add_image(np.ones((3, 32, 32)), name="x")
        w.image._types = (
            napari.layers.Image,
            Labels,
        )  # let the combo offer it, as a user could in a list
        w.image.set_layer("painted")
    elif case == "no labels layer":
        viewer.layers.remove("painted")
    assert w.start() is None
    assert expected in w.status.text()
    assert w.job is None and len(session_models(viewer)) == 0


def test_label_values_beyond_network_limit_reported(setup, qtbot):
    viewer, w, _, lab = setup()
    data = lab.data.copy()
    data[0, 0, 0] = 40  # the toy network supports 31 classes
    lab.data = data
    w.start()
    wait_idle(qtbot, w)
    assert w.job._outcome == "failed"
    assert "at most 31 classes" in w.status.text()
    assert len(session_models(viewer)) == 0 and "ft" not in " ".join(layer.name for layer in viewer.layers)


@pytest.fixture
def toy_3d(toy_registered):
    card = dataclasses.replace(toy_registered.card, name="toy-3d", spatial_dims=3)
    cls = type("Toy3D", (toy_registered,), {"card": card})
    registry.register(card, cls)
    yield cls
    registry._CARDS.pop(card.name, None)
    registry._CLASSES.pop(card.name, None)


def test_3d_network_given_2d_image_and_unlabeled_list(make_napari_viewer, qtbot, toy_3d):
    viewer = make_napari_viewer()
    image, labels = painted_volume(1)
    viewer.add_image(image[0], name="slice")
    viewer.add_labels(labels[0], name="painted")
    w = FinetuneWidget(viewer)
    qtbot.addWidget(w)
    w.network.setCurrentText("toy-3d")
    assert w.unlabeled.isVisibleTo(w) and w.unlabeled.count() == 1
    assert w.start() is None
    assert "3-D network" in w.status.text()


@pytest.mark.slow  # STS-Net is a ResNeXt-50 at 256²: tens of seconds per step on 2 busy CPUs
def test_sts_net_short_finetune_end_to_end(make_napari_viewer, qtbot, tmp_path):
    """A real network through the widget: 2 steps of STS-Net, then it segments via the session."""
    viewer = make_napari_viewer()
    image, labels = painted_volume(z=2, size=48)
    viewer.add_image(image, name="ct", scale=(3.0, 1.0, 1.0))
    viewer.add_labels(labels, name="painted", scale=(3.0, 1.0, 1.0))
    w = FinetuneWidget(viewer)
    qtbot.addWidget(w)
    w.network.setCurrentText("sts-net")
    assert w.lr.value() == pytest.approx(1e-4)  # STS-Net's own default
    w.steps.setValue(2)
    w.batch_size.setValue(1)
    w.device.setCurrentText("cpu")
    w.checkpoint.setText(str(tmp_path / "sts.safetensors"))
    w.start()
    wait_idle(qtbot, w, timeout=240000)
    assert w.job._outcome == "done", w.status.text()
    seg_widget = SegmentWidget(viewer)
    qtbot.addWidget(seg_widget)
    seg_widget.select_network("sts-net · ct #1")
    assert seg_widget.blocking_reason() == ""
    restored = load_model(tmp_path / "sts.safetensors", device="cpu")
    assert restored.card.name == "sts-net" and restored.trained


def test_more_labeled_pairs_reach_the_engine_with_their_spacing(
    make_napari_viewer, qtbot, toy_3d, monkeypatch
):
    """EFS-style use: two labeled atlases and an unlabeled volume, each with its own spacing."""
    viewer = make_napari_viewer()
    a_img, a_lab = painted_volume(3)
    b_img, b_lab = painted_volume(4)
    viewer.add_image(a_img, name="atlas A", scale=(2.0, 0.5, 0.5))
    viewer.add_labels(a_lab, name="atlas A labels", scale=(2.0, 0.5, 0.5))
    viewer.add_image(b_img, name="atlas B", scale=(3.0, 0.7, 0.7))
    viewer.add_labels(b_lab, name="atlas B labels", scale=(3.0, 0.7, 0.7))
    viewer.add_image(b_img[:, :, ::-1].copy(), name="unlabeled C", scale=(1.5, 0.6, 0.6))
    seen = {}

    def record(self, images, labels, unlabeled=None, **options):
        seen.update(images=images, labels=labels, unlabeled=unlabeled, extra=options["extra"])
        yield from ()

    monkeypatch.setattr(toy_3d, "finetune", record)
    w = FinetuneWidget(viewer)
    qtbot.addWidget(w)
    w.network.setCurrentText("toy-3d")
    w.image.set_layer("atlas A")
    w.labels.set_layer("atlas A labels")
    # The other Labels layer is offered with the image of its shape; the main one is not.
    entries = [w.more.item(i).text() for i in range(w.more.count())]
    assert entries == ["atlas B labels  ←  atlas B"]
    w.more.item(0).setCheckState(Qt.CheckState.Checked)
    for i in range(w.unlabeled.count()):
        if w.unlabeled.item(i).text() == "unlabeled C":
            w.unlabeled.item(i).setCheckState(Qt.CheckState.Checked)
    assert w.extra_pair_names() == [("atlas B", "atlas B labels")]
    w.start()
    wait_idle(qtbot, w)
    assert len(seen["images"]) == 2 and seen["images"][1].shape == b_img.shape
    np.testing.assert_array_equal(seen["labels"][1], b_lab)
    assert seen["extra"]["spacing"] == [[2.0, 0.5, 0.5], [3.0, 0.7, 0.7]]
    assert seen["extra"]["unlabeled_spacing"] == [[1.5, 0.6, 0.6]] and len(seen["unlabeled"]) == 1
    # A ticked pair with nothing painted is refused with its name.
    viewer.layers["atlas B labels"].data = np.zeros_like(b_lab)
    assert w.start() is None and "nothing is painted in 'atlas B labels'" in w.status.text()
