"""Shared fixtures: napari settings and weights kept out of HOME, no downloads, toy network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("home")
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        os.environ.setdefault(var, str(root / var.lower()))
    # An empty weights folder: any code path that would download fails loudly instead.
    os.environ["NAPARI_MEDSEG_WEIGHTS"] = str(root / "weights")


@pytest.fixture
def toy_registered():
    """Register the toy test network for one test, then remove it again."""
    from napari_medseg.engine import registry
    from toy import TOY_CARD, ToySegmenter

    registry.list_models()  # load the built-ins first so they are not re-imported later
    registry.register(TOY_CARD, ToySegmenter)
    yield ToySegmenter
    registry._CARDS.pop(TOY_CARD.name, None)
    registry._CLASSES.pop(TOY_CARD.name, None)


def disc_image(
    size: int = 64, radius: float = 12.0, center: tuple[float, float] | None = None, seed: int = 0
):
    """A noisy bright disc on a dark background and its mask (image float32, mask uint8)."""
    cy, cx = center or (size / 2 - 2, size / 2 + 3)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.uint8)
    rng = np.random.default_rng(seed)
    image = mask * 100.0 + rng.normal(0, 8, mask.shape) + 20
    return image.astype(np.float32), mask
