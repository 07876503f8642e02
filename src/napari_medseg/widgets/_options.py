"""A form built from a network's :class:`~napari_medseg.engine.run_options.RunOption` list.

The Segment widget shows it under the network choice; each editor's tooltip is the option's
help text, which quotes the measured effect. Values are read back as config values (a bool
option writes its own ``values`` pair, e.g. ``"off"`` / ``"boxes"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

from napari_medseg.engine.run_options import RunOption

_INT_LIMIT = 2**31 - 1  # QSpinBox holds a C int


class OptionsForm(QWidget):
    """Editors for run options; :meth:`set_options` rebuilds, :meth:`values` reads them."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._layout = QFormLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._options: tuple[RunOption, ...] = ()
        self._editors: dict[str, QWidget] = {}

    def set_options(self, options: Sequence[RunOption], config: Mapping[str, Any] | None = None) -> None:
        """Show one editor per option, set from ``config`` (or each option's default)."""
        while self._layout.rowCount():
            self._layout.removeRow(0)  # deletes the row's widgets too
        self._options, self._editors = tuple(options), {}
        for opt in self._options:
            editor = _make_editor(opt)
            editor.setToolTip(opt.help)
            self._editors[opt.key] = editor
            self.set_value(opt.key, opt.shown(config or {}))
            if isinstance(editor, QCheckBox):
                self._layout.addRow(editor)  # the box carries its own label
            else:
                self._layout.addRow(opt.label, editor)
        self.setVisible(bool(self._options))

    def keys(self) -> list[str]:
        """Option keys in display order."""
        return [o.key for o in self._options]

    def editor(self, key: str) -> QWidget | None:
        """The editor of ``key`` (``None`` when the network has no such option)."""
        return self._editors.get(key)

    def set_value(self, key: str, value: Any) -> None:
        """Put a config value (or a bool for a bool option) into its editor."""
        opt = next(o for o in self._options if o.key == key)
        editor = self._editors[key]
        if isinstance(editor, QCheckBox):
            editor.setChecked(bool(value is True or value == opt.values[1]))
        elif isinstance(editor, QComboBox):
            editor.setCurrentIndex(max(opt.choice_index(value), 0))
        elif isinstance(editor, QSpinBox | QDoubleSpinBox) and isinstance(value, int | float):
            editor.setValue(value)  # anything else (None from an old config) keeps the default

    def values(self) -> dict[str, Any]:
        """Option key → config value, as the network's config expects it."""
        out: dict[str, Any] = {}
        for opt in self._options:
            editor = self._editors[opt.key]
            if isinstance(editor, QCheckBox):
                out[opt.key] = opt.values[1] if editor.isChecked() else opt.values[0]
            elif isinstance(editor, QComboBox):
                out[opt.key] = opt.choices[editor.currentIndex()]
            elif isinstance(editor, QSpinBox | QDoubleSpinBox):
                out[opt.key] = editor.value()
        return out


def _make_editor(opt: RunOption) -> QWidget:
    if opt.kind == "bool":
        return QCheckBox(opt.label)
    if opt.kind == "choice":
        box = QComboBox()
        box.addItems(list(opt.labels()))
        return box
    if opt.kind == "int":
        spin = QSpinBox()
        spin.setRange(int(max(opt.minimum, -_INT_LIMIT)), int(min(opt.maximum, _INT_LIMIT)))
        spin.setSingleStep(max(1, int(opt.step)))
        spin.setSpecialValueText(opt.minimum_text)  # e.g. "auto" for working size 0
        return spin
    dspin = QDoubleSpinBox()
    dspin.setDecimals(3)
    dspin.setRange(opt.minimum, opt.maximum)
    dspin.setSingleStep(opt.step)
    return dspin
