"""Few-shot training data from arrays or napari layers' data (2-D networks).

A slice is *labeled* when its label array has any non-zero value (0 is background inside it);
all other slices are *unlabeled*. Validation is never empty: with two or more labeled slices
at least one is held out; with one, validation uses fixed augmented views of it (and says so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from napari_medseg.engine.image import is_colour, prepare_image
from napari_medseg.engine.metrics import mean_foreground_dice
from napari_medseg.engine.preprocess import IntensityPreset
from napari_medseg.engine.runner import batched_fit_logits, fit_shape, resize
from napari_medseg.engine.train.augment import Transform, apply_chain, generic_transforms, random_crop

if TYPE_CHECKING:
    from napari_medseg.engine.segmenter import Segmenter
    from napari_medseg.engine.train.options import TrainOptions

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The labels cannot be trained on; the message says what to paint or change."""


class TrainData(Protocol):
    """What the training loop needs from a data object (2-D slices or 3-D volumes)."""

    num_classes: int
    class_names: list[str]
    preset: IntensityPreset
    note: str

    def __len__(self) -> int: ...
    def shard(self, rank: int, world: int) -> None: ...
    def sample_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]: ...
    def validate(self, seg: Segmenter) -> dict[str, float]: ...
    def summary(self) -> dict[str, Any]: ...


def as_list(x: np.ndarray | Sequence[np.ndarray] | None) -> list[np.ndarray]:
    """One array or a sequence of them → list (``None`` → empty)."""
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(a) for a in x]


def class_setup(
    labels: Sequence[np.ndarray], names: Sequence[str] | None, max_classes: int
) -> tuple[int, list[str]]:
    """Number of classes (incl. background) and their names from label arrays.

    Raises:
        TrainingDataError: No label painted, negative or non-integer values, or more classes
            than the network supports.
    """
    top = 0
    for lab in labels:
        if lab.dtype.kind == "f" and not np.all(np.mod(lab, 1) == 0):
            raise TrainingDataError("labels must be integers (class ids), got fractional values")
        if lab.size and lab.min() < 0:
            raise TrainingDataError("labels must not be negative")
        top = max(top, int(lab.max()) if lab.size else 0)
    if top == 0:
        raise TrainingDataError(
            "no label painted: paint the structure with a label value of 1 or more on at least "
            "one slice (0 is background)"
        )
    k = top + 1
    if k > max_classes:
        raise TrainingDataError(
            f"labels go up to {top}, but this network supports at most {max_classes - 1} classes; "
            "relabel the structures with ids 1..N"
        )
    given = list(names or [])
    out = ["background"] + [
        given[i] if i < len(given) and given[i] else f"class {i + 1}" for i in range(k - 1)
    ]
    return k, out


