"""napari reader and writer contributions for NIfTI (no napari import needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_medseg.engine.io import NIFTI_SUFFIXES, read_image, suffix_of
from napari_medseg.engine.io import write_image as _write_file

LayerData = tuple[Any, dict[str, Any], str]

_LABEL_WORDS = ("label", "mask", "seg", "gt", "tissue", "annot")


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return a reader for ``.nii``/``.nii.gz`` paths, else ``None`` (napari's protocol)."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(suffix_of(p) in NIFTI_SUFFIXES for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | list[str]) -> list[LayerData]:
    """Read NIfTI files into layers: voxel sizes become ``scale``, the affine goes to metadata.

    Integer files whose names mention labels/masks/segmentations open as Labels layers.
    """
    layers: list[LayerData] = []
    for p in [path] if isinstance(path, str) else path:
        img = read_image(p)
        name = Path(p).name.removesuffix(".gz").removesuffix(".nii")
        is_labels = img.data.dtype.kind in "iub" and any(w in name.lower() for w in _LABEL_WORDS)
        meta = {"name": name, "scale": img.scale, "metadata": img.metadata}
        layers.append((img.data, meta, "labels" if is_labels else "image"))
    return layers


def _write(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    metadata = dict(meta.get("metadata") or {})
    written = _write_file(path, data, tuple(meta.get("scale") or ()), metadata)
    return [str(written)]


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer as NIfTI, with the affine of the image it was read with."""
    return _write(path, data, meta)


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write an Image layer as NIfTI."""
    return _write(path, data, meta)
