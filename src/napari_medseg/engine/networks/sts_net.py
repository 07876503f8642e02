"""STS-Net in the engine: ECA-ResNeXt50 DeepLabV3 trained on labeled slices.

Registered as ``"sts-net"``. Supervised 2-D: train on painted slices (widget), arrays
(:meth:`Segmenter.finetune`) or folders (CLI), then segment slice by slice. The small-target
augmentation (``engine/train/small_target.py``) is on by default and switched with the
training option ``small_target=False``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from napari_medseg.engine.checkpoint import Checkpoint
from napari_medseg.engine.registry import ModelCard, register
from napari_medseg.engine.segmenter import Segmenter, match_channels

log = logging.getLogger(__name__)

# ImageNet statistics (torchvision); grey (1-channel stem) uses their means.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CARD = ModelCard(
    name="sts-net",
    title="STS-Net (small targets)",
    paper=(
        "L. Zhao, T. Wang, Y. Chen, X. Zhang, H. Tang, F. Lin, C. Li, Q. Li, T. Tan, D. Kang, "
        "T. Tong. A novel framework for segmentation of small targets in medical images. "
        "Scientific Reports 15 (2025)"
    ),
    doi="10.1038/s41598-025-94437-9",
    spatial_dims=2,
    promptable=False,
    needs_labels=True,
    trainable=True,
    input_size=(256, 256),
    weights=(
        "random initialisation, as released (train on labeled slices first); option "
        "pretrained=True starts the encoder from torchvision's ImageNet ResNeXt50-32x4d"
    ),
    weights_licence="none (ImageNet option: BSD-3-Clause, torchvision)",
    output="classes",
    summary=(
        "ResNeXt50-32x4d encoder with ECA channel attention and a DeepLabV3 (ASPP) head at "
        "output stride 8, trained with an online small-target augmentation (oversampling, "
        "flips, zoomed centre crops and lesion-centred crops). Train it on a few or many "
        "labeled slices, then segment 2-D images or volumes slice by slice."
    ),
    docs="docs/models/sts-net.md",
    tags=("2d", "supervised", "small-targets", "cnn"),
)


class STSNetSegmenter(Segmenter):
    """Runs and trains :class:`napari_medseg.models.sts_net.STSNet`.

    Config keys (see :meth:`default_config`): ``in_channels`` (3: grey repeated / RGB, 1: grey
    stem), ``input_size`` (network input side, multiple of 8), ``working_size`` (longest side
    a slice is resampled to; 0 = ``input_size``, larger values tile), ``pretrained``
    (ImageNet encoder), ``loss`` (``"ce"`` as released, ``"dice"``, ``"dice_ce"``,
    ``"focal"``), ``decoder_channels``, ``aspp_rates``, ``dropout``, ``output_stride`` (8 as released, 16
    faster), ``batch_size``
    (inference batch), ``max_classes``.
    """

    card = CARD

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {
            "in_channels": 3,
            "input_size": 256,
            "working_size": 0,
            "pretrained": False,
            "loss": "ce",
            "decoder_channels": 256,
            "aspp_rates": [12, 24, 36],
            "dropout": 0.5,
            "output_stride": 8,
            "batch_size": 4,
            "max_classes": 32,
        }

    # ----------------------------------------------------------------- network
    def build_module(self) -> nn.Module:
        """Build STS-Net for :attr:`num_classes`; load the ImageNet encoder if asked."""
        from napari_medseg.models.sts_net import STSNet

        stride = int(self.config["output_stride"])
        if int(self.config["input_size"]) % stride:
            raise ValueError(f"input_size must be a multiple of {stride}, got {self.config['input_size']}")
        in_ch = int(self.config["in_channels"])
        if in_ch not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_ch}")
        net = STSNet(
            num_classes=self.num_classes,
            in_channels=in_ch,
            decoder_channels=int(self.config["decoder_channels"]),
            rates=tuple(int(r) for r in self.config["aspp_rates"]),
            dropout=float(self.config["dropout"]),
            output_stride=stride,
        )
        if self.config.get("pretrained"):
            from napari_medseg.engine.weights import fetch_weights

            path = fetch_weights("resnext50_32x4d_imagenet")
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.encoder.load_imagenet(state)
            log.info("STS-Net encoder initialised from ImageNet weights %s", path.name)
        return net

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in ``[0, 1]`` → channel-matched, ImageNet-normalised input.

        The same mapping serves training and inference (the release divided by 1023 in
        training and by 255 in evaluation; see the docs).
        """
        in_ch = int(self.config["in_channels"])
        x = match_channels(x, in_ch)
        if in_ch == 3:
            mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        else:
            mean = x.new_tensor([sum(IMAGENET_MEAN) / 3]).view(1, 1, 1, 1)
            std = x.new_tensor([sum(IMAGENET_STD) / 3]).view(1, 1, 1, 1)
        return (x - mean) / std

    # ----------------------------------------------------------------- training
    def train_defaults(self) -> dict[str, Any]:
        """AdamW 1e-4 (weight decay 0.01), cosine, batch 4, 100 epochs, as released."""
        return {
            "lr": 1e-4,
            "optimizer": "adamw",
            "weight_decay": 1e-2,
            "schedule": "cosine",
            "batch_size": 4,
            "epochs": 100,
            "augment": "default",
            "small_target": True,
        }

    def make_train_data(self, images: Any, labels: Any, unlabeled: Any, options: Any) -> Any:
        """Labeled 2-D slices with the small-target augmentation in front of the generic one.

        ``options.extra`` keys: ``small_target`` (bool or dict) and ``small_target_<field>``
        (see :class:`napari_medseg.engine.train.small_target.SmallTargetConfig`).
        """
        from napari_medseg.engine.train.small_target import SmallTargetConfig, SmallTargetSliceData

        # The loss is a training choice too: accept it as a training option (CLI --option).
        if "loss" in options.extra:
            from napari_medseg.engine.train.losses import LOSSES

            if options.extra["loss"] not in LOSSES:
                raise ValueError(f"unknown loss {options.extra['loss']!r}; choose one of {LOSSES}")
            self.config["loss"] = str(options.extra["loss"])
        cfg = SmallTargetConfig.from_extra(options.extra)
        return SmallTargetSliceData.build(self, images, labels, unlabeled, options, cfg)

    def prepare_for_training(self, data: Any) -> None:
        """Adopt the data's preset and classes; a new class count replaces only the head."""
        self.preset = data.preset
        if data.num_classes != self.num_classes:
            old = self.module.head  # type: ignore[union-attr]
            self.module.head = nn.Conv2d(old.in_channels, data.num_classes, 1).to(old.weight.device)  # type: ignore[union-attr]
        self.class_names = list(data.class_names)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_extra(self) -> dict[str, Any]:
        """Where the encoder started from (the checkpoint holds all weights either way)."""
        return {"encoder_init": "imagenet" if self.config.get("pretrained") else "random"}

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, source: str, device: str | torch.device | None = "auto", **options: Any
    ) -> Segmenter:
        """Rebuild from a checkpoint without fetching ImageNet weights (they are overwritten)."""
        config = {**ckpt.config, **options}
        pretrained = bool(config.get("pretrained"))
        seg = super().from_checkpoint(ckpt, source, device, **{**options, "pretrained": False})
        seg.config["pretrained"] = pretrained
        return seg


register(CARD, STSNetSegmenter)
