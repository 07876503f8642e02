"""Progress records yielded by long-running generators (segmentation, training, encoding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    """One step of long work; every yield of such a record is a cancel point.

    Attributes:
        done: Units finished (slices, tiles, iterations).
        total: Units in all (0 when unknown).
        message: Short text for a status line.
        info: Extra figures (e.g. ``{"iteration": 5, "clusters": 4}``).
    """

    done: int
    total: int
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """``done / total`` in ``[0, 1]`` (0 when the total is unknown)."""
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0
