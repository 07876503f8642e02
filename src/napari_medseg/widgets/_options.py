"""A form built from a network's :class:`~napari_medseg.engine.run_options.RunOption` list.

The Segment widget shows it under the network choice; each editor's tooltip is the option's
help text, which quotes the measured effect. Values are read back as config values (a bool
option writes its own ``values`` pair, e.g. ``"off"`` / ``"boxes"``). When the network has
:class:`~napari_medseg.engine.run_options.RunRecipe` entries, a *Recipe* list on top fills the
editors with one of them and shows "custom" once an editor no longer matches any.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

from napari_medseg.engine.run_options import RunOption, RunRecipe, find_recipe

_INT_LIMIT = 2**31 - 1  # QSpinBox holds a C int
CUSTOM = "custom"


class OptionsForm(QWidget):
    """Editors for run options; :meth:`set_options` rebuilds, :meth:`values` reads them."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._layout = QFormLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._options: tuple[RunOption, ...] = ()
        self._recipes: tuple[RunRecipe, ...] = ()
        self._editors: dict[str, QWidget] = {}
        self.recipe: QComboBox | None = None  # shown only for networks with recipes

    def set_options(
        self,
        options: Sequence[RunOption],
        config: Mapping[str, Any] | None = None,
        recipes: Sequence[RunRecipe] = (),
    ) -> None:
        """Show one editor per option, set from ``config`` (or each option's default).

        ``recipes`` adds the *Recipe* list above the editors (none: no list).
        """
        while self._layout.rowCount():
            self._layout.removeRow(0)  # deletes the row's widgets too
        self._options, self._editors, self._recipes = tuple(options), {}, tuple(recipes)
        self.recipe = None
        if self._recipes:
            self.recipe = QComboBox()
            self.recipe.addItems([r.label for r in self._recipes] + [CUSTOM])
            for i, r in enumerate(self._recipes):
                self.recipe.setItemData(i, r.help, Qt.ItemDataRole.ToolTipRole)
            self.recipe.setToolTip("Fill the options below with a measured set; editing them shows 'custom'")
            self.recipe.activated.connect(self._apply_recipe)
            self._layout.addRow("Recipe", self.recipe)
        for opt in self._options:
            editor = _make_editor(opt)
            editor.setToolTip(opt.help)
            self._editors[opt.key] = editor
            self.set_value(opt.key, opt.shown(config or {}))
            _changed_signal(editor).connect(self._show_recipe)
            if isinstance(editor, QCheckBox):
                self._layout.addRow(editor)  # the box carries its own label
            else:
                self._layout.addRow(opt.label, editor)
        self._show_recipe()
        self.setVisible(bool(self._options))

    def apply_recipe(self, name: str) -> None:
        """Set every editor to recipe ``name``'s value (the default where it names none).

        Raises:
            ValueError: No recipe of that name (the message lists the known ones).
        """
        values = find_recipe(self._recipes, name).as_dict()
        for opt in self._options:
            self.set_value(opt.key, opt.shown({opt.key: values.get(opt.key, opt.default)}))
        self._show_recipe()

    def recipe_name(self) -> str:
        """The recipe the editors match, or ``"custom"``."""
        values = self.values()
        return next((r.name for r in self._recipes if r.matches(self._options, values)), CUSTOM)

    def _apply_recipe(self, index: int) -> None:
        if 0 <= index < len(self._recipes):
            self.apply_recipe(self._recipes[index].name)
        else:
            self._show_recipe()  # "custom" is a state, not a choice: show what the editors hold

    def _show_recipe(self, *_: Any) -> None:
        if self.recipe is None:
            return
        name = self.recipe_name()
        index = next((i for i, r in enumerate(self._recipes) if r.name == name), len(self._recipes))
        self.recipe.setCurrentIndex(index)

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


def _changed_signal(editor: QWidget) -> Any:
    if isinstance(editor, QCheckBox):
        return editor.toggled
    if isinstance(editor, QComboBox):
        return editor.currentIndexChanged
    return editor.valueChanged  # QSpinBox / QDoubleSpinBox


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
