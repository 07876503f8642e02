"""EFS-MedSeg engine: 3-D few-shot segmentation from two atlases and a few unlabeled volumes.

Training goes through the shared loop (engine/train/loop.py); this module supplies the data
(patch sampling with the regional switch, engine/train/volume_data.py), the loss (supervised
Dice + CE, Dice-weighted VAE reconstruction + KL, anatomy-guided contrast) and 3-D
sliding-window inference at the training spacing, returned at the input's own shape.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_medseg.engine.components import keep_largest, single_piece_classes, single_piece_union
from napari_medseg.engine.image import ImageError
from napari_medseg.engine.progress import Progress
from napari_medseg.engine.registry import ModelCard, register
from napari_medseg.engine.run_options import RunOption
from napari_medseg.engine.runner import drain, resize, sliding_window
from napari_medseg.engine.segmenter import Segmenter
from napari_medseg.engine.train.volume_geometry import conv_kernels, is_unit
from napari_medseg.engine.tta import resolve_views
from napari_medseg.models.efs_medseg import EfsMedSegNet, default_pools

log = logging.getLogger(__name__)

CARD = ModelCard(
    name="efs-medseg",
    title="EFS-MedSeg (3-D few-shot, VAE + regional switch + self-contrast)",
    paper=(
        "Y. Zhou, F. Zhou, F. Xi, Y. Liu, Y. Peng, D. E. Carlson, L. Tu, Efficient few-shot "
        "medical image segmentation via self-supervised variational autoencoder, Medical Image "
        "Analysis 2025 (re-implemented from the abstract; code unpublished)"
    ),
    doi="10.1016/j.media.2025.103637",
    spatial_dims=3,
    promptable=False,
    needs_labels=True,
    trainable=True,
    input_size=(32, 64, 64),
    default_preset="auto",
    summary=(
        "3-D U-Net trained from two labeled volumes (atlases) and a few unlabeled ones, with a "
        "random regional switch between atlases, a Dice-weighted VAE reconstruction branch and "
        "an anatomy-guided contrastive head. Segments whole volumes with a sliding window."
    ),
    docs="docs/models/efs-medseg.md",
    tags=("3d", "few-shot", "semi-supervised"),
)

# Size presets: "cpu" trains in minutes on 2 cores; "gpu" is close to the predecessor's scale.
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {"widths": [8, 16, 32, 64], "patch_voxels": 16 * 48 * 48, "max_volume_voxels": 250_000},
    "gpu": {"widths": [16, 32, 64, 128, 256], "patch_voxels": 128 * 128 * 128, "max_volume_voxels": 0},
}


class EfsMedSeg(Segmenter):
    """Runner of the EFS-MedSeg network (see docs/models/efs-medseg.md)."""

    card = CARD

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {
            "in_channels": 1,
            "scale": "auto",  # "cpu", "gpu" or "auto" (by device); fills the None entries below
            "widths": None,
            "patch_voxels": None,
            "max_volume_voxels": None,
            # Geometry decided by training (None before): spacing, patch (z, y, x), pools.
            "target_spacing": None,
            "patch_size": None,
            "pools": None,
            "spacing": None,  # default spacing of input volumes when segment() gets none
            # Used instead of a stated (1, 1, 1) (a file without voxel size) when training found
            # such atlases anisotropic (volume_geometry.assume_spacing); None = take it as stated.
            "assumed_spacing": None,
            "overlap": 0.25,
            # In-plane quarter turns averaged at inference (1 = off, 2 or 4). "auto": 4 when
            # training rotated patches in plane by 90° or more (anisotropic data), else 1.
            "tta": "auto",
            "tta_turns": None,  # what "auto" resolved to, set by training
            "batch_size": 2,
            "max_classes": 16,
            # The three components, each switchable (ablations).
            "use_switch": True,
            "use_vae": True,
            "use_contrast": True,
            "switch_prob": 0.8,
            "switch_regions": 2,
            "switch_smooth": 2.0,
            "switch_self_prob": 0.3,
            # Random rotation/zoom of training patches (engine/train/spatial_aug.py); 0 = off.
            "spatial_prob": 0.7,
            "spatial_rotate": 180.0,  # in-plane degrees for anisotropic volumes (3-D: 30)
            "spatial_scale": [0.7, 1.4],
            "spatial_stretch": 0.0,  # per-axis zoom log-ratio (0 = isotropic zoom)
            "spatial_elastic": 0.0,  # elastic displacement SD in mm (0 = off)
            "spatial_slice_shift": 0.0,  # per-slice in-plane shift SD in mm, thick slices (0 = off)
            "spatial_contract": 0.0,  # share of atlas patches contracted about a structure (0 = off)
            "spatial_contract_strength": 0.6,
            # Share of training views that first get a random monotone intensity curve
            # (engine/train/volume_intensity.py random_curve); 0 = off.
            "intensity_curve": 0.0,
            # Share of training views darkened by a random gain in [0.4, 1]
            # (engine/train/volume_intensity.py intensity_view); 0 = off.
            "intensity_gain": 0.0,
            # Share of training views multiplied by a smooth random bias field (coil shading,
            # engine/train/volume_intensity.py bias_field); 0 = off.
            "intensity_bias": 0.0,
            # Share of training views first passed through a random shallow network (GIN,
            # engine/train/volume_intensity.py random_network); 0 = off.
            "intensity_network": 0.0,
            # Share of training (and atlas-validation) views blurred or coarsened in plane
            # first (nnU-Net's blur / low-resolution; volume_intensity.blur_view); 0 = off.
            "intensity_blur": 0.0,
            # Share of atlas patches whose labeled structures get their own random gains
            # (engine/train/volume_intensity.py class_gain); 0 = off.
            "intensity_class_gain": 0.0,
            # Keep only the largest piece of classes that are one piece in every atlas:
            # "auto" (rule learned from the atlases), True (every class) or False. Unless
            # False, the piece holding all classes together is kept first when the atlases'
            # foreground is one piece (single_piece_union; engine/components.py).
            "keep_largest": "auto",
            "single_piece_classes": None,  # set by training ("auto")
            "single_piece_union": False,  # set by training; False for older checkpoints
            "latent": 0,
            "recon_weight": 1.0,
            "recon_alpha": 4.0,
            "kl_weight": 1e-3,
            "proj_dim": 32,
            "contrast_level": 1,
            "contrast_weight": 0.1,
            "contrast_temperature": 0.5,
            "contrast_samples": 64,
            "contrast_stopgrad": True,
            "unlabeled_per_batch": 1,
            "patch_fg_prob": 0.5,  # share of atlas patches centred on a labeled voxel (else uniform)
            "pseudo_threshold": 0.8,
            # Cross-entropy on unlabeled patches against the other view's confident prediction
            # (not in the abstract; 0 = off).
            "pseudo_weight": 0.0,
            # Bidirectional copy-paste between an atlas patch and an unlabeled patch (BCP,
            # Bai et al., CVPR 2023; not in the abstract): one mixed patch per unlabeled one,
            # supervised by the atlas labels in the atlas part and by the other view's
            # confident prediction (weight ``copy_paste_pseudo``) in the unlabeled part; 0 = off.
            "copy_paste_weight": 0.0,
            "copy_paste_pseudo": 0.5,
            # Auxiliary Dice+CE at this many coarser decoder levels, weights 1/2 per level
            # (nnU-Net's deep supervision, not in the abstract); 0 = off.
            "deep_supervision": 0,
            # Dice term's denominator: "squared" (Σp² + Σt², V-Net / SAMed) or "plain"
            # (Σp + Σt, nnU-Net).
            "dice_denominator": "squared",
            # Plan 1-wide kernels along axes much coarser than the finest (nnU-Net's rule,
            # engine/train/volume_geometry.py conv_kernels); False: 3×3×3 everywhere. Held-out
            # ACDC, seeds 0-2: 0.631 / 0.644 / 0.623 vs 0.600 / 0.558 / 0.555, 25 % faster steps.
            "anisotropic_kernels": True,
            "kernels": None,  # per-level kernels decided by training (None: 3×3×3)
            # Local contrast normalisation of the input (models/efs_medseg.py LocalContrast3d):
            # Gaussian SD in mm (0 = off), "add" (image + normalised image) or "replace".
            "local_contrast": 0.0,
            "local_contrast_mode": "add",
            "local_contrast_sigma": None,  # in voxels of the target spacing, set by training
        }

    # Inference options of the Segment widget (figures: docs/models/efs-medseg.md).
    RUN_OPTIONS = (
        RunOption(
            "tta",
            "Quarter turns",
            "choice",
            "auto",
            "Average the logits over in-plane quarter turns. auto: 4 only for a model trained "
            "with in-plane turns (anisotropic volumes, ACDC +0.025 Dice); on other models the "
            "turned views were never seen and lower Dice (LA-2018 0.865 → 0.721). 4 turns "
            "cost 4× the time",
            choices=("auto", 1, 2, 4),
            choice_labels=("auto (as trained)", "off", "2 turns (0°, 90°)", "4 turns"),
        ),
        RunOption(
            "keep_largest",
            "Keep largest piece",
            "choice",
            "auto",
            "Keep only the largest predicted piece of a class. auto: only for classes that "
            "are one piece in every atlas (ACDC +0.025 Dice), after keeping the one piece "
            "that holds all structures together where the atlases' anatomy is one piece "
            "(ACDC a further +0.02); all: every class; off: never",
            choices=("auto", True, False),
            choice_labels=("auto (as trained)", "all classes", "off"),
        ),
    )

    def default_class_names(self) -> list[str]:
        return ["background", "foreground"]

    def _resolve_scale(self) -> None:
        scale = str(self.config.get("scale", "auto"))
        if scale == "auto":
            scale = "gpu" if self.device.type == "cuda" else "cpu"
        if scale not in SCALES:
            raise ValueError(f"efs-medseg: scale must be cpu, gpu or auto, got {scale!r}")
        for key, value in SCALES[scale].items():
            if self.config.get(key) is None:
                self.config[key] = value

    def build_module(self) -> nn.Module:
        self._resolve_scale()
        widths = [int(w) for w in self.config["widths"]]
        pools = self.config.get("pools") or default_pools(len(widths) - 1)
        return EfsMedSegNet(
            in_channels=int(self.config["in_channels"]),
            num_classes=self.num_classes,
            widths=widths,
            pools=pools,
            vae=bool(self.config["use_vae"]),
            latent=int(self.config["latent"]),
            contrast=bool(self.config["use_contrast"]),
            proj_dim=int(self.config["proj_dim"]),
            contrast_level=int(self.config["contrast_level"]),
            kernels=self.config.get("kernels"),
            deep_supervision=int(self.config.get("deep_supervision", 0)),
            local_contrast=self.config.get("local_contrast_sigma"),
            local_contrast_mode=str(self.config.get("local_contrast_mode", "add")),
        )

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        return x  # volumes are single-channel after prepare_image

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) in [0, 1] → (B, K, Z, Y, X)."""
        return self.module(x)

    @property
    def patch(self) -> tuple[int, int, int]:
        """Sliding-window / training patch (z, y, x) in voxels at the target spacing."""
        if self.config.get("patch_size"):
            return tuple(int(v) for v in self.config["patch_size"])  # type: ignore[return-value]
        return tuple(self.card.input_size)  # type: ignore[return-value]

    # ----------------------------------------------------------------- inference
    def volume_logits(self, x: torch.Tensor) -> Generator[Progress, None, torch.Tensor]:
        """Sliding-window logits of one (C, Z, Y, X) volume already at the target spacing."""
        return sliding_window(
            x, self.logits, self.patch, float(self.config["overlap"]), int(self.config["batch_size"])
        )

    def _tta_logits(self, x: torch.Tensor) -> Generator[Progress, None, torch.Tensor]:
        """Logits averaged over ``config["tta"]`` in-plane quarter turns of a (C, Z, Y, X) volume.

        Quarter turns are exact only when the two in-plane spacings are equal, so other volumes
        run once. "auto" uses the turns training resolved (``tta_turns``): only a model trained
        with in-plane rotations of 90° and more knows every turned view.
        """
        turns = resolve_views(self.config.get("tta", 1), self.config.get("tta_turns"))
        ts = self.config.get("target_spacing") or (1.0, 1.0, 1.0)
        if abs(float(ts[1]) - float(ts[2])) > 1e-6 * float(ts[1]):
            turns = 1
        total: torch.Tensor | None = None
        for t in range(turns):
            gen = self.volume_logits(torch.rot90(x, t, dims=(2, 3)))
            try:
                while True:
                    p = next(gen)
                    yield Progress(t * p.total + p.done, turns * p.total, p.message, p.info)
            except StopIteration as stop:
                lt = torch.rot90(stop.value, -t, dims=(2, 3))
            total = lt if total is None else total + lt
        return total / turns  # type: ignore[operator]

    def iter_segment(  # type: ignore[override]
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        allow_untrained: bool = False,
        spacing: Sequence[float] | None = None,
    ) -> Generator[Progress, None, np.ndarray]:
        """Segment a whole (Z, Y, X) volume; see :meth:`segment`.

        Yields:
            :class:`Progress` per batch of windows (a cancel point).

        Returns:
            int32 labels of the input's shape.
        """
        if not allow_untrained:
            self.check_trained()
        prep = self.prepare(image, channel_axis)
        if not prep.is_volume or prep.data.shape[0] < 2:
            raise ImageError(
                f"efs-medseg segments 3-D volumes (Z, Y, X); got spatial shape {prep.spatial_shape}. "
                "Use a 2-D network (sts-net, ms-lkseg, hf-sam) for single images"
            )
        src = tuple(float(s) for s in (spacing or self.config.get("spacing") or (1.0, 1.0, 1.0)))
        if len(src) != 3 or min(src) <= 0:
            raise ValueError(f"spacing must be three positive numbers (z, y, x), got {spacing}")
        if self.config.get("assumed_spacing") and is_unit(src):
            src = tuple(float(v) for v in self.config["assumed_spacing"])  # as in training
        target = tuple(self.config.get("target_spacing") or src)
        work = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(prep.spatial_shape, src, target))
        self.module.eval()
        # Gradients are off around each computation, never across a yield (grad mode is
        # thread-local; sliding_window switches it off around every network call itself).
        with torch.inference_mode():
            x = torch.from_numpy(np.moveaxis(prep.data, 1, 0)).to(self.device)  # (C, Z, Y, X)
            x = resize(x[None], work)[0]
        logits = yield from self._tta_logits(x)
        with torch.inference_mode():
            # Back to the input grid on logits (not labels) so boundaries stay smooth; one
            # class at a time to bound memory on large volumes.
            labels = torch.zeros(prep.spatial_shape, dtype=torch.int32)
            best = resize(logits[None, :1], prep.spatial_shape)[0, 0].cpu()
            for k in range(1, logits.shape[0]):
                lk = resize(logits[None, k : k + 1], prep.spatial_shape)[0, 0].cpu()
                better = lk > best
                labels[better] = k
                best = torch.where(better, lk, best)
        return self.postprocess(labels.numpy())

    def postprocess(self, labels: np.ndarray) -> np.ndarray:
        """Apply the ``keep_largest`` rule to an (Z, Y, X) int32 label map."""
        rule = self.config.get("keep_largest", "auto")
        union = bool(self.config.get("single_piece_union"))
        if rule is True:
            classes: list[int] = list(range(1, self.num_classes))
        elif rule == "auto":
            classes = list(self.config.get("single_piece_classes") or [])
        else:
            return labels
        return keep_largest(labels, classes, union) if classes or union else labels

    def segment(  # type: ignore[override]
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        allow_untrained: bool = False,
        spacing: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Segment a volume.

        Args:
            image: (Z, Y, X) of any numeric dtype.
            channel_axis: Channel axis, if any (grey volumes have none).
            allow_untrained: Run with random weights (tests).
            spacing: Voxel spacing (z, y, x), e.g. the napari layer's scale or NIfTI zooms
                reversed; ``None`` = ``config["spacing"]`` or 1 mm isotropic. A stated
                (1, 1, 1) becomes ``config["assumed_spacing"]`` when training assumed one
                (atlases without voxel size that looked anisotropic).

        Returns:
            int32 class ids of shape (Z, Y, X).
        """
        return drain(self.iter_segment(image, channel_axis, allow_untrained, spacing))  # type: ignore[return-value]

    # ----------------------------------------------------------------- training
    def train_defaults(self) -> dict[str, Any]:
        gpu = self.config.get("widths") == SCALES["gpu"]["widths"]
        return {
            "steps": 4000 if gpu else 1500,  # cpu: 13-22 min on one core (docs/models/efs-medseg.md)
            "lr": 2e-3,
            "schedule": "cosine",
            "warmup": 20,
            "batch_size": 2,
            "weight_decay": 1e-4,
            "grad_clip": 12.0,
            # Strong intensity views: held-out ACDC 0.584 vs 0.546 with "default" (1500 steps).
            "augment": "strong",
            # Averaged weights: held-out ACDC 0.600 / 0.558 / 0.555 vs 0.591 / 0.538 / 0.535 (seeds 0-2),
            # LA-2018 0.867 vs 0.865 (docs/models/efs-medseg.md).
            "ema": 0.995,
        }

    def make_train_data(self, images: Any, labels: Any, unlabeled: Any, options: Any) -> Any:
        from napari_medseg.engine.train.volume_data import VolumeData

        return VolumeData.from_arrays(self, images, labels, unlabeled, options)

    def prepare_for_training(self, data: Any) -> None:
        """Adopt classes, preset and geometry; rebuild the network when they change it."""
        form = self.config.get("dice_denominator", "squared")
        if form not in ("squared", "plain"):  # checked once here, not on every step
            raise ValueError(f'dice_denominator must be "squared" or "plain", got {form!r}')
        self.preset = data.preset
        plan = data.plan
        pools = [list(p) for p in plan.pools]
        same_pools = pools == [list(p) for p in self.module.pools]
        # Further training of a trained network on the same pools keeps its layout (kernels and
        # input layer) and so its weights; otherwise both are planned from the spacing.
        layout = ("kernels", "local_contrast_sigma")
        if self.trained and same_pools:
            kernels, sigma = (self.config.get(key) for key in layout)
        else:
            kernels, sigma = self._plan_layout(plan.target_spacing, plan.pools)
        rebuild = (
            data.num_classes != self.num_classes
            or not same_pools
            or [kernels, sigma] != [self.config.get(key) for key in layout]
        )
        self.class_names = list(data.class_names)
        self.config.update(
            target_spacing=list(plan.target_spacing),
            patch_size=list(plan.patch),
            pools=pools,
            kernels=kernels,
            local_contrast_sigma=sigma,
            single_piece_classes=single_piece_classes([lab for _, lab in data.atlases], data.num_classes),
            single_piece_union=single_piece_union([lab for _, lab in data.atlases]),
            tta_turns=4 if data.spatial.covers_quarter_turns(plan.target_spacing) else 1,
            assumed_spacing=list(data.assumed_spacing) if data.assumed_spacing else None,
        )
        if rebuild:
            self.module = self.build_module().to(self.device)

    def _plan_layout(
        self, spacing: Sequence[float], pools: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]] | None, list[float] | None]:
        """Per-level kernels and the local-contrast SD in voxels for a new network (None = off)."""
        kernels = None
        if self.config.get("anisotropic_kernels"):
            kernels = [list(k) for k in conv_kernels(spacing, pools)]
            if all(k == [3, 3, 3] for k in kernels):
                kernels = None  # near-isotropic: the plain network
        mm = float(self.config.get("local_contrast") or 0.0)
        sigma = [round(mm / float(sp), 4) for sp in spacing] if mm > 0 else None
        return kernels, sigma

    def training_loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Supervised Dice+CE, VAE (weighted recon + KL), anatomy contrast (see efs_medseg_train)."""
        from napari_medseg.engine.networks.efs_medseg_train import efs_loss

        return efs_loss(self, module, batch)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "target_spacing": self.config.get("target_spacing"),
            "patch_size": self.config.get("patch_size"),
        }


register(CARD, EfsMedSeg)
