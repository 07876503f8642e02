"""Exponential moving average of a network's weights during training (option ``ema``).

With two labeled volumes or five labeled slices the weights of the last step depend a lot on
the last batches; the average of the recent weights is a smoother, usually better model
(Polyak averaging, the "mean teacher" of semi-supervised segmentation). The loop validates,
keeps and saves the averaged weights; the optimiser keeps stepping the live ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """Moving average of a module's trained weights and floating-point buffers (norm stats).

    The decay of update ``t`` (1-based) is ``min(decay, (1 + t) / (10 + t))``, so the first
    updates are not dominated by the starting weights.

    Args:
        module: The network being trained; its parameters must not be replaced afterwards.
        decay: In ``(0, 1)``; 0.99 averages over roughly the last hundred steps.
        params: The parameters the optimiser steps (default: every parameter).

    Raises:
        ValueError: ``decay`` outside ``(0, 1)``.
    """

    def __init__(self, module: nn.Module, decay: float, params: Iterable[nn.Parameter] | None = None) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        # Only what changes is averaged: the optimised parameters (all of them when ``params``
        # is None) and the floating-point buffers (norm statistics). A frozen SAM encoder is
        # not copied.
        chosen = None if params is None else {id(p) for p in params}
        names = {n for n, p in module.named_parameters() if chosen is None or id(p) in chosen}
        names |= {n for n, _ in module.named_buffers()}
        state = module.state_dict()  # detached views of the live tensors
        self._live = {k: v for k, v in state.items() if k in names and v.is_floating_point()}
        self.average = {k: v.detach().clone() for k, v in self._live.items()}

    def update(self) -> None:
        """Fold the live weights into the average (after each optimiser step)."""
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for k, avg in self.average.items():
                avg.lerp_(self._live[k], 1.0 - keep)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Put the averaged values into the module for the block; the live ones come back after."""
        with torch.no_grad():
            saved = {k: v.clone() for k, v in self._live.items()}
            for k, avg in self.average.items():
                self._live[k].copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    self._live[k].copy_(v)
