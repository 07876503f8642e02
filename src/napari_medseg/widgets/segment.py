"""Segment dock widget: run a network on the active Image layer into a new Labels layer.

The widget only gathers choices and shows progress; the work is the engine's
``Segmenter.iter_segment`` generator, run in a thread worker (``_worker.EngineJob``). Layers
are added on the main thread, and only when a run succeeds, so a failed or cancelled run
changes no layer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_medseg.engine.checkpoint import CheckpointError, read_model_config
from napari_medseg.engine.device import available_devices, resolve_device
from napari_medseg.engine.preprocess import PRESET_NAMES, get_preset
from napari_medseg.engine.progress import Progress
from napari_medseg.engine.registry import ModelCard, list_models, model_card, segmenter_class
from napari_medseg.engine.run_options import apply_run_options
from napari_medseg.widgets._layers import (
    LayerError,
    add_labels_like,
    check_image_layer,
    image_array,
    output_name,
)
from napari_medseg.widgets._options import OptionsForm
from napari_medseg.widgets._worker import EngineJob
from napari_medseg.widgets.segment_clusters import ClustersBox
from napari_medseg.widgets.session import session_models

log = logging.getLogger(__name__)

CUSTOM_CT = "ct-custom"
_REGISTRY, _SESSION = "registry", "session"


def available_networks() -> list[str]:
    """Return the registered names; a network module that fails to import is reported."""
    try:
        return list_models()
    except Exception as err:  # one broken network must not take the whole plugin down
        log.exception("loading the network registry failed")
        show_warning(f"MedSeg: a network could not be loaded: {err}")
        return list_models()  # the registry now lists the networks that did load


class SegmentWidget(QWidget):
    """Dock widget: network, its run options, weights, device, intensity preset → Run / Cancel.

    Args:
        napari_viewer: The viewer (napari passes it).
        parent: Qt parent.

    """

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_models(napari_viewer)
        self.job: EngineJob | None = None
        self._model_cache: tuple[tuple[Any, ...], Any] | None = None
        self._build_ui()
        self.refresh_networks()
        self.session.subscribe(self.refresh_networks)
        self.viewer.layers.selection.events.active.connect(self._show_target)
        self._show_target()

    # ----------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        self.network = QComboBox()
        self.network.setToolTip("Registered networks, then models fine-tuned in this session")
        self.card_info = QLabel()
        self.card_info.setWordWrap(True)
        self.checkpoint = QLineEdit()
        self.checkpoint.setPlaceholderText("default weights")
        self.checkpoint.setToolTip("A .safetensors checkpoint; empty = the network's default weights")
        self.browse = QPushButton("Checkpoint…")
        self.use_default = QPushButton("Default")
        weights_row = QHBoxLayout()
        for w in (self.checkpoint, self.browse, self.use_default):
            weights_row.addWidget(w)
        self.device = QComboBox()
        self.device.addItems(available_devices())
        self.preset = QComboBox()
        self.preset.addItems([*PRESET_NAMES, CUSTOM_CT])
        self.preset.setToolTip("Intensity mapping; 'auto' uses the checkpoint's or detects it")
        self.ct_level = QDoubleSpinBox(minimum=-2000, maximum=4000, value=40, suffix=" HU")
        self.ct_width = QDoubleSpinBox(minimum=1, maximum=6000, value=400, suffix=" HU")
        self.ct_row = QWidget()
        ct_layout = QHBoxLayout(self.ct_row)
        ct_layout.setContentsMargins(0, 0, 0, 0)
        for text, w in (("level", self.ct_level), ("width", self.ct_width)):
            ct_layout.addWidget(QLabel(text))
            ct_layout.addWidget(w)

        self.options = OptionsForm()
        self._options_for: Any = None  # which model's options the form shows

        form = QFormLayout()
        form.addRow("Network", self.network)
        form.addRow("", self.card_info)
        form.addRow("", self.options)
        form.addRow("Weights", weights_row)
        form.addRow("Device", self.device)
        form.addRow("Intensity", self.preset)
        form.addRow("", self.ct_row)

        self.target = QLabel()
        self.reason = QLabel()
        self.reason.setWordWrap(True)
        self.reason.setStyleSheet("color: #e0a030")
        self.run_button = QPushButton("Run on active image")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.status = QLabel()
        self.status.setWordWrap(True)

        self.clusters_box = ClustersBox(self.viewer, self._say)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for w in (self.target, self.reason):
            layout.addWidget(w)
        layout.addLayout(buttons)
        for w in (self.progress, self.status, self.clusters_box):
            layout.addWidget(w)
        layout.addStretch(1)

        self.network.currentIndexChanged.connect(self._update_state)
        self.checkpoint.textChanged.connect(self._update_state)
        self.preset.currentTextChanged.connect(self._update_state)
        self.browse.clicked.connect(self._browse)
        self.use_default.clicked.connect(lambda: self.checkpoint.setText(""))
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)

    def refresh_networks(self) -> None:
        """List registered networks, then this session's models; keep the current choice."""
        current = self.network.currentData()
        self.network.blockSignals(True)
        self.network.clear()
        for name in available_networks():
            self.network.addItem(name, f"{_REGISTRY}:{name}")
            self.network.setItemData(self.network.count() - 1, model_card(name).summary, 3)
        for name in self.session.names():
            self.network.addItem(f"{name} (this session)", f"{_SESSION}:{name}")
        index = self.network.findData(current) if current is not None else -1
        self.network.setCurrentIndex(max(index, 0))
        self.network.blockSignals(False)
        self._update_state()

    def select_network(self, name: str) -> None:
        """Choose a registered network or a session model by name."""
        for kind in (_REGISTRY, _SESSION):
            index = self.network.findData(f"{kind}:{name}")
            if index >= 0:
                self.network.setCurrentIndex(index)
                return
        raise KeyError(f"{name!r} is not in the network list")

    def _selection(self) -> tuple[str, str] | None:
        data = self.network.currentData()
        if not data:
            return None
        kind, key = str(data).split(":", 1)  # Qt item data round-trips plain strings reliably
        return kind, key

    def _card(self) -> ModelCard | None:
        sel = self._selection()
        if sel is None:
            return None
        kind, key = sel
        return model_card(self.session.get(key).network if kind == _SESSION else key)

    def _preset_name(self) -> str:
        name = self.preset.currentText()
        if name == CUSTOM_CT:
            return f"ct:{self.ct_level.value():g},{self.ct_width.value():g}"
        return name

    def blocking_reason(self) -> str:
        """Why Run is disabled now (``""`` when it is enabled)."""
        sel, card = self._selection(), self._card()
        if sel is None or card is None:
            return "no network is installed"
        path = self.checkpoint.text().strip()
        if sel[0] == _REGISTRY and path and not Path(path).is_file():
            return f"checkpoint file not found: {path}"
        if sel[0] == _REGISTRY and card.needs_labels and not path:
            return (
                f"{card.name} has no trained weights: fine-tune it first (Fine-tune widget), "
                "or choose a trained checkpoint"
            )
        return ""

    def _update_state(self, *_: Any) -> None:
        card, sel = self._card(), self._selection()
        self.ct_row.setVisible(self.preset.currentText() == CUSTOM_CT)
        from_session = sel is not None and sel[0] == _SESSION
        for w in (self.checkpoint, self.browse, self.use_default):
            w.setEnabled(not from_session)
        self.card_info.setText(f"{card.title}" if card else "")
        self.card_info.setToolTip(card.summary if card else "")
        self.clusters_box.setVisible(card is not None and card.output == "clusters")
        self._show_options(sel, card)
        busy = self.job is not None and self.job.running
        reason = self.blocking_reason()
        self.reason.setText(reason)
        self.reason.setVisible(bool(reason))
        self.run_button.setEnabled(not busy and not reason)
        self.cancel_button.setEnabled(busy)

    def _show_options(self, sel: tuple[str, str] | None, card: ModelCard | None) -> None:
        """Rebuild the options form when the model to run changes (edits survive refreshes).

        The form starts from the settings of the model that will run: a session model's
        config, a chosen checkpoint's saved config (its own network's options, since a
        checkpoint decides the network), or the network's defaults.
        """
        path = self.checkpoint.text().strip()
        stamp = (
            Path(path).stat().st_mtime_ns
            if sel and sel[0] == _REGISTRY and path and Path(path).is_file()
            else 0
        )
        key = (sel, path if stamp else "", stamp)  # runs on every keystroke: read files only on change
        if key == self._options_for:
            return
        self._options_for = key
        network, config = (card.name if card else None), None
        if sel is not None and sel[0] == _SESSION:
            config = self.session.get(sel[1]).segmenter.config
        elif stamp:
            try:
                network, config = read_model_config(path)
            except CheckpointError:
                pass  # Run reports the bad file; the form keeps the network's defaults
        try:
            cls = segmenter_class(network) if network else None
        except KeyError:  # a checkpoint of a network this version does not know
            cls = None
        self.options.set_options(cls.run_options() if cls else (), config, cls.RUN_RECIPES if cls else ())

    def _show_target(self, *_: Any) -> None:
        layer = self.viewer.layers.selection.active
        self.target.setText(f"Active layer: {layer.name}" if layer is not None else "Active layer: none")

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a checkpoint", "", "Checkpoints (*.safetensors);;All files (*)"
        )
        if path:
            self.checkpoint.setText(path)

    # ----------------------------------------------------------------- running
    def _model_maker(self) -> tuple[Callable[[], Any], str]:
        """Capture the UI choices now; return (build-in-worker function, result label)."""
        kind, key = self._selection()  # type: ignore[misc]
        path = self.checkpoint.text().strip() if kind == _REGISTRY else ""
        device, preset = self.device.currentText(), self._preset_name()
        stamp = Path(path).stat().st_mtime_ns if path and Path(path).is_file() else 0
        cache_key = (kind, key, path, stamp, device, preset)  # a rewritten file is reloaded
        entry = self.session.get(key) if kind == _SESSION else None
        label = entry.name if entry is not None else key

        def make() -> Any:
            if self._model_cache is not None and self._model_cache[0] == cache_key:
                return self._model_cache[1]
            if entry is not None:
                seg = copy.copy(entry.segmenter)  # own preset/device, shared weights
                if device != "auto" and resolve_device(device) != seg.device:
                    seg = entry.segmenter.clone()
                    seg.device = resolve_device(device)
                    seg.module.to(seg.device)
            else:
                from napari_medseg.engine.api import load_model

                seg = load_model(path or key, device=device)
            if preset != "auto":
                seg.preset = get_preset(preset)
            self._model_cache = (cache_key, seg)
            return seg

        return make, label

    def run(self) -> EngineJob | None:
        """Segment the active Image layer; returns the job (``None`` if it could not start)."""
        reason = self.blocking_reason()
        if reason or (self.job is not None and self.job.running):
            self._say(reason or "a run is already in progress", warn=True)
            return None
        try:
            layer = check_image_layer(self.viewer.layers.selection.active)
            data, channel_axis = image_array(layer)
        except LayerError as err:
            self._say(str(err), warn=True)
            return None
        make, label = self._model_maker()
        name = output_name(layer.name, label)
        options = self.options.values()

        def job() -> Generator[Progress, None, np.ndarray]:
            yield Progress(0, 0, "loading the model")
            seg = make()
            # Always a new dict: a session model's copy must not change the session model.
            config = apply_run_options(seg.run_options(), seg.config, options)
            if seg.card.spatial_dims == 3:
                config["spacing"] = [float(v) for v in layer.scale[-3:]]  # voxel size (z, y, x)
            seg.config = config
            labels = yield from seg.iter_segment(data, channel_axis)
            return labels

        def result(labels: np.ndarray) -> None:
            out = add_labels_like(self.viewer, labels, layer, name, {"napari_medseg": {"model": label}})
            self._say(f"added '{out.name}' ({int(labels.max())} labels)")
            if self.clusters_box.isVisible():
                self.clusters_box.labels.set_layer(out.name)

        self.progress.setRange(0, 0)
        self._say(f"segmenting '{layer.name}' with {label}…")
        self.job = EngineJob(
            job, self._on_progress, result, lambda msg, _e: self._say(msg), self._on_end, "Segment"
        )
        self.job.start()
        self._update_state()
        return self.job

    def cancel(self) -> None:
        """Stop the run at the next slice; no layer is added."""
        if self.job is not None and self.job.running:
            self.job.cancel()
            self._say("cancelling after the current slice…")

    def _on_progress(self, p: Progress) -> None:
        if p.total > 0:
            self.progress.setRange(0, p.total)
            self.progress.setValue(p.done)
        if p.message:
            self.status.setText(p.message)

    def _on_end(self, outcome: str) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if outcome == "done" else 0)
        if outcome == "cancelled":
            self._say("cancelled; no layer was added")
        self._update_state()

    def _say(self, text: str, warn: bool = False) -> None:
        self.status.setText(text)
        if warn:
            show_warning(f"Segment: {text}")
