"""Fine-tune dock widget: train a network on painted labels, watch the loss, use the model.

The training itself is the engine's one loop (``Segmenter.finetune``) running in a thread
worker; every step is a cancel point. On finish (or Cancel, keeping the best weights) the
model is registered in this viewer's session store, so the Segment widget lists it at once,
and its checkpoint is on disk.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_medseg.engine.progress import Progress
from napari_medseg.engine.registry import model_card
from napari_medseg.engine.train.options import TrainProgress
from napari_medseg.widgets._layers import (
    LayerCombo,
    LayerError,
    add_labels_like,
    check_image_layer,
    image_array,
    label_class_names,
    output_name,
    spatial_shape,
)
from napari_medseg.widgets._pairs import checkable, extra_pairs, pair_text, ticked
from napari_medseg.widgets._plot import LossPlot
from napari_medseg.widgets._train_form import TrainOptionsForm
from napari_medseg.widgets._worker import EngineJob
from napari_medseg.widgets.segment import available_networks
from napari_medseg.widgets.session import SessionModel, default_checkpoint_dir, session_models

log = logging.getLogger(__name__)


class FinetuneWidget(QWidget):
    """Dock widget: network, image + labels layers, options → Start / Cancel → session model.

    Args:
        napari_viewer: The viewer (napari passes it).
        parent: Qt parent.

    """

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_models(napari_viewer)
        self.job: EngineJob | None = None
        self.result: SessionModel | None = None
        self._last_dice: float | None = None
        self.uses_unlabeled = False
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_unlabeled)
        self.viewer.layers.events.removed.connect(self._refresh_unlabeled)
        self._network_changed()

    # ----------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        self.network = QComboBox()
        self.network.addItems([n for n in available_networks() if model_card(n).trainable])
        self.image = LayerCombo(self.viewer, (Image,))
        self.labels = LayerCombo(self.viewer, (Labels,))
        self.unlabeled = QListWidget()
        self.unlabeled.setMaximumHeight(80)
        self.unlabeled.setToolTip("Volumes without labels that the network learns from as well")
        self.unlabeled_label = QLabel("Unlabeled")
        self.more = QListWidget()
        self.more.setMaximumHeight(80)
        self.more.setToolTip(
            "Other painted Labels layers (with their images) to train on too, e.g. a 2nd atlas"
        )
        self.train_form = TrainOptionsForm()
        # The fields under their own names too (scripts and tests set them directly).
        f = self.train_form
        self.steps, self.lr, self.batch_size, self.crop_size = f.steps, f.lr, f.batch_size, f.crop_size
        self.augment, self.orientation, self.val_fraction = f.augment, f.orientation, f.val_fraction
        self.seed, self.device = f.seed, f.device
        self.checkpoint = QLineEdit()
        self.checkpoint.setPlaceholderText("default: user data folder")
        self.save_as = QPushButton("Save as…")
        ck_row = QHBoxLayout()
        ck_row.addWidget(self.checkpoint)
        ck_row.addWidget(self.save_as)

        form = QFormLayout()
        for text, w in (
            ("Network", self.network),
            ("Image", self.image),
            ("Labels", self.labels),
            ("More labeled", self.more),
            (self.unlabeled_label, self.unlabeled),
            *self.train_form.rows(),
        ):
            form.addRow(text, w)
        form.addRow("Checkpoint", ck_row)

        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setFormat("idle")
        self.plot = LossPlot()
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.apply_button = QPushButton("Apply to all slices")
        self.apply_button.setEnabled(False)
        self.apply_button.setToolTip("Segment the chosen Image layer with the model just trained")

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        for w in (self.progress, self.plot, self.status, self.apply_button):
            layout.addWidget(w)
        layout.addStretch(1)

        self.network.currentTextChanged.connect(self._network_changed)
        self.labels.currentIndexChanged.connect(self._refresh_unlabeled)
        self.save_as.clicked.connect(self._choose_path)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.apply_button.clicked.connect(self.apply_to_all)

    def _network_changed(self, *_: Any) -> None:
        name = self.network.currentText()
        self.start_button.setEnabled(bool(name))
        if not name:
            self.status.setText("no trainable network is installed")
            return
        self.train_form.load(name)
        card = model_card(name)
        self.uses_unlabeled = card.spatial_dims == 3 or "unlabeled" in card.tags
        self.unlabeled.setVisible(self.uses_unlabeled)
        self.unlabeled_label.setVisible(self.uses_unlabeled)
        self.network.setToolTip(card.summary)
        self._refresh_unlabeled()

    def _refresh_unlabeled(self, *_: Any) -> None:
        """Rebuild the two checklists (unlabeled images, extra pairs), keeping the ticks."""
        checked = set(self.unlabeled_names())
        self.unlabeled.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                self.unlabeled.addItem(checkable(layer.name, layer.name, layer.name in checked))
        ticked = set(self.extra_pair_names())
        self.more.clear()
        main = self.labels.layer()
        for image, labels in extra_pairs(self.viewer, main if isinstance(main, Labels) else None):
            key = (image.name, labels.name)
            self.more.addItem(checkable(pair_text(image, labels), key, key in ticked))

    def unlabeled_names(self) -> list[str]:
        """Names of the Image layers ticked as unlabeled data."""
        return [str(k) for k in ticked(self.unlabeled)]

    def extra_pair_names(self) -> list[tuple[str, str]]:
        """(image, labels) layer names of the ticked extra training pairs."""
        return [tuple(k) for k in ticked(self.more)]  # type: ignore[misc]

    def _choose_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Save the fine-tuned model",
            str(default_checkpoint_dir()),
            "Checkpoints (*.safetensors)",
        )
        if path:
            self.checkpoint.setText(path if path.endswith(".safetensors") else path + ".safetensors")

    def options(self) -> dict[str, Any]:
        """Return the training options chosen in the form (fields of :class:`TrainOptions`)."""
        return self.train_form.values()

    # ----------------------------------------------------------------- checks
    def _inputs(
        self,
    ) -> tuple[Image, list[Image], list[np.ndarray], int | None, Labels, list[np.ndarray], list]:
        """Validated layers and copies of their data; raises LayerError with the reason.

        Returns (main image, labeled images, arrays, channel axis, labels, paints, unlabeled).
        """
        name = self.network.currentText()
        if not name:
            raise LayerError("no trainable network is installed")
        card = model_card(name)
        image = check_image_layer(self.image.layer(), "train on")
        labels = self.labels.layer()
        if not isinstance(labels, Labels):
            raise LayerError("choose the Labels layer with your painted labels (add one with the + button)")
        shape = spatial_shape(image)
        if tuple(labels.data.shape) != shape:
            raise LayerError(
                f"'{labels.name}' has shape {tuple(labels.data.shape)} but '{image.name}' has "
                f"spatial shape {shape}: paint the labels on a Labels layer made for this image"
            )
        if card.spatial_dims == 3 and len(shape) != 3:
            raise LayerError(f"{name} is a 3-D network: choose a volume (Z, Y, X), not a 2-D image")
        # A copy: the user may keep painting while the network trains.
        painted = np.array(labels.data, copy=True)
        if not painted.any():
            raise LayerError(
                f"nothing is painted in '{labels.name}': paint the structure with label 1 or more "
                "on at least one slice (0 is background)"
            )
        data, channel_axis = image_array(image)
        layers, arrays, paints = [image], [data], [painted]
        for image_name, labels_name in self.extra_pair_names():
            other, other_labels = self.viewer.layers[image_name], self.viewer.layers[labels_name]
            other_data, axis = image_array(check_image_layer(other, "train on"))
            if axis != channel_axis or (card.spatial_dims == 3 and other_data.ndim != 3):
                raise LayerError(f"'{other.name}' does not match '{image.name}' (RGB / 2-D / 3-D): untick it")
            other_paint = np.array(other_labels.data, copy=True)
            if not other_paint.any():
                raise LayerError(f"nothing is painted in '{other_labels.name}': paint it or untick it")
            layers.append(other)
            arrays.append(other_data)
            paints.append(other_paint)
        names = self.unlabeled_names() if self.uses_unlabeled else []
        used = {layer.name for layer in layers}
        unlabeled = [self.viewer.layers[n] for n in names if n not in used]
        return image, layers, arrays, channel_axis, labels, paints, unlabeled

    def _checkpoint_path(self, network: str, image_name: str) -> Path:
        text = self.checkpoint.text().strip()
        if text:
            path = Path(text).expanduser()
        else:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", image_name).strip("_") or "image"
            path = default_checkpoint_dir() / f"{network}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ----------------------------------------------------------------- training
    def start(self) -> EngineJob | None:
        """Check the inputs and start fine-tuning; returns the job (``None`` if refused)."""
        if self.job is not None and self.job.running:
            self._say("training is already running", warn=True)
            return None
        try:
            image, layers, data, channel_axis, labels, painted, unlabeled_layers = self._inputs()
            network = self.network.currentText()
            path = self._checkpoint_path(network, image.name)
        except (LayerError, OSError) as err:
            self._say(str(err), warn=True)
            return None
        opts = self.options()
        device = opts["device"]
        extra: dict[str, Any] = {"channel_axis": channel_axis}
        unlabeled = [image_array(layer)[0] for layer in unlabeled_layers]
        if model_card(network).spatial_dims == 3:  # 3-D networks resample by the voxel spacing
            extra["spacing"] = [[float(v) for v in layer.scale[-3:]] for layer in layers]
            extra["unlabeled_spacing"] = [[float(v) for v in layer.scale[-3:]] for layer in unlabeled_layers]
        names = label_class_names(labels)
        if names:
            extra["class_names"] = names
        state: dict[str, Any] = {"path": path, "image": image.name, "network": network}

        def job() -> Generator[Any, None, Any]:
            from napari_medseg.engine.api import load_model

            yield Progress(0, 0, f"building {network}…")
            seg = load_model(network, device=device)
            state["seg"] = seg
            yield from seg.finetune(
                data if len(data) > 1 else data[0],
                painted if len(painted) > 1 else painted[0],
                unlabeled=unlabeled or None,
                checkpoint=str(path),
                extra=extra,
                **opts,
            )
            return seg

        self.plot.reset(opts["steps"])
        self.progress.setRange(0, opts["steps"])
        self.progress.setValue(0)
        self.progress.setFormat("starting…")
        self._last_dice = None
        self._say(f"fine-tuning {network} on '{image.name}' / '{labels.name}'…")
        self.job = EngineJob(
            job,
            self._on_progress,
            None,
            lambda m, _e: self._say(m),
            lambda o: self._on_end(o, state),
            "Fine-tune",
        )
        self.job.start()
        self._busy(True)
        return self.job

    def cancel(self) -> None:
        """Stop after the current step; the best weights so far are kept and saved."""
        if self.job is not None and self.job.running:
            self.job.cancel()
            self._say("stopping after the current step…")

    def _on_progress(self, p: Any) -> None:
        if isinstance(p, Progress):
            if p.total:
                self.progress.setRange(0, p.total)
                self.progress.setValue(p.done)
            self.progress.setFormat(p.message or "%p%")
            return
        if not isinstance(p, TrainProgress):
            return
        dice = p.metrics.get("val_dice")
        new_dice = dice if dice is not None and (dice != self._last_dice or p.done) else None
        self._last_dice = dice
        self.plot.total = p.total
        self.plot.add(p.step, p.loss, new_dice)
        self.progress.setRange(0, p.total)
        self.progress.setValue(p.step)
        eta = time.strftime("%M:%S", time.gmtime(max(0.0, p.eta))) if p.eta < 360000 else "?"
        self.progress.setFormat(f"step %v / %m — ETA {eta}")
        text = f"step {p.step}/{p.total} · loss {p.loss:.4f}"
        box = p.metrics.get("val_box_dice")
        if dice is not None and box is not None:  # HF-SAM: both modes are validated
            text += f" · val Dice {dice:.3f}, box {box:.3f} (best mean {p.best:.3f})"
        elif dice is not None:
            text += f" · val Dice {dice:.3f} (best {p.best:.3f})"
        self.status.setText(text + (f"\n{p.message}" if p.message else ""))

    def _on_end(self, outcome: str, state: dict[str, Any]) -> None:
        self._busy(False)
        seg, path = state.get("seg"), state["path"]
        if outcome == "failed" or seg is None or not seg.trained:
            self.progress.setFormat("stopped" if outcome != "done" else "done")
            if outcome == "cancelled":
                self._say("cancelled before the first validation: no model was kept")
            return
        step = int(seg.provenance.get("step", 0))
        best = seg.provenance.get("best_val_dice")
        info = {"step": step, "best_val_dice": best, "cancelled": outcome == "cancelled"}
        saved = path if path.is_file() else None
        self.result = self.session.add(state["network"], seg, state["image"], saved, info)
        self.apply_button.setEnabled(True)
        self.progress.setFormat("cancelled — best model kept" if outcome == "cancelled" else "done")
        where = (f"saved to {saved}" if saved else "not saved") + "." + seg.training_note()
        message = f"'{self.result.name}' (best val Dice {best}) is ready in the Segment widget; {where}"
        self._say(message)
        show_info(f"Fine-tune: {message}")

    def apply_to_all(self) -> EngineJob | None:
        """Segment the chosen Image layer with the trained model into a new Labels layer."""
        if self.result is None or (self.job is not None and self.job.running):
            self._say(
                "train a model first" if self.result is None else "wait for the current job",
                warn=True,
            )
            return None
        try:
            image = check_image_layer(self.image.layer(), "segment")
            data, channel_axis = image_array(image)
        except LayerError as err:
            self._say(str(err), warn=True)
            return None
        entry = self.result
        name = output_name(image.name, entry.name)

        def job() -> Generator[Progress, None, np.ndarray]:
            if entry.segmenter.card.spatial_dims == 3:
                entry.segmenter.config["spacing"] = [float(v) for v in image.scale[-3:]]
            return (yield from entry.segmenter.iter_segment(data, channel_axis))

        def result(labels: np.ndarray) -> None:
            out = add_labels_like(self.viewer, labels, image, name, {"napari_medseg": {"model": entry.name}})
            self._say(f"added '{out.name}'")

        self.progress.setFormat("segmenting %v / %m")
        self.job = EngineJob(
            job,
            self._on_progress,
            result,
            lambda m, _e: self._say(m),
            lambda _o: self._busy(False),
            "Apply",
        )
        self.job.start()
        self._busy(True)
        return self.job

    def _busy(self, busy: bool) -> None:
        self.start_button.setEnabled(not busy and bool(self.network.currentText()))
        self.cancel_button.setEnabled(busy)
        self.apply_button.setEnabled(not busy and self.result is not None)

    def _say(self, text: str, warn: bool = False) -> None:
        self.status.setText(text)
        if warn:
            show_warning(f"Fine-tune: {text}")
