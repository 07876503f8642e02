"""A tiny 2-D network used only by the engine's own tests (never registered as a network)."""

from __future__ import annotations

from typing import Any

from torch import nn

from napari_medseg.engine.registry import ModelCard
from napari_medseg.engine.segmenter import Segmenter

TOY_CARD = ModelCard(
    name="toy-test-net",
    title="test fixture",
    paper="none (test fixture)",
    doi="",
    spatial_dims=2,
    promptable=False,
    needs_labels=True,
    trainable=True,
    input_size=(32, 32),
)


class ToySegmenter(Segmenter):
    """Three convolutions; enough to overfit a synthetic disc."""

    card = TOY_CARD

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {
            "in_channels": 1,
            "width": 8,
            "input_size": 32,
            "working_size": 0,
            "batch_size": 4,
            "loss": "dice_ce",
        }

    def build_module(self) -> nn.Module:
        w = int(self.config["width"])
        return nn.Sequential(
            nn.Conv2d(int(self.config["in_channels"]), w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(w, self.num_classes, 1),
        )

    def train_defaults(self) -> dict[str, Any]:
        return {"lr": 1e-2, "batch_size": 4, "augment": "light"}
