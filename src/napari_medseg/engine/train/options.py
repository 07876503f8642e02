"""Training options (one frozen dataclass) and the progress record the loop yields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

AUGMENT_PRESETS = ("none", "light", "default", "shift", "strong", "paper")
ORIENTATIONS = ("auto", "any", "upright")


@dataclass(frozen=True)
class TrainOptions:
    """Options of :func:`napari_medseg.engine.train.loop.finetune`.

    Each network supplies its own defaults (``Segmenter.train_defaults``); the caller's values
    win. ``epochs`` (passes over the labeled samples) is turned into steps when ``steps`` is 0.

    Attributes:
        steps: Optimiser steps (0: derive from ``epochs``).
        epochs: Passes over the labeled samples, used when ``steps`` is 0.
        lr: Peak learning rate.
        schedule: ``"cosine"``, ``"poly"`` (power 0.9) or ``"constant"``.
        warmup: Linear warm-up steps.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: Weight decay.
        batch_size: Samples per step (per process under torchrun).
        crop_size: Training crop side (2-D) or edge (3-D); 0 = the network's input size.
        augment: ``"none"``, ``"light"``, ``"default"``, ``"shift"`` (default plus a random
            translation of up to 20 % of each side, 2-D only), ``"strong"`` or ``"paper"``
            (HF-SAM's own views: one of a ±20° turn, a zoomed crop or an elastic warp).
        orientation: Which orientations 2-D training views take. ``"any"``: the eight quarter
            turns and flips (endoscopy, dermoscopy, microscopy: no side is up);
            ``"upright"``: left-right flips only, the top stays the top (ultrasound, where the
            probe is at the top and shadows fall below, and radiology slices);
            ``"auto"``: upright for grayscale images (no channel axis, or all channels
            equal), any for colour.
        val_fraction: Share of labeled slices held out (at least one when there are ≥ 2).
        val_every: Validate every this many steps (0: ten times per run).
        seed: Seed for weights of new layers, sampling and augmentation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
        amp: Mixed precision on CUDA (float16 autocast with loss scaling).
        cpu_amp: bfloat16 autocast when training on a CPU (weights, optimiser and validation
            stay float32). About twice as fast on CPUs with native bf16 (AVX-512 BF16, AMX);
            networks opt in through their defaults (HF-SAM does when the CPU has it).
        grad_clip: Max gradient norm (0: off).
        ema: Decay of an exponential moving average of the weights (0: off; e.g. 0.99).
            When on, validation, the kept best weights and the checkpoint are the averaged
            weights (engine/train/weight_average.py).
        checkpoint: Path where the best model so far is written (``None``: not written).
        resume: Continue from ``checkpoint`` if it exists (CLI training).
        extra: Network-specific options (e.g. STS-Net's small-target augmentation).
    """

    steps: int = 0
    epochs: int = 0
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    batch_size: int = 4
    crop_size: int = 0
    augment: str = "default"
    orientation: str = "any"
    val_fraction: float = 0.2
    val_every: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    cpu_amp: bool = False
    grad_clip: float = 0.0
    ema: float = 0.0
    checkpoint: str | None = None
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, defaults: dict[str, Any], overrides: dict[str, Any]) -> TrainOptions:
        """Merge network defaults and caller overrides; unknown keys go to ``extra``.

        Raises:
            ValueError: For a value out of range.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        merged: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for source in (defaults, overrides):
            for key, value in source.items():
                if value is None and key != "checkpoint":
                    continue
                if key == "extra":
                    extra.update(value)
                elif key in names:
                    merged[key] = value
                else:
                    extra[key] = value
        opts = cls(**merged, extra=extra)
        opts.check()
        return opts

    def check(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.steps < 0 or self.epochs < 0:
            raise ValueError("steps and epochs must not be negative")
        if self.steps == 0 and self.epochs == 0:
            raise ValueError("give steps or epochs")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.schedule not in ("cosine", "poly", "constant"):
            raise ValueError(f"schedule must be cosine, poly or constant, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}, got {self.augment!r}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(
                f"orientation must be one of {', '.join(ORIENTATIONS)}, got {self.orientation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (for checkpoint provenance)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainProgress:
    """One record yielded by the training loop; every yield is a cancel point.

    Attributes:
        step: Optimiser steps done.
        total: Steps in all.
        loss: Total loss of the last step.
        terms: Named loss terms of the last step.
        metrics: Latest validation figures (e.g. ``{"val_dice": 0.83}``), empty before the
            first validation.
        best: Best validation Dice so far (``nan`` before the first validation).
        elapsed: Seconds since the start.
        eta: Estimated seconds left.
        message: Short status text; also carries notes such as "validation on augmented views".
        done: True on the last record.
    """

    step: int
    total: int
    loss: float
    terms: dict[str, float]
    metrics: dict[str, float]
    best: float
    elapsed: float
    eta: float
    message: str = ""
    done: bool = False


DEFAULT_STEPS = 200  # when a network's defaults name no step count


def network_train_defaults(name: str) -> TrainOptions:
    """Return a network's training defaults as a full :class:`TrainOptions` (steps filled in).

    ``train_defaults`` is an instance method; a bare instance with only the default config is
    enough for it and avoids building (and loading the weights of) the network on the UI
    thread. If a network's hook needs more, a real CPU instance is built instead.
    """
    # Imported here: the registry imports the network modules, which import this module.
    from napari_medseg.engine.registry import segmenter_class

    cls = segmenter_class(name)
    try:
        probe = cls.__new__(cls)
        probe.config = cls.default_config()
        probe.class_names = ["background", "foreground"]
        defaults = dict(probe.train_defaults())
    except Exception:  # the hook needs a built module
        defaults = dict(cls(device="cpu").train_defaults())
    base = TrainOptions()
    fields = {f.name for f in dataclasses.fields(TrainOptions)} - {"extra"}
    values = {k: v for k, v in defaults.items() if k in fields}
    if not values.get("steps"):
        values["steps"] = DEFAULT_STEPS
    return dataclasses.replace(base, **values)
