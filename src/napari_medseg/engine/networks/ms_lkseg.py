"""MS-LKSeg in the engine: config, training defaults and fused inference.

Training and checkpoints always use the unfused (training-form) network held in
:attr:`MSLKSegSegmenter.module`. Inference (``segment``, validation during training) runs a
re-parameterised copy (:meth:`MSLKSeg.fuse`) that is rebuilt whenever the weights change, so
saving, loading and further training never see fused weights.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from napari_medseg.engine.checkpoint import load_state_strict
from napari_medseg.engine.registry import ModelCard, register
from napari_medseg.engine.segmenter import Segmenter
from napari_medseg.models.ms_lkseg import MSLKSeg

log = logging.getLogger(__name__)

CARD = ModelCard(
    name="ms-lkseg",
    title="MS-LKSeg (MIS blocks + large-kernel skips)",
    paper=(
        "B. Li, D. Niu, R. Wang, B. Wang, H. Liu, R. Li, X. Guo, W. Li, MS-LKSeg, "
        "Biomedical Signal Processing and Control, 2025"
    ),
    doi="10.1016/j.bspc.2025.108635",
    spatial_dims=2,
    promptable=False,
    needs_labels=True,
    trainable=True,
    input_size=(256, 256),
    summary=(
        "Supervised 2-D U-Net whose encoder uses dynamic convolution with SCSA-style spatial "
        "and channel attention (MIS blocks) and whose skips use re-parameterised 21×21 "
        "depthwise convolutions. Train it on a few painted slices, then segment. "
        "Reconstructed from the paper's figures (no official code)."
    ),
    docs="docs/models/ms-lkseg.md",
    tags=("2d", "supervised", "few-shot", "reparameterised"),
)

# Keys of the config that are MSLKSeg constructor arguments.
_MODEL_KEYS = (
    "widths",
    "heads",
    "mie_kernels",
    "midm_window",
    "dyconv_kernels",
    "dyconv_temperature",
    "dyconv_routing",
    "ld_kernel",
    "ld_small_kernel",
    "upsample",
)


def _version_key(module: nn.Module) -> tuple[Any, ...]:
    """Changes whenever any parameter or buffer of ``module`` is modified in place or replaced."""
    return (id(module),) + tuple((id(t), t._version) for t in (*module.parameters(), *module.buffers()))


class MSLKSegSegmenter(Segmenter):
    """Runner of :class:`MSLKSeg`; see :meth:`default_config` for the options."""

    card = CARD

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fused: nn.Module | None = None
        self._fused_key: tuple[Any, ...] | None = None
        super().__init__(*args, **kwargs)

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """Options (all JSON-serialisable).

        in_channels: 3 (grey images are repeated). widths: channels of the 5 encoder stages.
        heads: MIDM heads per stage (``None``: one per 32 channels). mie_kernels: MIE 1-D
        kernels. midm_window: MIDM pooling window. dyconv_*: dynamic-conv experts, softmax
        temperature, routing (``"softmax"`` = DynamicConv, ``"sigmoid"`` = CondConv).
        ld_kernel / ld_small_kernel: LD block kernels. upsample: ``"bilinear"`` or
        ``"transposed"``. fuse: run inference on the re-parameterised network. input_size,
        working_size (0 = input_size), batch_size (inference), loss.
        """
        return {
            "in_channels": 3,
            "widths": [16, 32, 64, 128, 256],
            "heads": None,
            "mie_kernels": [3, 5, 7, 9],
            "midm_window": 7,
            "dyconv_kernels": 4,
            "dyconv_temperature": 4.0,
            "dyconv_routing": "softmax",
            "ld_kernel": 21,
            "ld_small_kernel": 3,
            "upsample": "bilinear",
            "fuse": True,
            "input_size": 256,
            "working_size": 0,
            "batch_size": 4,
            "loss": "dice_ce",
            "max_classes": 32,
        }

    def build_module(self) -> nn.Module:
        kwargs = {k: self.config[k] for k in _MODEL_KEYS if self.config.get(k) is not None}
        for k in ("widths", "heads", "mie_kernels"):
            if k in kwargs:
                kwargs[k] = tuple(int(v) for v in kwargs[k])
        if isinstance(kwargs.get("ld_kernel"), list):
            kwargs["ld_kernel"] = tuple(int(v) for v in kwargs["ld_kernel"])
        self._fused = None
        return MSLKSeg(int(self.config["in_channels"]), self.num_classes, **kwargs)

    def inference_module(self) -> nn.Module:
        """The network used for inference: a fused copy of :attr:`module` (cached).

        The cache is rebuilt when the module is replaced or any weight or BN statistic
        changes (optimiser steps and ``load_state_dict`` bump tensor versions).
        """
        if not self.config.get("fuse", True) or getattr(self.module, "is_fused", False):
            return self.module
        key = _version_key(self.module)
        if self._fused is None or key != self._fused_key:
            fused = copy.deepcopy(self.module).eval()
            fused.fuse()  # type: ignore[operator]
            for p in fused.parameters():
                p.requires_grad_(False)
            self._fused, self._fused_key = fused, key
        return self._fused

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in ``[0, 1]`` → (B, K, H, W); fused network unless training."""
        net = self.module if self.module.training else self.inference_module()
        return net(self.network_input(x))

    def train_defaults(self) -> dict[str, Any]:
        """Few-shot CPU defaults: AdamW 2e-3, cosine, batch 4, 300 steps, default augmentation."""
        return {
            "steps": 300,
            "lr": 2e-3,
            "optimizer": "adamw",
            "weight_decay": 1e-4,
            "schedule": "cosine",
            "warmup": 10,
            "batch_size": 4,
            "augment": "default",
            "grad_clip": 5.0,
        }

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load training-form weights; a fused state (from ``module.fuse()``) is accepted too."""
        fused_state = any(".dw.fused." in k for k in tensors)
        if fused_state and not getattr(self.module, "is_fused", False):
            self.module.fuse()  # type: ignore[operator]
        load_state_strict(self.module, tensors, source)
        self._fused = None

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"fused": bool(getattr(self.module, "is_fused", False))}

    def __getstate__(self) -> dict[str, Any]:
        # clone() deep-copies the segmenter; the fused cache is rebuilt on demand.
        state = dict(self.__dict__)
        state["_fused"], state["_fused_key"] = None, None
        return state


register(CARD, MSLKSegSegmenter)
