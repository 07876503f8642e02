"""Run-time options a network offers to its users (the Segment widget builds a form from them).

Each :class:`~napari_medseg.engine.segmenter.Segmenter` subclass lists, in
:meth:`~napari_medseg.engine.segmenter.Segmenter.run_options`, the config keys that change how
it *segments* (not how it is built or trained), with a label, a type, a range and a sentence of
help. Widgets render them; :func:`apply_run_options` checks the values and returns the new
config, so a wrong value from any front end gets the same clear message. Qt-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["int", "float", "choice", "bool"]


@dataclass(frozen=True)
class RunOption:
    """One user-facing run-time option of a network.

    Attributes:
        key: Config key it sets (must be in the network's ``default_config``).
        label: Short label for a form.
        kind: ``"int"``, ``"float"``, ``"choice"`` or ``"bool"``.
        default: Value shown first (the network's default).
        help: One or two sentences: what it does and what it costs (tooltip).
        minimum: Lower bound (``int`` / ``float``).
        maximum: Upper bound (``int`` / ``float``).
        step: Spin-box step (``int`` / ``float``).
        choices: Allowed values (``choice``), in display order.
        values: For ``bool``: the config values written for (off, on), e.g. ``("off", "boxes")``.
        choice_labels: Display text per choice (default ``str`` of each).
        minimum_text: Text a form shows at ``minimum`` when that value means "automatic".
    """

    key: str
    label: str
    kind: Kind
    default: Any
    help: str = ""
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 1.0
    choices: tuple[Any, ...] = ()
    values: tuple[Any, Any] = (False, True)
    choice_labels: tuple[str, ...] = ()
    minimum_text: str = ""

    def choice_index(self, value: Any) -> int:
        """Position of ``value`` in :attr:`choices` (-1 if absent); ``True`` never matches ``1``."""
        return next((i for i, c in enumerate(self.choices) if type(c) is type(value) and c == value), -1)

    def labels(self) -> tuple[str, ...]:
        """Display text of each choice, in :attr:`choices` order."""
        return self.choice_labels or tuple(str(c) for c in self.choices)

    def check(self, value: Any) -> Any:
        """Return ``value`` as the config expects it; raise ValueError with a clear message."""
        if self.kind == "bool":
            if isinstance(value, bool):
                on = value
            elif value in self.values:
                on = value == self.values[1]
            else:
                raise ValueError(
                    f"{self.label} ({self.key}): expected one of {list(self.values)}, got {value!r}"
                )
            return self.values[1] if on else self.values[0]
        if self.kind == "choice":
            if self.choice_index(value) < 0:
                raise ValueError(
                    f"{self.label} ({self.key}): expected one of {list(self.choices)}, got {value!r}"
                )
            return value
        try:
            number = int(value) if self.kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.label} ({self.key}): expected a number, got {value!r}") from None
        if self.kind == "int" and number != float(value):
            raise ValueError(f"{self.label} ({self.key}): expected a whole number, got {value!r}")
        if not self.minimum <= number <= self.maximum:
            raise ValueError(
                f"{self.label} ({self.key}): {number:g} is outside {self.minimum:g}…{self.maximum:g}"
            )
        return number

    def shown(self, config: Mapping[str, Any]) -> Any:
        """The value a form shows for ``config`` (bools as ``True`` / ``False``)."""
        value = config.get(self.key, self.default)
        if self.kind == "bool":
            return value is True or (not isinstance(value, bool) and value == self.values[1])
        return value


@dataclass(frozen=True)
class RunRecipe:
    """A named set of run-option values: a measured starting point for one kind of image.

    Attributes:
        name: Key used by ``load_model(..., recipe=name)`` and ``segment --recipe``.
        label: Short text for a form's recipe list.
        help: What it is for and what it measured (tooltip, ``models NAME``).
        values: (option key, value) pairs; options it does not name keep the network's
            defaults.
    """

    name: str
    label: str
    help: str
    values: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Option key → value."""
        return dict(self.values)

    def matches(self, options: Sequence[RunOption], values: Mapping[str, Any]) -> bool:
        """Whether ``values`` (a form's, key → config value) are this recipe's settings.

        Options the recipe does not name must be at their defaults.
        """
        mine = self.as_dict()
        return all(values.get(o.key) == mine.get(o.key, o.default) for o in options)


def find_recipe(recipes: Sequence[RunRecipe], name: str) -> RunRecipe:
    """The recipe called ``name``.

    Raises:
        ValueError: No such recipe (the message lists the known ones).
    """
    for r in recipes:
        if r.name == name:
            return r
    known = [r.name for r in recipes]
    raise ValueError(f"unknown recipe {name!r}; known: {known}" if known else f"it has no recipes ({name!r})")


def apply_run_options(
    options: Sequence[RunOption], config: Mapping[str, Any], values: Mapping[str, Any]
) -> dict[str, Any]:
    """Return a copy of ``config`` with checked ``values`` (a key per option; others refused).

    Args:
        options: The network's :class:`RunOption` list.
        config: Its current config (not changed: session models share theirs).
        values: Option key → value from a form or a command line.

    Raises:
        ValueError: An unknown key, or a value of the wrong type or outside its range.
    """
    by_key = {o.key: o for o in options}
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise ValueError(f"unknown run option(s) {unknown}; known: {sorted(by_key)}")
    return {**config, **{k: by_key[k].check(v) for k, v in values.items()}}
