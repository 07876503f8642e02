"""The Fine-tune widget's training options: one field per :class:`TrainOptions` field shown.

Kept apart from the widget so the widget deals with layers, jobs and results, and this deals
with turning a network's defaults into fields and the fields back into options.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox, QWidget

from napari_medseg.engine.device import available_devices
from napari_medseg.engine.registry import model_card
from napari_medseg.engine.train.options import AUGMENT_PRESETS, ORIENTATIONS, network_train_defaults


class TrainOptionsForm:
    """The option fields (Qt widgets) and their form labels, filled from a network's defaults."""

    def __init__(self) -> None:
        self.steps = QSpinBox(minimum=1, maximum=1_000_000)
        self.lr = QDoubleSpinBox(decimals=6, minimum=1e-6, maximum=10.0, singleStep=1e-4)
        self.batch_size = QSpinBox(minimum=1, maximum=1024)
        self.crop_size = QSpinBox(minimum=0, maximum=4096, singleStep=16)
        self.crop_size.setSpecialValueText("network input")
        self.augment = QComboBox()
        self.augment.addItems(AUGMENT_PRESETS)
        self.orientation = QComboBox()
        self.orientation.addItems(ORIENTATIONS)
        self.orientation.setToolTip(
            "Which way training views may turn. any: quarter turns and flips (endoscopy, "
            "dermoscopy); upright: left-right flips only, the top stays the top (ultrasound, "
            "CT/MRI slices); auto: upright for grayscale images, any for colour"
        )
        self.val_fraction = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=0.9, singleStep=0.05)
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1)
        self.device = QComboBox()
        self.device.addItems(available_devices())

    def rows(self) -> list[tuple[str, QWidget]]:
        """(label, field) pairs in the order the form shows them."""
        return [
            ("Steps", self.steps),
            ("Learning rate", self.lr),
            ("Batch size", self.batch_size),
            ("Crop size", self.crop_size),
            ("Augmentation", self.augment),
            ("Orientation", self.orientation),
            ("Validation fraction", self.val_fraction),
            ("Seed", self.seed),
            ("Device", self.device),
        ]

    def load(self, network: str) -> None:
        """Fill every field with ``network``'s training defaults."""
        opts = network_train_defaults(network)
        self.steps.setValue(opts.steps)
        self.lr.setValue(opts.lr)
        self.batch_size.setValue(opts.batch_size)
        self.crop_size.setValue(opts.crop_size)
        self.augment.setCurrentText(opts.augment)
        self.orientation.setCurrentText(opts.orientation)
        # 3-D networks draw their own rotations (engine/train/spatial_aug.py).
        self.orientation.setEnabled(model_card(network).spatial_dims == 2)
        self.val_fraction.setValue(opts.val_fraction)
        self.seed.setValue(opts.seed)
        self.device.setCurrentText(opts.device if opts.device in available_devices() else "auto")

    def values(self) -> dict[str, Any]:
        """The chosen options (fields of :class:`TrainOptions`)."""
        return {
            "steps": self.steps.value(),
            "lr": self.lr.value(),
            "batch_size": self.batch_size.value(),
            "crop_size": self.crop_size.value(),
            "augment": self.augment.currentText(),
            "orientation": self.orientation.currentText(),
            "val_fraction": self.val_fraction.value(),
            "seed": self.seed.value(),
            "device": self.device.currentText(),
        }
