"""A tiny live plot for the Fine-tune widget: training loss and validation Dice against step.

Drawn with QPainter so the plugin needs no plotting library (matplotlib is not a dependency).
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget


class LossPlot(QWidget):
    """Training loss (orange, left scale) and validation Dice (cyan, 0–1) against step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(130)
        self.total = 1
        self.loss: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []

    def reset(self, total: int) -> None:
        """Forget the curves; the x axis runs to ``total`` steps."""
        self.total, self.loss, self.dice = max(1, total), [], []
        self.update()

    def add(self, step: int, loss: float, dice: float | None) -> None:
        """Append one step (``dice`` only on validation steps)."""
        if math.isfinite(loss):
            self.loss.append((step, loss))
        if dice is not None and math.isfinite(dice):
            self.dice.append((step, dice))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        left, top, right, bottom = 34, 16, 10, 18
        w, h = self.width() - left - right, self.height() - top - bottom
        p.fillRect(self.rect(), QColor("#262930"))
        p.setPen(QPen(QColor("#808080")))
        p.drawRect(left, top, w, h)
        top_loss = max((v for _, v in self.loss), default=1.0) or 1.0
        p.drawText(2, top + 8, f"{top_loss:.2g}")
        p.drawText(2, top + h, "0")
        p.drawText(left, self.height() - 4, f"step 0 … {self.total}")
        for series, colour, scale, label, x_label in (
            (self.loss, "#f0a030", top_loss, "loss", left + 4),
            (self.dice, "#30c0e0", 1.0, "val Dice", left + 60),
        ):
            p.setPen(QPen(QColor(colour), 2))
            p.drawText(x_label, 12, label)
            pts = [QPointF(left + w * s / self.total, top + h * (1 - min(v / scale, 1.0))) for s, v in series]
            if len(pts) == 1:
                p.drawEllipse(pts[0], 2, 2)
            elif pts:
                p.drawPolyline(QPolygonF(pts))
        p.end()
