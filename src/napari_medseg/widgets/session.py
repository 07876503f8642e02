"""Models made in this napari session (fine-tuned ones), shared by the widgets of one viewer.

A :class:`SessionModels` store belongs to one viewer (looked up with :func:`session_models`),
so two viewers never see each other's models and nothing is held after a viewer is gone. It
is Qt-free: widgets subscribe with :meth:`SessionModels.subscribe` and are told when a model
is added or removed. Bound methods are held weakly, so a closed widget is simply dropped.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari_medseg.engine.segmenter import Segmenter

log = logging.getLogger(__name__)


@dataclass
class SessionModel:
    """One model made in this session.

    Attributes:
        name: Unique display name, e.g. ``"sts-net · liver #1"``.
        network: Registry name of its network.
        segmenter: The trained :class:`Segmenter` (shared; clone before changing it).
        checkpoint: Where it was saved, if it was.
        info: Free-form facts for tooltips (best validation Dice, steps, time).

    """

    name: str
    network: str
    segmenter: Segmenter
    checkpoint: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


class SessionModels:
    """Ordered store of :class:`SessionModel` with change callbacks (no Qt)."""

    def __init__(self) -> None:
        self._models: dict[str, SessionModel] = {}
        self._callbacks: list[Callable[[], Any]] = []

    def add(
        self,
        network: str,
        segmenter: Segmenter,
        label: str = "",
        checkpoint: str | Path | None = None,
        info: dict[str, Any] | None = None,
    ) -> SessionModel:
        """Register a model and notify subscribers.

        Args:
            network: Registry name of the network.
            segmenter: The trained segmenter.
            label: What it was trained on (e.g. the image layer's name).
            checkpoint: Its checkpoint file, if saved.
            info: Extra facts shown in tooltips.

        Returns:
            The stored entry (its ``name`` is unique in this store).

        """
        base = f"{network} · {label}" if label else network
        name, n = f"{base} #1", 1
        while name in self._models:
            n += 1
            name = f"{base} #{n}"
        entry = SessionModel(
            name,
            network,
            segmenter,
            Path(checkpoint) if checkpoint else None,
            {"created": time.strftime("%H:%M:%S"), **(info or {})},
        )
        self._models[name] = entry
        self._notify()
        return entry

    def remove(self, name: str) -> None:
        """Forget a model (its checkpoint file stays)."""
        if self._models.pop(name, None) is not None:
            self._notify()

    def get(self, name: str) -> SessionModel:
        """Return the entry called ``name``; raises KeyError naming the known ones."""
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"no session model {name!r}; known: {', '.join(self._models) or 'none'}") from None

    def names(self) -> list[str]:
        """Names in the order the models were added."""
        return list(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def subscribe(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after every change; bound methods are referenced weakly."""
        if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
            self._callbacks.append(_WeakCallback(callback))
        else:
            self._callbacks.append(callback)

    def _notify(self) -> None:
        alive = []
        for cb in self._callbacks:
            if isinstance(cb, _WeakCallback) and not cb.alive:
                continue
            try:
                cb()
            except RuntimeError as err:  # the widget's Qt object was deleted
                log.debug("dropping a session callback: %s", err)
                continue
            alive.append(cb)
        self._callbacks = alive


class _WeakCallback:
    """A bound method held weakly, so subscribing does not keep a widget alive."""

    def __init__(self, method: Callable[[], Any]) -> None:
        self._ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    @property
    def alive(self) -> bool:
        return self._ref() is not None

    def __call__(self) -> None:
        method = self._ref()
        if method is not None:
            method()


_STORES: weakref.WeakKeyDictionary[Any, SessionModels] = weakref.WeakKeyDictionary()


def session_models(viewer: Any) -> SessionModels:
    """Return the store of ``viewer`` (created on first use, dropped with the viewer)."""
    store = _STORES.get(viewer)
    if store is None:
        store = SessionModels()
        _STORES[viewer] = store
    return store


def default_checkpoint_dir() -> Path:
    """Folder for checkpoints saved without a chosen path (the user's data folder)."""
    try:
        from platformdirs import user_data_dir
    except ImportError:  # napari brings platformdirs; this keeps the widget importable without it
        import os

        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "napari-medseg" / "models"
    return Path(user_data_dir("napari-medseg")) / "models"
