"""Few-shot 3-D training data: labeled atlases and unlabeled volumes, sampled as patches.

Every volume is scaled with one intensity preset, resampled to a common voxel spacing and
padded to at least the patch size. A batch holds ``batch_size`` atlas patches (mostly made by
the random regional switch, see regional_switch.py), each in two intensity-augmented views of
the same geometry (for the self-contrastive loss), plus a few unlabeled patches, also in two
views. Geometry planning (target spacing, patch shape, per-axis pooling, resampling) is in
volume_geometry.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_medseg.engine.image import prepare_image
from napari_medseg.engine.metrics import dice_per_class
from napari_medseg.engine.preprocess import IntensityPreset
from napari_medseg.engine.train.data import TrainingDataError, as_list, class_setup
from napari_medseg.engine.train.regional_switch import SwitchOptions, random_switch, region_mask
from napari_medseg.engine.train.spatial_aug import (
    SpatialOptions,
    contract_patch,
    random_field,
    random_matrix,
    warp_patch,
)
from napari_medseg.engine.train.volume_geometry import (
    Plan,
    Spacing,
    assume_spacing,
    is_unit,
    pad_to,
    plan_geometry,
    resample,
    resample_labels,
    spacing_list,
)
from napari_medseg.engine.train.volume_intensity import VIEW_STRENGTH, class_gain, intensity_view

if TYPE_CHECKING:
    from napari_medseg.engine.segmenter import Segmenter
    from napari_medseg.engine.train.options import TrainOptions

log = logging.getLogger(__name__)


def volume_only(data: np.ndarray, what: str) -> None:
    """Raise a clear error for 2-D input (EFS-MedSeg is volumetric)."""
    if data.shape[0] < 2:
        raise TrainingDataError(
            f"{what} is 2-D; efs-medseg segments 3-D volumes (Z, Y, X). Use a 2-D network "
            "(sts-net, ms-lkseg, hf-sam) for single images"
        )


def crop(data: np.ndarray, start: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """Crop the last three axes."""
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return np.ascontiguousarray(data[(...,) + sl])


# ----------------------------------------------------------------------------- data
@dataclass
class VolumeData:
    """Atlases and unlabeled volumes at the target spacing; see the module docstring.

    Attributes:
        atlases: (image (C, Z, Y, X) float32 in [0, 1], labels (Z, Y, X) int64) pairs.
        unlabeled: (C, Z, Y, X) volumes.
        val: Validation pairs (held-out volumes, or fixed augmented views of the atlases).
        plan: Target spacing, patch and pooling.
        num_classes: Classes including background.
        class_names: Index 0 = background.
        preset: Intensity preset used for every volume.
        switch: Regional-switch options; ``switch_prob`` = 0 turns the switch off.
        switch_prob: Share of atlas patches made by the switch.
        spatial: Random rotation/zoom of patches (``prob`` = 0: straight crops).
        unlabeled_per_batch: Unlabeled patches per batch.
        strength: Intensity augmentation strength (0: none).
        curve_prob: Share of views that first get a random monotone intensity curve.
        gain_prob: Share of views darkened by a random gain (see :func:`intensity_view`).
        bias_prob: Share of views multiplied by a smooth random bias field.
        network_prob: Share of views passed through a random shallow network first
            (:func:`random_network`).
        blur_prob: Share of views blurred or coarsened in plane before anything else
            (:func:`blur_view`).
        class_gain_prob: Share of atlas patches whose structures get their own gains
            (:func:`class_gain`), before both views are made.
        fg_prob: Probability that a patch is centred on a labeled voxel.
        copy_paste: Also draw a cuboid mask (``cp_mask``) and a direction (``cp_dir``) per
            unlabeled patch for the atlas↔unlabeled copy-paste term.
        assumed_spacing: (z, y, x) used for volumes given as 1 mm everywhere that look
            anisotropic (:func:`assume_spacing`), or None.
        note: Remark for the user.
    """

    atlases: list[tuple[np.ndarray, np.ndarray]]
    unlabeled: list[np.ndarray]
    val: list[tuple[np.ndarray, np.ndarray]]
    plan: Plan
    num_classes: int
    class_names: list[str]
    preset: IntensityPreset
    switch: SwitchOptions = field(default_factory=SwitchOptions)
    switch_prob: float = 0.8
    spatial: SpatialOptions = field(default_factory=lambda: SpatialOptions(prob=0.0))
    unlabeled_per_batch: int = 1
    strength: float = 1.0
    curve_prob: float = 0.0
    gain_prob: float = 0.0
    bias_prob: float = 0.0
    network_prob: float = 0.0
    blur_prob: float = 0.0
    class_gain_prob: float = 0.0
    fg_prob: float = 0.5
    copy_paste: bool = False
    assumed_spacing: Spacing | None = None
    note: str = ""
    _indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.atlases)

    @classmethod
    def from_arrays(
        cls, seg: Segmenter, images: Any, labels: Any, unlabeled: Any, options: TrainOptions
    ) -> VolumeData:
        """Prepare atlases, unlabeled and validation volumes for ``seg``.

        Args:
            seg: The EFS-MedSeg segmenter (config gives widths, budgets, switch settings).
            images: One (Z, Y, X) volume or a list (the atlases, usually two).
            labels: Matching integer label volumes.
            unlabeled: Volumes without labels (optional).
            options: ``extra`` may hold ``spacing`` (one (z, y, x) or one per atlas),
                ``unlabeled_spacing``, ``val_images`` / ``val_labels`` / ``val_spacing``
                (held-out volumes), ``class_names``, ``channel_axis``.

        Raises:
            TrainingDataError: 2-D input, mismatched shapes, nothing labeled, a 2-D-only
                augment preset.
        """
        cfg, extra = seg.config, options.extra
        if options.augment not in VIEW_STRENGTH:
            raise TrainingDataError(
                f"augment {options.augment!r} is for 2-D networks; choose one of {', '.join(VIEW_STRENGTH)}"
            )
        imgs, labs = as_list(images), as_list(labels)
        if len(imgs) != len(labs) or not imgs:
            raise TrainingDataError(
                f"give one label volume per atlas ({len(imgs)} images, {len(labs)} labels)"
            )
        for i, lab in enumerate(labs):
            if lab.ndim < 3:
                volume_only(lab[None], f"atlas {i + 1}")
        k, names = class_setup(labs, extra.get("class_names"), int(cfg.get("max_classes", 16)))
        channel_axis = extra.get("channel_axis")
        preset: Any = seg.preset or seg.card.default_preset
        preps = []
        for i, (img, lab) in enumerate(zip(imgs, labs)):
            p = prepare_image(img, channel_axis, preset)
            preset = p.preset
            volume_only(p.data, f"atlas {i + 1}")
            if tuple(lab.shape) != p.spatial_shape:
                raise TrainingDataError(
                    f"atlas {i + 1}: labels {tuple(lab.shape)} do not match the volume {p.spatial_shape}"
                )
            preps.append(np.moveaxis(p.data, 1, 0))  # (C, Z, Y, X)
        sp = spacing_list(extra.get("spacing"), len(imgs), "spacing")
        # Files without a voxel size state 1 mm everywhere; thick slices would then be taken
        # for cubes. A trained model keeps what it assumed before (its target is in those units).
        before = cfg.get("assumed_spacing") if seg.trained else None
        assumed = assume_spacing(sp, [d[0] for d in preps], before)

        def known(spacings: list[Spacing]) -> list[Spacing]:
            return [assumed if assumed and is_unit(s) else s for s in spacings]

        sp = known(sp)
        fixed = cfg.get("target_spacing") if seg.trained else None
        plan = plan_geometry(
            [d.shape[1:] for d in preps],
            sp,
            len(cfg["widths"]) - 1,
            int(cfg["patch_voxels"]),
            int(cfg.get("max_volume_voxels") or 0),
            tuple(fixed) if fixed else None,  # type: ignore[arg-type]
        )
        if fixed and cfg.get("patch_size") and cfg.get("pools"):
            plan = Plan(plan.target_spacing, tuple(cfg["patch_size"]), [tuple(p) for p in cfg["pools"]])  # type: ignore[arg-type]

        def to_target(
            data: np.ndarray, s: Spacing, lab: np.ndarray | None = None
        ) -> tuple[np.ndarray, np.ndarray | None]:
            out = resample(data, s, plan.target_spacing)
            rl = None if lab is None else resample_labels(np.asarray(lab), out.shape[1:], k)
            out = pad_to(out, plan.patch)
            return out, None if rl is None else pad_to(rl, plan.patch)

        atlases = [to_target(d, s, lab) for d, s, lab in zip(preps, sp, labs)]
        free_in = as_list(unlabeled)
        # Unlabeled / validation volumes default to the atlases' (median) spacing.
        common = tuple(float(v) for v in np.median(np.asarray(sp), 0))
        usp = known(spacing_list(extra.get("unlabeled_spacing") or common, len(free_in), "unlabeled_spacing"))
        free = []
        for i, (img, s) in enumerate(zip(free_in, usp)):
            p = prepare_image(img, channel_axis, preset)
            volume_only(p.data, f"unlabeled volume {i + 1}")
            free.append(to_target(np.moveaxis(p.data, 1, 0), s)[0])
        vimgs, vlabs = as_list(extra.get("val_images")), as_list(extra.get("val_labels"))
        rng = np.random.default_rng(options.seed + 7)
        note = ""
        if vimgs:
            if len(vimgs) != len(vlabs):
                raise TrainingDataError("give one val_labels volume per val_images volume")
            vsp = known(spacing_list(extra.get("val_spacing") or common, len(vimgs), "val_spacing"))
            val = []
            for img, lab, s in zip(vimgs, vlabs, vsp):
                p = prepare_image(img, channel_axis, preset)
                v, vl = to_target(np.moveaxis(p.data, 1, 0), s, lab)
                val.append((v, vl))  # type: ignore[arg-type]
        else:
            # Drawn with the training views' blur share: the sharp atlases alone would
            # favour weights that are blind to blur.
            blur = float(cfg.get("intensity_blur", 0.0))
            val = [(intensity_view(a, rng, 0.7, blur_prob=blur), lab) for a, lab in atlases]  # type: ignore[misc]
            note = (
                "validation on augmented views of the atlases (optimistic); "
                "pass val_images/val_labels for held-out Dice"
            )
        if assumed:
            z = ", ".join(f"{v:g}" for v in assumed)
            said = (
                "the volumes state no voxel size (1 on every axis) but look anisotropic: "
                f"spacing ({z}) assumed — give the real spacing to override"
            )
            note = f"{said}; {note}" if note else said
            log.info("efs-medseg: unit spacing given, (%s) assumed from the images", z)
        data = cls(
            atlases=atlases,  # type: ignore[arg-type]
            unlabeled=free,
            val=val,  # type: ignore[arg-type]
            plan=plan,
            num_classes=k,
            class_names=names,
            preset=preset,
            switch=SwitchOptions(
                regions=int(cfg["switch_regions"]),
                smooth=float(cfg["switch_smooth"]),
                self_prob=float(cfg["switch_self_prob"]),
            ),
            switch_prob=float(cfg["switch_prob"]) if cfg.get("use_switch", True) else 0.0,
            spatial=SpatialOptions(
                prob=float(cfg.get("spatial_prob", 0.0)) if options.augment != "none" else 0.0,
                rotate_inplane=float(cfg.get("spatial_rotate", 180.0)),
                scale=tuple(cfg.get("spatial_scale", (0.7, 1.4))),  # type: ignore[arg-type]
                stretch=float(cfg.get("spatial_stretch", 0.0)),
                elastic=float(cfg.get("spatial_elastic", 0.0)),
                slice_shift=float(cfg.get("spatial_slice_shift", 0.0)),
                contract=float(cfg.get("spatial_contract", 0.0)) if options.augment != "none" else 0.0,
                contract_strength=float(cfg.get("spatial_contract_strength", 0.6)),
            ),
            unlabeled_per_batch=int(cfg["unlabeled_per_batch"]) if free else 0,
            strength=VIEW_STRENGTH[options.augment],
            curve_prob=float(cfg.get("intensity_curve", 0.0)),
            gain_prob=float(cfg.get("intensity_gain", 0.0)),
            bias_prob=float(cfg.get("intensity_bias", 0.0)),
            network_prob=float(cfg.get("intensity_network", 0.0)),
            blur_prob=float(cfg.get("intensity_blur", 0.0)),
            class_gain_prob=float(cfg.get("intensity_class_gain", 0.0)),
            fg_prob=float(cfg.get("patch_fg_prob", 0.5)),
            copy_paste=float(cfg.get("copy_paste_weight", 0.0)) > 0,
            assumed_spacing=assumed,
            note=note,
        )
        data._indices = list(range(len(atlases)))
        log.info(
            "efs-medseg data: %d atlases, %d unlabeled, spacing %s, patch %s, pools %s",
            len(atlases),
            len(free),
            plan.target_spacing,
            plan.patch,
            plan.pools,
        )
        return data

    def shard(self, rank: int, world: int) -> None:
        """Keep every ``world``-th atlas as the first source on this process."""
        if world > 1 and len(self.atlases) >= world:
            self._indices = list(range(rank, len(self.atlases), world))

    def _start(self, shape: Sequence[int], rng: np.random.Generator, label: np.ndarray | None) -> list[int]:
        """Patch start: centred on a random labeled voxel (``fg_prob``) or uniform."""
        patch = self.plan.patch
        if label is not None and rng.random() < self.fg_prob:
            fg = np.flatnonzero(label)
            if fg.size:
                centre = np.unravel_index(int(fg[rng.integers(fg.size)]), label.shape)
                return [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, patch, shape)]
        return [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch)]

    def _read(
        self,
        volume: np.ndarray,
        label: np.ndarray | None,
        start: Sequence[int],
        warp: tuple[np.ndarray, np.ndarray | None] | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The patch at ``start``: a straight crop, or read through ``warp`` about its centre."""
        patch = self.plan.patch
        if warp is None:
            return crop(volume, start, patch), None if label is None else crop(label, start, patch)
        centre = [s + (p - 1) / 2.0 for s, p in zip(start, patch)]
        return warp_patch(volume, label, centre, patch, self.plan.target_spacing, *warp)

    def _warp(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A random (matrix, displacement field) pair, or ``None`` for a straight crop."""
        if self.spatial.prob <= 0 or rng.random() >= self.spatial.prob:
            return None
        spacing = self.plan.target_spacing
        matrix = random_matrix(spacing, rng, self.spatial)
        return matrix, random_field(self.plan.patch, spacing, rng, self.spatial)

    def _atlas_patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        i = self._indices[int(rng.integers(len(self._indices)))]
        img, lab = self.atlases[i]
        start = self._start(lab.shape, rng, lab)
        # One warp for both sources, so switched regions still roughly correspond.
        warp = self._warp(rng)
        a = self._read(img, lab, start, warp)
        if rng.random() >= self.switch_prob:
            return a  # type: ignore[return-value]
        b = None
        if len(self.atlases) > 1:
            j = int(rng.choice([n for n in range(len(self.atlases)) if n != i]))
            bimg, blab = self.atlases[j]
            # Same *relative* position: roughly corresponding anatomy in unregistered atlases.
            rel = [s / max(1, n - p) for s, n, p in zip(start, lab.shape, self.plan.patch)]
            bstart = [int(round(r * (n - p))) for r, n, p in zip(rel, blab.shape, self.plan.patch)]
            b = self._read(bimg, blab, bstart, warp)
        image, label, _ = random_switch(a, b, rng, self.switch)  # type: ignore[arg-type]
        return image, label

    def _view(self, image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
        """One random intensity view of a (C, *P) patch with this sampler's options."""
        return intensity_view(
            image,
            rng,
            strength,
            self.curve_prob,
            self.gain_prob,
            self.bias_prob,
            self.network_prob,
            self.blur_prob,
        )

    def sample_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """A batch of patches.

        Returns:
            ``image`` / ``image2`` (B, C, *P) float32: two intensity views of the same atlas
            patches; ``label`` (B, *P) int64; with unlabeled volumes also ``u_image`` /
            ``u_image2`` (U, C, *P); with ``copy_paste`` also ``cp_mask`` (U, 1, *P) float
            in [0, 1] and ``cp_dir`` (U,) int64 (1: the unlabeled patch inside the cuboids).
        """
        views1, views2, labels = [], [], []
        for _ in range(batch_size):
            img, lab = self._atlas_patch(rng)
            if self.spatial.contract > 0 and rng.random() < self.spatial.contract:
                # No draw while off, so runs without it are unchanged.
                img, lab = contract_patch(img, lab, self.plan.target_spacing, rng, self.spatial)
            if self.class_gain_prob > 0 and rng.random() < self.class_gain_prob:
                img = class_gain(img, lab, rng)  # no draw at 0: runs without it are unchanged
            views1.append(self._view(img, rng, self.strength))
            views2.append(self._view(img, rng, max(self.strength, 0.5)))
            labels.append(lab)
        out = {
            "image": torch.from_numpy(np.stack(views1)),
            "image2": torch.from_numpy(np.stack(views2)),
            "label": torch.from_numpy(np.stack(labels)),
        }
        if self.unlabeled_per_batch:
            u1, u2 = [], []
            for _ in range(self.unlabeled_per_batch):
                vol = self.unlabeled[int(rng.integers(len(self.unlabeled)))]
                patch = self._read(vol, None, self._start(vol.shape[1:], rng, None), self._warp(rng))[0]
                u1.append(self._view(patch, rng, self.strength))
                u2.append(self._view(patch, rng, max(self.strength, 0.5)))
            out["u_image"], out["u_image2"] = torch.from_numpy(np.stack(u1)), torch.from_numpy(np.stack(u2))
            if self.copy_paste:  # no draw while off, so runs without it are unchanged
                masks = [region_mask(self.plan.patch, rng, self.switch) for _ in u1]
                out["cp_mask"] = torch.from_numpy(np.stack(masks))[:, None]
                out["cp_dir"] = torch.from_numpy(rng.integers(0, 2, len(u1)))
        return out

    def validate(self, seg: Segmenter) -> dict[str, float]:
        """Per-class and mean foreground Dice on the validation volumes (at target spacing)."""
        from napari_medseg.engine.runner import drain

        seg.module.eval()
        per: dict[int, list[float]] = {c: [] for c in range(1, self.num_classes)}
        with torch.inference_mode():
            for image, label in self.val:
                x = torch.from_numpy(image).to(seg.device)
                logits = drain(seg.volume_logits(x))  # type: ignore[attr-defined]
                pred = logits.argmax(0).cpu().numpy()  # type: ignore[union-attr]
                for c, d in dice_per_class(pred, label, self.num_classes).items():
                    per[c].append(d)
        out = {f"val_dice_{self.class_names[c]}": float(np.mean(v)) for c, v in per.items() if v}
        out["val_dice"] = float(np.mean(list(out.values()))) if out else 0.0
        return out

    def summary(self) -> dict[str, Any]:
        """Counts and geometry for the checkpoint's provenance."""
        return {
            "atlases": len(self.atlases),
            "unlabeled_volumes": len(self.unlabeled),
            "val_volumes": len(self.val),
            "num_classes": self.num_classes,
            "target_spacing": list(self.plan.target_spacing),
            "patch": list(self.plan.patch),
            "note": self.note,
        }