@dataclass
class SliceData:
    """Labeled 2-D slices at the network's working size, split into train and validation.

    Attributes:
        train: (image (C, H, W) float32 in [0, 1], label (H, W) int64) pairs.
        val: Held-out pairs (or fixed augmented views when only one slice is labeled).
        unlabeled: (C, H, W) slices without labels (for methods that use them).
        num_classes: Classes including background.
        class_names: Index 0 = background.
        preset: Intensity preset used for every slice.
        crop_size: Training crop side.
        transforms: Network-specific then generic augmentation.
        note: Remark for the user (e.g. validation on augmented views).
        orientation: The resolved ``TrainOptions.orientation`` (``"any"`` or ``"upright"``).
    """

    train: list[tuple[np.ndarray, np.ndarray]]
    val: list[tuple[np.ndarray, np.ndarray]]
    unlabeled: list[np.ndarray]
    num_classes: int
    class_names: list[str]
    preset: IntensityPreset
    crop_size: int
    transforms: list[Transform] = field(default_factory=list)
    note: str = ""
    orientation: str = "any"
    _indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.train)

    @classmethod
    def from_arrays(
        cls,
        seg: Segmenter,
        images: Any,
        labels: Any,
        unlabeled: Any,
        options: TrainOptions,
        extra_transforms: Sequence[Transform] = (),
    ) -> SliceData:
        """Collect labeled slices from image/label arrays.

        Args:
            seg: The segmenter (gives working size, preset, class limit, channel axis rule).
            images: One array or a list: (Y, X), (Y, X, 3) or (Z, Y, X).
            labels: Matching integer arrays of the images' spatial shapes.
            unlabeled: Extra images without labels (optional).
            options: Training options (``val_fraction``, ``seed``, ``crop_size``, ``augment``,
                ``extra["channel_axis"]``, ``extra["class_names"]``).
            extra_transforms: Network-specific transforms applied before the generic ones.

        Raises:
            TrainingDataError: Mismatched shapes, nothing painted, too many classes.
        """
        imgs, labs = as_list(images), as_list(labels)
        if len(imgs) != len(labs):
            raise TrainingDataError(f"{len(imgs)} images but {len(labs)} label arrays")
        if not imgs:
            raise TrainingDataError("no training images given")
        max_classes = int(seg.config.get("max_classes", 32))
        k, names = class_setup(labs, options.extra.get("class_names"), max_classes)
        preset = seg.preset or seg.card.default_preset
        channel_axis = options.extra.get("channel_axis")
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        free: list[np.ndarray] = []
        resolved: IntensityPreset | None = None
        colour = False
        for img, lab in zip(imgs, labs):
            prep = prepare_image(img, channel_axis, resolved or preset)
            resolved = resolved or prep.preset
            colour = colour or is_colour(prep.data, prep.rgb)
            if tuple(lab.shape) != prep.spatial_shape:
                raise TrainingDataError(
                    f"labels of shape {tuple(lab.shape)} do not match the image's spatial shape "
                    f"{prep.spatial_shape}"
                )
            lab3 = lab.reshape((-1,) + lab.shape[-2:]).astype(np.int64)
            for z in range(prep.data.shape[0]):
                sl = _to_working(prep.data[z], lab3[z], seg.working_size)
                (pairs.append(sl) if lab3[z].any() else free.append(sl[0]))
        for img in as_list(unlabeled):
            prep = prepare_image(img, channel_axis, resolved or preset)
            free += [_to_working(s, None, seg.working_size)[0] for s in prep.data]
        assert resolved is not None
        orientation = options.orientation
        if orientation == "auto":
            orientation = "any" if colour else "upright"
        rng = np.random.default_rng(options.seed)
        order = rng.permutation(len(pairs))
        note = ""
        if len(pairs) >= 2:
            n_val = min(len(pairs) - 1, max(1, int(round(len(pairs) * options.val_fraction))))
            val = [pairs[i] for i in order[:n_val]]
            train = [pairs[i] for i in order[n_val:]]
        else:
            train = pairs
            chain = generic_transforms("default", orientation)
            vrng = np.random.default_rng(options.seed + 7)
            val = [apply_chain(chain, *pairs[0], vrng) for _ in range(4)]
            note = "one labeled slice: validation uses 4 augmented views of it, so its Dice is optimistic"
        crop = options.crop_size or seg.input_size
        chain = list(extra_transforms) + generic_transforms(options.augment, orientation)
        data = cls(train, val, free, k, names, resolved, crop, chain, note, orientation)
        data._indices = list(range(len(train)))
        # Validation on views of the training slice says nothing about unseen images.
        data.val_from_training = len(pairs) < 2
        log.info("training on %d slices, validating on %d (%s)", len(train), len(val), note or "held out")
        return data

    def shard(self, rank: int, world: int) -> None:
        """Keep every ``world``-th training sample for this process (distributed sampler)."""
        if world > 1 and len(self.train) >= world:
            self._indices = list(range(rank, len(self.train), world))

    def sample_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """A random augmented batch: ``image`` (B, C, S, S) float, ``label`` (B, S, S) int64."""
        images, labels = [], []
        for _ in range(batch_size):
            image, label = self.train[self._indices[int(rng.integers(len(self._indices)))]]
            image, label = apply_chain(self.transforms, image, label, rng)
            image, label = random_crop(image, label, self.crop_size, rng)
            images.append(np.ascontiguousarray(image, dtype=np.float32))
            labels.append(np.ascontiguousarray(label, dtype=np.int64))
        return {"image": torch.from_numpy(np.stack(images)), "label": torch.from_numpy(np.stack(labels))}

    def validate(self, seg: Segmenter) -> dict[str, float]:
        """Mean foreground Dice of ``seg`` on the validation slices."""
        seg.module.eval()
        scores = []
        net = seg.validation_logits  # one view for networks with test-time views (HF-SAM)
        with torch.inference_mode():
            for image, label in self.val:
                x = torch.from_numpy(image)[None].to(seg.device)
                if max(image.shape[1:]) > seg.input_size:
                    from napari_medseg.engine.runner import drain, predict_slice_logits

                    logits = drain(predict_slice_logits(x[0], net, seg.input_size, seg.working_size))[None]  # type: ignore[index]
                else:
                    logits = batched_fit_logits(x, net, seg.input_size)
                pred = logits.argmax(1)[0].cpu().numpy()
                scores.append(mean_foreground_dice(pred, label, self.num_classes))
        return {"val_dice": float(np.mean(scores))} | seg.extra_validation(self.val)

    def summary(self) -> dict[str, Any]:
        """Counts for the checkpoint's provenance."""
        return {
            "train_slices": len(self.train),
            "val_slices": len(self.val),
            "unlabeled_slices": len(self.unlabeled),
            "num_classes": self.num_classes,
            "orientation": self.orientation,
            "note": self.note,
        }


def _to_working(
    image: np.ndarray, label: np.ndarray | None, working_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a (C, H, W) slice and its (H, W) label so the longest side is ``working_size``."""
    shape = fit_shape(image.shape[1:], working_size)
    img = resize(torch.from_numpy(np.ascontiguousarray(image))[None], shape)[0].numpy()
    if label is None:
        return img, np.zeros(shape, np.int64)
    lab = resize(torch.from_numpy(label)[None, None], shape, labels=True)[0, 0].numpy()
    return img, lab
