"""Controls and key bindings of the Prompt widget (apart, so prompt.py stays about behaviour)."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from napari_medseg.engine.preprocess import PRESET_NAMES

#: (key, action, layers it is bound on). Bound per layer, like micro-sam, so they never
#: shadow napari's own keys on other layers (Image uses C for auto-contrast, Shapes T for path).
KEY_BINDINGS: tuple[tuple[str, str, str], ...] = (
    ("C", "commit the preview to the target layer", "prompt and preview layers"),
    ("Shift-C", "clear prompts and preview", "prompt and preview layers"),
    ("T", "toggle point polarity (positive / negative)", "point layer"),
    ("Shift-S", "propagate through the volume", "prompt and preview layers"),
)


def bind_keys(w: Any) -> None:
    """Bind :data:`KEY_BINDINGS` on the widget's helper layers (instance keymaps only)."""
    for helper in (w.points_layer, w.shapes_layer, w.preview_layer):
        helper.bind_key("C", lambda _ly: w.commit(), overwrite=True)
        helper.bind_key("Shift-C", lambda _ly: w.clear(), overwrite=True)
        helper.bind_key("Shift-S", lambda _ly: w.propagate(), overwrite=True)
    w.points_layer.bind_key("T", lambda _ly: w.toggle_polarity(), overwrite=True)


def build_ui(w: Any) -> None:
    """Create the Prompt widget's controls as attributes of ``w`` (``w.image_combo``, ...)."""
    lay = QVBoxLayout(w)
    box = QGroupBox("Image and model")
    form = QFormLayout(box)
    w.image_combo = QComboBox()
    w.image_combo.currentTextChanged.connect(w._on_image_changed)
    form.addRow("Image", w.image_combo)
    w.preset_combo = QComboBox()
    w.preset_combo.addItems(list(PRESET_NAMES))
    w.preset_combo.currentTextChanged.connect(lambda _: w._reset_session())
    form.addRow("Intensity preset", w.preset_combo)
    w.cache_mb = QDoubleSpinBox()
    w.cache_mb.setRange(16, 1 << 20)
    w.cache_mb.setValue(1024)
    w.cache_mb.setSuffix(" MB")
    w.cache_mb.valueChanged.connect(w._on_cache_mb)
    form.addRow("Memory cache", w.cache_mb)
    row = QHBoxLayout()
    w.cache_dir = QLineEdit()
    w.cache_dir.setPlaceholderText("off (memory only)")
    w.cache_dir.setToolTip("Folder for one embedding file per image; reopening the image skips encoding")
    w.cache_dir.editingFinished.connect(w._reset_session)
    browse = QPushButton("…")
    browse.clicked.connect(lambda: _browse_cache(w))
    row.addWidget(w.cache_dir)
    row.addWidget(browse)
    form.addRow("Disk cache", row)
    w.precompute_btn = QPushButton("Precompute all slices")
    w.precompute_btn.setToolTip("Encode every slice in the background so each click decodes at once")
    w.precompute_btn.clicked.connect(w.precompute)
    form.addRow(w.precompute_btn)
    lay.addWidget(box)

    box = QGroupBox("Prompt and commit")
    form = QFormLayout(box)
    w.positive_check = QCheckBox("New points are positive [T toggles]")
    w.positive_check.setChecked(True)
    w.positive_check.toggled.connect(w._on_polarity)
    form.addRow(w.positive_check)
    w.target_combo = QComboBox()
    form.addRow("Target layer", w.target_combo)
    w.class_spin = QSpinBox()
    w.class_spin.setRange(0, 65535)
    w.class_spin.setSpecialValueText("next free id")
    w.class_spin.setToolTip("0: each commit gets a new object id; otherwise write this class id")
    form.addRow("Label id", w.class_spin)
    buttons = QHBoxLayout()
    w.commit_btn = QPushButton("Commit [C]")
    w.commit_btn.clicked.connect(w.commit)
    w.clear_btn = QPushButton("Clear [Shift+C]")
    w.clear_btn.clicked.connect(w.clear)
    buttons.addWidget(w.commit_btn)
    buttons.addWidget(w.clear_btn)
    form.addRow(buttons)
    lay.addWidget(box)

    box = QGroupBox("Volume")
    form = QFormLayout(box)
    w.min_score = QDoubleSpinBox()
    w.min_score.setRange(0.0, 1.0)
    w.min_score.setSingleStep(0.05)
    w.min_score.setValue(0.5)
    form.addRow("Stop below IoU score", w.min_score)
    w.min_area = QDoubleSpinBox()
    w.min_area.setRange(0.0, 1.0)
    w.min_area.setSingleStep(0.05)
    w.min_area.setValue(0.1)
    form.addRow("Stop below area ratio", w.min_area)
    w.autocommit_check = QCheckBox("Commit when propagation ends")
    w.autocommit_check.setChecked(True)
    form.addRow(w.autocommit_check)
    w.propagate_btn = QPushButton("Propagate up and down [Shift+S]")
    w.propagate_btn.clicked.connect(w.propagate)
    form.addRow(w.propagate_btn)
    lay.addWidget(box)

    row = QHBoxLayout()
    w.progress = QProgressBar()
    w.progress.setRange(0, 1)
    w.cancel_btn = QPushButton("Cancel")
    w.cancel_btn.setEnabled(False)
    w.cancel_btn.clicked.connect(w.cancel)
    row.addWidget(w.progress)
    row.addWidget(w.cancel_btn)
    lay.addLayout(row)
    w.status = QLabel("Choose an image, then click on the object (point layer) or draw a box.")
    w.status.setWordWrap(True)
    lay.addWidget(w.status)
    keys = "<br>".join(f"<b>{k}</b>: {a} ({where})" for k, a, where in KEY_BINDINGS)
    help_label = QLabel(
        f"Keys (when a medseg layer is selected):<br>{keys}<br><b>Ctrl+Z</b>: undo a commit (target layer)"
    )
    help_label.setWordWrap(True)
    lay.addWidget(help_label)
    lay.addStretch(1)


def _browse_cache(w: Any) -> None:
    folder = QFileDialog.getExistingDirectory(w, "Embedding cache folder")
    if folder:
        w.cache_dir.setText(folder)
        w._reset_session()
