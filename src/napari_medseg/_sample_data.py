"""napari sample-data contributions (File ▸ Open Sample ▸ MedSeg).

Returns napari layer-data tuples; importing napari is not needed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_medseg.engine.io import read_image

LayerData = tuple[Any, dict[str, Any], str]


def sample_dir() -> Path:
    """Folder holding the samples: inside the installed package, or the repository's copy."""
    here = Path(__file__).parent
    for candidate in (here / "sample_data", here.parents[1] / "sample_data"):
        if (candidate / "README.md").is_file():
            return candidate
    raise FileNotFoundError("napari-medseg sample data not found; reinstall the package")


def sample_2d() -> list[LayerData]:
    """Colour fundus photograph (512×512 RGB, CC0)."""
    img = read_image(sample_dir() / "retina_fundus.png")
    return [(img.data, {"name": "retina (sample)", "rgb": True, "metadata": img.metadata}, "image")]


def sample_3d() -> list[LayerData]:
    """MNI152 T1 MRI at 2 mm with grey/white-matter labels."""
    img = read_image(sample_dir() / "mni152_t1_2mm.nii.gz")
    lab = read_image(sample_dir() / "mni152_tissue_2mm.nii.gz")
    meta = {"name": "MNI152 T1 (sample)", "scale": img.scale, "metadata": img.metadata}
    lab_meta = {
        "name": "MNI152 tissue (sample)",
        "scale": lab.scale,
        "metadata": lab.metadata,
        "visible": False,
        "features": {"class": ["background", "grey matter", "white matter"]},
    }
    return [(img.data, meta, "image"), (lab.data.astype("uint8"), lab_meta, "labels")]
