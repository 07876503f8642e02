"""The :class:`Segmenter`: one network with its config, weights, preset and class names.

Subclasses (one per network, in ``engine/networks/``) build the torch module and, where the
network differs from a plain 2-D supervised model, override the hooks marked below. Everything
here is numpy in, numpy out; napari never appears.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from napari_medseg.engine.checkpoint import Checkpoint, load_state_strict, save_checkpoint
from napari_medseg.engine.device import resolve_device, tune_cpu_allocator
from napari_medseg.engine.image import PreparedImage, prepare_image
from napari_medseg.engine.preprocess import IntensityPreset, resolve_preset
from napari_medseg.engine.progress import Progress
from napari_medseg.engine.registry import ModelCard
from napari_medseg.engine.run_options import RunOption, RunRecipe, apply_run_options, find_recipe
from napari_medseg.engine.runner import drain, run_slices

log = logging.getLogger(__name__)


class NotTrainedError(RuntimeError):
    """The network has random weights and must be trained (or loaded) before segmenting."""


class NotPromptableError(TypeError):
    """The network does not take point or box prompts."""


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Make (B, C, ...) have ``channels`` channels: grey is repeated, RGB averaged to grey."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, *x.shape[2:]).contiguous()
    if channels == 1:
        return x.mean(1, keepdim=True)
    raise ValueError(f"cannot map {c} input channels to the network's {channels}")


class Segmenter:
    """Base class of every network's runner. Use :func:`napari_medseg.load_model` to make one.

    Attributes:
        card: The network's :class:`ModelCard` (class attribute).
        config: Full network config (JSON-serialisable); saved in checkpoints.
        module: The torch network, on :attr:`device`, in eval mode outside training.
        device: Where the network runs.
        preset: Intensity preset fixed by training or by the user; ``None`` means auto-detect
            per image.
        class_names: Names of the output classes, index 0 = background.
        trained: Whether the weights are usable (loaded, pretrained or fine-tuned).
        provenance: How the current weights were made (saved in checkpoints).
    """

    card: ClassVar[ModelCard]
    RUN_OPTIONS: ClassVar[tuple[RunOption, ...]] = ()
    RUN_RECIPES: ClassVar[tuple[RunRecipe, ...]] = ()

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "auto",
        preset: str | IntensityPreset | None = "auto",
        class_names: Sequence[str] | None = None,
        recipe: str | None = None,
        **options: Any,
    ) -> None:
        """Build the network from its defaults, then ``config``, ``recipe`` and ``options``.

        Args:
            config: Saved settings (e.g. a checkpoint's) over :meth:`default_config`.
            device: ``"auto"`` (CUDA → MPS → CPU) or a torch device.
            preset: Intensity preset; ``"auto"``/``None`` detects it per image.
            class_names: Output class names, index 0 = background.
            recipe: Name of one of :attr:`RUN_RECIPES`; its values go over ``config``.
            **options: Config keys over everything else; run options are checked.

        Raises:
            TypeError: An option the network does not have.
            ValueError: A run option out of range / not a choice, or an unknown recipe.
        """
        tune_cpu_allocator()
        if recipe is not None:  # a named set of run options; explicit options win over it
            try:
                options = {**find_recipe(self.RUN_RECIPES, recipe).as_dict(), **options}
            except ValueError as err:
                raise ValueError(f"{self.card.name}: {err}") from None
        unknown = set(options) - set(self.default_config())
        if unknown:
            raise TypeError(
                f"{self.card.name}: unknown option(s) {sorted(unknown)}; "
                f"known: {sorted(self.default_config())}"
            )
        given = {o.key: options[o.key] for o in self.run_options() if o.key in options}
        try:  # run options get the same checks as in the widget (range, type, choices)
            options = apply_run_options(self.run_options(), options, given)
        except ValueError as err:
            raise ValueError(f"{self.card.name}: {err}") from None
        self.config: dict[str, Any] = {**self.default_config(), **(config or {}), **options}
        self.device = resolve_device(device)
        self.preset: IntensityPreset | None = (
            None if preset in (None, "auto") else resolve_preset(preset, np.zeros(1), False)
        )
        self.class_names: list[str] = list(class_names or self.default_class_names())
        self.trained = not self.card.needs_labels
        self.provenance: dict[str, Any] = {}
        self.module: nn.Module = self.build_module().to(self.device).eval()

    # ----------------------------------------------------------------- hooks to override
    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """The network's configurable options and their defaults."""
        return {}

    @classmethod
    def run_options(cls) -> tuple[RunOption, ...]:
        """Config keys a user may change before segmenting (the Segment widget's form).

        Subclasses list them in :attr:`RUN_OPTIONS`. Only options that act at segmentation
        time belong there: never ones that change trained weights' shapes or training (S³-Net's
        ``channels`` qualifies because it builds a new network for every image);
        :func:`~napari_medseg.engine.run_options.apply_run_options` checks values against them.
        """
        return cls.RUN_OPTIONS

    def default_class_names(self) -> list[str]:
        """Class names used before training decides them."""
        return ["background", "foreground"]

    def build_module(self) -> nn.Module:
        """Build the torch network from :attr:`config` (random or default weights)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        """Side length of the network's (square) input."""
        return int(self.config.get("input_size", self.card.input_size[-1]))

    @property
    def working_size(self) -> int:
        """Longest side a slice is resampled to before it meets the network."""
        return int(self.config.get("working_size") or self.input_size)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """Map preset-scaled (B, C, ...) in ``[0, 1]`` to what the network expects."""
        return match_channels(x, int(self.config.get("in_channels", 3)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in ``[0, 1]`` → (B, K, H, W) class logits (2-D networks)."""
        return self.module(self.network_input(x))

    def validation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits that training's validation scores (2-D networks); :meth:`logits` by default.

        A network whose :meth:`logits` adds test-time views may validate on one view instead,
        so that the weights a run keeps do not depend on an inference option.
        """
        return self.logits(x)

    # ----------------------------------------------------------------- segmentation
    def prepare(self, image: np.ndarray, channel_axis: int | None = None) -> PreparedImage:
        """Check an image and scale it with this model's preset (see :func:`prepare_image`)."""
        return prepare_image(image, channel_axis, self.preset or self.card.default_preset)

    def check_trained(self) -> None:
        """Raise :class:`NotTrainedError` with instructions if the weights are random."""
        if not self.trained:
            raise NotTrainedError(
                f"{self.card.name} has random weights: fine-tune it on labeled slices first "
                "(Fine-tune widget, Segmenter.finetune or `napari-medseg train`), or load a "
                "trained checkpoint"
            )

    def iter_segment(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        allow_untrained: bool = False,
    ) -> Generator[Progress, None, np.ndarray]:
        """Segment ``image`` step by step; see :meth:`segment`.

        Yields:
            :class:`Progress` per slice or tile (a cancel point).

        Returns:
            int32 labels of the input's spatial shape.
        """
        if not allow_untrained:
            self.check_trained()
        prep = self.prepare(image, channel_axis)
        self.module.eval()
        labels = yield from run_slices(
            prep.data,
            self.logits,
            self.input_size,
            self.working_size,
            self.device,
            batch_size=int(self.config.get("batch_size", 4)),
        )
        return (yield from self.iter_refine(labels.reshape(prep.spatial_shape), image, channel_axis))

    def iter_refine(
        self, labels: np.ndarray, image: np.ndarray, channel_axis: int | None
    ) -> Generator[Progress, None, np.ndarray]:
        """Hook after the slice runner: refine ``labels`` (the input's spatial shape).

        The base class returns them as they are; HF-SAM re-prompts its own pieces here.

        Yields:
            :class:`Progress` records (cancel points) of any extra work.
        """
        return labels
        yield  # pragma: no cover - makes this a generator

    def segment(
        self, image: np.ndarray, channel_axis: int | None = None, allow_untrained: bool = False
    ) -> np.ndarray:
        """Automatic segmentation.

        Args:
            image: (Y, X), (Y, X, C) or (Z, Y, X) of any numeric dtype (see
                :func:`napari_medseg.engine.image.to_channel_last`).
            channel_axis: Axis of RGB channels, if any.
            allow_untrained: Run even with random weights (tests, benchmarks).

        Returns:
            int32 array of the input's spatial shape; 0 = background, class ids otherwise
            (cluster ids for s3-net).
        """
        return drain(self.iter_segment(image, channel_axis, allow_untrained))  # type: ignore[return-value]

    def prompt(self, image: np.ndarray, channel_axis: int | None = None) -> Any:
        """Open a prompt session on ``image`` (promptable networks only)."""
        raise NotPromptableError(f"{self.card.name} does not take point or box prompts; use hf-sam")

    # ----------------------------------------------------------------- training hooks
    def finetune(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        labels: np.ndarray | Sequence[np.ndarray],
        unlabeled: Sequence[np.ndarray] | None = None,
        steps: int | None = None,
        **options: Any,
    ) -> Iterator[Any]:
        """Fine-tune on labeled data; a generator of :class:`TrainProgress` records.

        See :func:`napari_medseg.engine.train.loop.finetune` for the options.
        """
        if not self.card.trainable:
            raise TypeError(f"{self.card.name} is not trained on labels")
        from napari_medseg.engine.train.loop import finetune

        return finetune(self, images, labels, unlabeled=unlabeled, steps=steps, **options)

    def prepare_for_training(self, data: Any) -> None:
        """Adopt the training data's classes and preset before the first step.

        The default rebuilds the whole network (fresh weights) when the number of classes
        changes; networks with pretrained parts override this to replace only their head.
        """
        self.preset = data.preset
        if data.num_classes != self.num_classes:
            self.class_names = list(data.class_names)
            self.module = self.build_module().to(self.device)
        self.class_names = list(data.class_names)

    def train_defaults(self) -> dict[str, Any]:
        """Per-network defaults for :class:`TrainOptions` (overridden by the caller's options)."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """Parameters the optimiser updates (default: all that require grad).

        A network may instead return torch parameter groups; a group's ``lr_scale`` multiplies
        the scheduled learning rate (e.g. a smaller rate for pretrained weights).
        """
        return [p for p in self.module.parameters() if p.requires_grad]

    def extra_validation(self, val: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Network-specific validation metrics beside ``val_dice`` (default: none).

        Args:
            val: Validation pairs: (C, Y, X) float image in [0, 1], (Y, X) int labels.
        """
        return {}

    def selection_score(self, metrics: dict[str, float]) -> float | None:
        """The validation figure that decides which weights are kept (higher is better)."""
        return metrics.get("val_dice")

    def training_note(self) -> str:
        """A sentence for the user about the trained model (shown after fine-tuning), or ""."""
        return ""

    def make_train_data(self, images: Any, labels: Any, unlabeled: Any, options: Any) -> Any:
        """Build the training data object (default: 2-D slices, see engine/train/data.py)."""
        from napari_medseg.engine.train.data import SliceData

        return SliceData.from_arrays(self, images, labels, unlabeled, options)

    def training_loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch; default Dice + CE on ``batch["image"]``/``batch["label"]``.

        Args:
            module: The network (``self.module``; passed so DDP can wrap the call).
            batch: ``image`` (B, C, H, W) float in ``[0, 1]``; ``label`` (B, H, W) int64.

        Returns:
            (scalar loss, named float terms for the progress record).
        """
        from napari_medseg.engine.train.losses import segmentation_loss

        logits = module(self.network_input(batch["image"]))
        return segmentation_loss(logits, batch["label"], str(self.config.get("loss", "dice_ce")))

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that go into a checkpoint (default: the whole state dict)."""
        return dict(self.module.state_dict())

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Inverse of :meth:`checkpoint_tensors`; raises CheckpointError on mismatch."""
        load_state_strict(self.module, tensors, source)

    def checkpoint_extra(self) -> dict[str, Any]:
        """Network-specific metadata for the checkpoint."""
        return {}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save config, weights, preset, class names and provenance to one .safetensors file."""
        return save_checkpoint(
            path,
            Checkpoint(
                model=self.card.name,
                config=self.config,
                tensors=self.checkpoint_tensors(),
                preset=self.preset.to_json() if self.preset else None,
                class_names=self.class_names,
                provenance=self.provenance,
                extra=self.checkpoint_extra(),
            ),
        )

    @staticmethod
    def checkpoint_kwargs(ckpt: Checkpoint, options: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments that rebuild ``ckpt``'s segmenter with ``options`` on top.

        ``options`` may hold ``preset``, ``class_names`` and ``recipe`` besides config keys;
        config keys get the same checks as in :func:`~napari_medseg.load_model` by name.
        """
        opts = dict(options)
        saved_preset = IntensityPreset.from_json(ckpt.preset) if ckpt.preset else "auto"
        return {
            "config": dict(ckpt.config),
            "preset": opts.pop("preset", None) or saved_preset,
            "class_names": opts.pop("class_names", None) or ckpt.class_names or None,
            **opts,
        }

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, source: str, device: str | torch.device | None = "auto", **options: Any
    ) -> Segmenter:
        """Rebuild a segmenter from a loaded checkpoint (``options`` override the config)."""
        seg = cls(device=device, **cls.checkpoint_kwargs(ckpt, options))
        seg.load_checkpoint_tensors(ckpt.tensors, source)
        seg.provenance = dict(ckpt.provenance)
        seg.trained = True
        return seg

    def clone(self) -> Segmenter:
        """A deep copy (e.g. to keep the base model beside a fine-tuned one)."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.card.name} classes={self.num_classes} "
            f"device={self.device} trained={self.trained}>"
        )
