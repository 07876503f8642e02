"""Reading and writing medical images: NIfTI (nibabel), TIFF (tifffile), PNG/JPEG, NumPy.

Arrays come back in napari's order: (Z, Y, X) for volumes, (Y, X) or (Y, X, 3) for 2-D. NIfTI
stores voxels as (i, j, k) = (X, Y, Z); reading reverses the axes, turns the voxel sizes into
a ``scale`` in the same (Z, Y, X) order, and keeps the affine in the metadata so that writing
a Labels layer back gives a file that overlays the original exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class ImageData:
    """An image read from disk.

    Attributes:
        data: The array, napari axis order.
        scale: Voxel size per axis of ``data`` (same order), 1.0 where unknown.
        metadata: ``affine`` (4×4 list, NIfTI only), ``source`` path, ``format``.
    """

    data: np.ndarray
    scale: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


def suffix_of(path: str | os.PathLike[str]) -> str:
    """Lower-case suffix, treating ``.nii.gz`` as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def read_image(path: str | os.PathLike[str]) -> ImageData:
    """Read an image file.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Unknown format, or the file cannot be decoded (message names the file).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    suffix = suffix_of(p)
    try:
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(p)
        if suffix in TIFF_SUFFIXES:
            import tifffile

            data = tifffile.imread(p)
            return ImageData(data, (1.0,) * data.ndim, {"source": str(p), "format": "tiff"})
        if suffix in PLAIN_SUFFIXES:
            from PIL import Image

            with Image.open(p) as im:
                data = np.array(im.convert("RGB") if im.mode in ("P", "CMYK") else im)
            if data.ndim == 3 and data.shape[-1] == 4:
                data = data[..., :3]
            return ImageData(data, (1.0,) * 2, {"source": str(p), "format": suffix[1:]})
        if suffix == ".npy":
            data = np.load(p, allow_pickle=False)
            return ImageData(data, (1.0,) * data.ndim, {"source": str(p), "format": "npy"})
    except Exception as err:  # decoders raise many types (ImageFileError, OSError, zlib.error)
        raise ValueError(
            f"cannot read {p.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    raise ValueError(f"unsupported file type {suffix!r} for {p.name}; use NIfTI, TIFF, PNG, JPEG or .npy")


def _read_nifti(p: Path) -> ImageData:
    import nibabel as nib

    img = nib.load(str(p))
    data = np.asanyarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[-1] == 1:  # a 2-D image stored as one slice
        data, zooms = data[..., 0], zooms[:2]
    data = np.ascontiguousarray(np.transpose(data))  # (i, j, k) → (k, j, i) = (Z, Y, X)
    meta = {
        "source": str(p),
        "format": "nifti",
        "affine": np.asarray(img.affine, dtype=float).tolist(),
        "nifti_ndim": int(len(img.shape)),
    }
    return ImageData(data, tuple(reversed(zooms)), meta)


def write_image(
    path: str | os.PathLike[str],
    data: np.ndarray,
    scale: tuple[float, ...] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``data`` (napari axis order) to NIfTI, TIFF, PNG or .npy by suffix.

    For NIfTI, the affine in ``metadata["affine"]`` is used when present (so labels overlay the
    image they came from); otherwise a diagonal affine from ``scale``.

    Returns:
        The written path.
    """
    p = Path(path)
    suffix = suffix_of(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        affine = np.asarray((metadata or {}).get("affine") or _diag_affine(scale, data.ndim))
        arr = np.transpose(data)  # (Z, Y, X) → (X, Y, Z)
        if data.dtype == bool:
            arr = arr.astype(np.uint8)
        img = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(p))
    elif suffix in TIFF_SUFFIXES:
        import tifffile

        tifffile.imwrite(p, data)
    elif suffix in PLAIN_SUFFIXES:
        from PIL import Image

        if data.ndim != 2 and not (data.ndim == 3 and data.shape[-1] == 3):
            raise ValueError(f"{suffix} holds 2-D images only; use .tif or .nii.gz for shape {data.shape}")
        if data.dtype != np.uint8:
            if data.min() < 0 or data.max() > 255:
                raise ValueError(f"{suffix} holds values 0..255; use .tif or .nii.gz for this range")
            data = data.astype(np.uint8)
        Image.fromarray(data).save(p)
    elif suffix == ".npy":
        np.save(p, data, allow_pickle=False)
    else:
        raise ValueError(f"unsupported output type {suffix!r}; use .nii.gz, .tif, .png or .npy")
    return p


def _diag_affine(scale: tuple[float, ...] | None, ndim: int) -> np.ndarray:
    aff = np.eye(4)
    if scale:
        for i, s in enumerate(reversed(tuple(scale)[-3:])):
            aff[i, i] = float(s)
    return aff
