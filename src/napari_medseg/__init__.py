"""napari-medseg: five published medical-image segmentation networks in napari.

Public API (see docs/api.md)::

    import napari_medseg as nms
    nms.list_models()
    seg = nms.load_model("hf-sam")
    labels = seg.segment(image)

Importing this package imports neither torch nor Qt; the names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ModelCard", "Segmenter", "list_models", "load_model", "model_card", "__version__"]

_LAZY = {
    "ModelCard": "napari_medseg.engine.registry",
    "list_models": "napari_medseg.engine.registry",
    "model_card": "napari_medseg.engine.registry",
    "load_model": "napari_medseg.engine.api",
    "Segmenter": "napari_medseg.engine.segmenter",
}

# A napari console may load us after the viewer opened: see _llvm_guard.py (cheap, no preload).
from napari_medseg._llvm_guard import avoid_llvm_clash as _avoid_llvm_clash  # noqa: E402

_avoid_llvm_clash(preload=False)

if TYPE_CHECKING:
    from napari_medseg.engine.api import load_model
    from napari_medseg.engine.registry import ModelCard, list_models, model_card
    from napari_medseg.engine.segmenter import Segmenter


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_medseg' has no attribute {name!r}")
