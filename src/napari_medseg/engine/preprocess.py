"""Intensity presets: one explicit mapping from raw image values to ``[0, 1]``.

The same preset is applied at training and at inference, stored in checkpoints and in the
embedding-cache key, so a model never sees intensities scaled differently from how it was
trained (the STS-Net release scaled by 1023 in training and 255 in evaluation; see
docs/models/sts-net.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

# CT windows in Hounsfield units: (level, width).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct-soft-tissue": (40.0, 400.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
}


@dataclass(frozen=True)
class IntensityPreset:
    """A resolved intensity mapping.

    Attributes:
        name: Preset name (``"ct-soft-tissue"``, ``"ct-custom"``, ``"percentile"``, ``"rgb"``,
            ``"uint8"``, ``"minmax"``, ...).
        kind: ``"window"`` (fixed low/high), ``"percentile"`` (per image) or ``"rgb"`` (/255).
        low: Lower bound in raw units for ``"window"``; lower percentile for ``"percentile"``.
        high: Upper bound in raw units for ``"window"``; upper percentile for ``"percentile"``.
    """

    name: str
    kind: str
    low: float = 0.0
    high: float = 1.0

    def to_json(self) -> str:
        """Serialise for checkpoint metadata and cache keys."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IntensityPreset:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def ct_window(level: float, width: float, name: str = "ct-custom") -> IntensityPreset:
    """A CT window given by level and width in HU."""
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    return IntensityPreset(name, "window", level - width / 2, level + width / 2)


PRESET_NAMES: tuple[str, ...] = (
    "auto",
    *CT_WINDOWS,
    "mr",
    "ultrasound",
    "rgb",
    "uint8",
    "minmax",
)


def get_preset(name: str) -> IntensityPreset:
    """Return a named preset (not ``"auto"``; see :func:`resolve_preset`).

    Names: the CT windows in :data:`CT_WINDOWS`; ``"mr"`` and ``"ultrasound"``
    (0.5-99.5 percentile clipping per image); ``"rgb"`` and ``"uint8"`` (divide by 255);
    ``"minmax"`` (0-100 percentile); ``"ct:LEVEL,WIDTH"`` for a custom window.
    """
    if name in CT_WINDOWS:
        level, width = CT_WINDOWS[name]
        return ct_window(level, width, name)
    if name.startswith("ct:"):
        try:
            level, width = (float(v) for v in name[3:].split(","))
        except ValueError:
            raise ValueError(f"custom CT window must look like 'ct:40,400', got {name!r}") from None
        return ct_window(level, width)
    if name in ("mr", "ultrasound", "percentile"):
        return IntensityPreset(name, "percentile", 0.5, 99.5)
    if name == "minmax":
        return IntensityPreset(name, "percentile", 0.0, 100.0)
    if name in ("rgb", "uint8"):
        return IntensityPreset(name, "window", 0.0, 255.0)
    raise ValueError(f"unknown intensity preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")


def detect_preset(image: np.ndarray, rgb: bool) -> IntensityPreset:
    """Guess a preset from dtype and value range.

    Rules, in order: RGB uint8 → ``rgb``; uint8 grey (ultrasound, endoscopy) → ``uint8``;
    values below -500 (CT stores air at -1000 HU) → ``ct-soft-tissue``; otherwise
    ``mr`` percentile clipping.

    Args:
        image: Raw array of any numeric dtype.
        rgb: Whether the last axis holds colour channels.
    """
    if image.dtype == np.uint8:
        return get_preset("rgb" if rgb else "uint8")
    finite = image[np.isfinite(image)] if image.dtype.kind == "f" else image
    if finite.size and image.dtype.kind in "if":
        if float(finite.min()) < -500 and float(finite.max()) > 100:
            return get_preset("ct-soft-tissue")
    return get_preset("mr")


def resolve_preset(preset: str | IntensityPreset | None, image: np.ndarray, rgb: bool) -> IntensityPreset:
    """Turn ``"auto"``/``None``/a name/a preset into a concrete :class:`IntensityPreset`."""
    if isinstance(preset, IntensityPreset):
        return preset
    if preset in (None, "auto"):
        found = detect_preset(image, rgb)
        log.info("intensity preset auto-detected: %s", found.name)
        return found
    return get_preset(str(preset))


def apply_preset(image: np.ndarray, preset: IntensityPreset) -> np.ndarray:
    """Map raw intensities to float32 in ``[0, 1]``.

    Percentiles are taken over the whole array (a volume, not each slice), so every slice of
    one volume is scaled alike. NaN becomes 0 after scaling; +/-inf clip to 1/0.

    Args:
        image: Raw array, any shape and numeric dtype.
        preset: A resolved preset.

    Returns:
        float32 array of the same shape with values in ``[0, 1]``.
    """
    data = np.asarray(image, dtype=np.float32)
    if preset.kind == "percentile":
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            raise ValueError("the image has no finite values (all NaN or inf)")
        # A strided sample keeps percentiles cheap on large volumes.
        sample = finite[:: max(1, finite.size // 2_000_000)]
        low, high = np.percentile(sample, [preset.low, preset.high])
    elif preset.kind == "window":
        low, high = preset.low, preset.high
    else:
        raise ValueError(f"unknown preset kind {preset.kind!r}")
    scale = float(high - low)
    if scale <= 0:
        # Constant image: map to zeros rather than dividing by zero.
        out = np.zeros_like(data)
    else:
        out = (data - np.float32(low)) / np.float32(scale)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
