"""Public entry points: :func:`load_model` and friends (re-exported by ``napari_medseg``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from napari_medseg.engine.checkpoint import CheckpointError, load_checkpoint, read_metadata
from napari_medseg.engine.registry import list_models, model_card, segmenter_class
from napari_medseg.engine.segmenter import Segmenter

__all__ = ["load_model", "list_models", "model_card", "Segmenter"]


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = "auto",
    **options: Any,
) -> Segmenter:
    """Make a :class:`Segmenter` from a registry name or a checkpoint file.

    Args:
        name_or_path: A name from :func:`list_models` (default weights: pretrained where the
            network has them, random otherwise) or the path of a ``.safetensors`` checkpoint.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        **options: Network options (see each network's ``default_config``), and ``preset`` /
            ``class_names`` / ``recipe`` (a name from the network's ``RUN_RECIPES``).

    Raises:
        KeyError: Unknown name (the message lists the known ones).
        CheckpointError: The file is missing, damaged, newer, or of an unknown network.
    """
    text = os.fspath(name_or_path)
    names = list_models()
    if text in names and not Path(text).is_file():
        return segmenter_class(text)(device=device, **options)
    looks_like_path = Path(text).suffix or os.sep in text or Path(text).exists()
    if not looks_like_path:
        model_card(text)  # raises KeyError listing the known names
    meta = read_metadata(text)
    if meta["model"] not in names:
        raise CheckpointError(
            f"{Path(text).name} is a checkpoint of network {meta['model']!r}, "
            "which this version of napari-medseg does not know"
        )
    ckpt = load_checkpoint(text, expect_model=meta["model"])
    return segmenter_class(meta["model"]).from_checkpoint(ckpt, Path(text).name, device, **options)
