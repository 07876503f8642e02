"""Model registry: a frozen :class:`ModelCard` per network and the class that runs it.

Each network's engine module (``napari_medseg.engine.networks.<name>``) calls :func:`register`
at import time. The registry imports the built-in network modules lazily, the first time a
card is asked for, so ``import napari_medseg`` stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_medseg.engine.segmenter import Segmenter

# Engine modules of the built-in networks, imported on first use of the registry.
_BUILTIN_MODULES: tuple[str, ...] = (
    "napari_medseg.engine.networks.sts_net",
    "napari_medseg.engine.networks.ms_lkseg",
    "napari_medseg.engine.networks.s3_net",
    "napari_medseg.engine.networks.hf_sam",
    "napari_medseg.engine.networks.efs_medseg",
)


@dataclass(frozen=True)
class ModelCard:
    """What a user (and the widgets) need to know about one network before running it.

    Attributes:
        name: Registry name, e.g. ``"sts-net"``.
        title: Human-readable title.
        paper: Citation of the paper the network implements.
        doi: DOI of that paper.
        spatial_dims: 2 (runs slice by slice on volumes) or 3 (volumetric).
        promptable: Whether :meth:`Segmenter.prompt` is available.
        needs_labels: Whether the network must be trained on labels before ``segment`` is useful.
        trainable: Whether :meth:`Segmenter.finetune` is available.
        input_size: Network input size in pixels/voxels, (Y, X) or (Z, Y, X).
        default_preset: Intensity preset used when the user leaves it on ``"auto"``
            (``"auto"`` means: detect from dtype and value range).
        weights: Where the default weights come from, in words.
        weights_licence: Licence of those weights (``"none"`` when randomly initialised).
        output: What the integer output means (``"classes"`` or ``"clusters"``).
        summary: One paragraph for the widget tooltip and ``napari-medseg models``.
        docs: Path of the network's page under ``docs/``.
    """

    name: str
    title: str
    paper: str
    doi: str
    spatial_dims: int
    promptable: bool
    needs_labels: bool
    trainable: bool
    input_size: tuple[int, ...]
    default_preset: str = "auto"
    weights: str = "random initialisation"
    weights_licence: str = "none"
    output: str = "classes"
    summary: str = ""
    docs: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


_CARDS: dict[str, ModelCard] = {}
_CLASSES: dict[str, type[Segmenter]] = {}
_loaded = False


def register(card: ModelCard, segmenter_cls: type[Segmenter]) -> None:
    """Register a network.

    Args:
        card: The network's card; ``card.name`` is the registry key.
        segmenter_cls: The :class:`Segmenter` subclass that builds and runs it.

    Raises:
        ValueError: If another class is already registered under that name.
    """
    known = _CLASSES.get(card.name)
    if known is not None and known is not segmenter_cls:
        raise ValueError(f"a network named {card.name!r} is already registered ({known!r})")
    _CARDS[card.name] = card
    _CLASSES[card.name] = segmenter_cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Return the registered network names, sorted."""
    _load_builtins()
    return sorted(_CARDS)


def model_card(name: str) -> ModelCard:
    """Return the frozen card of a registered network.

    Raises:
        KeyError: With the list of known names, if ``name`` is not registered.
    """
    _load_builtins()
    try:
        return _CARDS[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; known networks: {', '.join(sorted(_CARDS))}") from None


def segmenter_class(name: str) -> type[Segmenter]:
    """Return the :class:`Segmenter` subclass registered under ``name``."""
    model_card(name)
    return _CLASSES[name]
