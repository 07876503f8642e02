"""A fake promptable segmenter for widget tests: deterministic, instant, counts its encodes.

``encode_slice`` stores the (grey) slice as the "embedding"; ``decode_prompts`` thresholds
the slice at 0.5 and keeps the bright connected components that the prompts point at (the
component under each positive point, or those inside the box), minus the components under
negative points, clipped to the box. So a bright object in a dark image is segmented exactly,
which lets tests check where a mask lands.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from napari_medseg.engine.prompt import PromptResult, Prompts


class FakePromptSegmenter:
    """Implements the :class:`napari_medseg.engine.prompt.PromptModel` protocol.

    Attributes:
        encode_count: Encoder calls over the object's life (across sessions).
        backbone: Part of the cache key (change it to invalidate disk caches).
    """

    preset = None

    def __init__(self, backbone: str = "fake-v1", threshold: float = 0.5) -> None:
        self.encode_count = 0
        self.backbone = backbone
        self.threshold = threshold

    def prompt_cache_key(self) -> str:
        return f"fake|{self.backbone}|{self.threshold}"

    def encode_slice(self, image: np.ndarray, roi: Any) -> dict[str, torch.Tensor]:
        self.encode_count += 1
        grey = np.asarray(image, np.float32).mean(0)  # (C, Y, X) -> (Y, X)
        return {"grey": torch.from_numpy(np.ascontiguousarray(grey))}

    def plan_roi(self, prompts: Prompts, shape: tuple[int, int]) -> None:
        return None

    def decode_prompts(
        self, embedding: dict[str, torch.Tensor], prompts: Prompts, shape: tuple[int, int], roi: Any
    ) -> PromptResult:
        grey = embedding["grey"].float().numpy()
        comps, _ = ndimage.label(grey > self.threshold)
        h, w = shape
        keep: set[int] = set()
        drop: set[int] = set()
        if prompts.points is not None:
            for (y, x), lab in zip(prompts.points, prompts.point_labels, strict=True):  # type: ignore[arg-type]
                yi, xi = int(round(y)), int(round(x))
                if 0 <= yi < h and 0 <= xi < w and comps[yi, xi] > 0:
                    (keep if lab == 1 else drop).add(int(comps[yi, xi]))
        inside = np.ones(shape, bool)
        if prompts.box is not None:
            y0, x0, y1, x1 = (int(round(v)) for v in prompts.box)
            inside[:] = False
            inside[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = True
            keep |= set(np.unique(comps[inside]).tolist()) - {0}
        mask = np.isin(comps, sorted(keep - drop)) & inside
        return PromptResult(mask=mask, score=1.0 if mask.any() else 0.0, low_res=None)


def ball_volume(
    shape: tuple[int, int, int] = (24, 48, 48),
    center: tuple[int, int, int] = (12, 24, 20),
    radius: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """A bright ball in a dark noisy volume: (image float32, bool truth)."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    truth = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius**2
    image = (truth * 900.0 + rng.normal(100.0, 20.0, shape)).astype(np.float32)
    return image, truth
