"""STS-Net's small-target augmentation, done online instead of as offline copies.

The release writes, before training, 15 extra copies of every slice whose lesion covers
5 < n < 1000 pixels of a 480² slice (A: flips and centre crops zoomed back to full size,
×1.12–2.09) and one lesion-centred crop-and-zoom copy of every slice with more than 5
lesion pixels (B). Here the same distribution is drawn on the fly:

* :class:`SmallTargetAugment` is an ordinary transform ``(image, label, rng) -> (image,
  label)`` that, for one draw of a slice, picks "original", one of A's copies or B's copy with
  the weights those copies would have had in the offline set;
* :class:`SmallTargetSliceData` repeats the indices of eligible slices in the sampler, so a
  small-target slice is drawn as often as its 1 + 15 (+ 1) offline files would be.

Thresholds are fractions of the slice area, so they mean the same at any working size.
Unlike the offline script, A's crop windows are shifted (never shrunk) to keep the lesion
inside, so an augmented copy never loses its target. Options come from
``TrainOptions.extra`` (see :meth:`SmallTargetConfig.from_extra`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

from napari_medseg.engine.runner import resize
from napari_medseg.engine.train.data import SliceData

if TYPE_CHECKING:
    from napari_medseg.engine.segmenter import Segmenter
    from napari_medseg.engine.train.options import TrainOptions

log = logging.getLogger(__name__)

_REF = 480.0  # side of the release's slices; all pixel constants below are fractions of it

# Copy table of the release's script A: (flip, crop margin of rows, crop margin of cols),
# margins in pixels of a 480² slice; flip "v" = top↔bottom, "h" = left↔right.
A_COPIES: tuple[tuple[str, int, int], ...] = (
    ("v", 0, 0),
    ("h", 0, 0),
    ("", 50, 50),
    ("h", 50, 50),
    ("v", 50, 50),
    ("v", 50, 0),
    ("v", 0, 50),
    ("", 75, 75),
    ("h", 75, 75),
    ("", 100, 100),
    ("h", 100, 100),
    ("", 125, 125),
    ("h", 125, 125),
    ("", 25, 25),
    ("h", 25, 25),
)


@dataclass(frozen=True)
class SmallTargetConfig:
    """Settings of the small-target augmentation.

    Attributes:
        enabled: Master switch (``small_target`` in ``TrainOptions.extra``).
        min_fraction: A applies when the foreground covers more than this share of the slice
            (release: 5 px of 480²).
        max_fraction: ... and less than this share (release: 1000 px of 480²).
        a_enabled: Use A (flips + centre crop zoom) on small-target slices.
        a_copies: How many of A's 15 copy types to use (the first ``a_copies`` of the table);
            also the sampler's extra weight of a small-target slice.
        b_enabled: Use B (lesion-centred crop and zoom).
        b_min_pixels_fraction: B applies when the foreground covers more than this share
            (release: 5 px of 480²).
        b_half_min: Smallest half-size of B's window as a fraction of the side (150/480).
        b_half_max: Largest half-size (160/480).
        b_dilate: Dilate the label by a 2×2 kernel in B's copy, as the release saves it
            (off by default: it changes the ground truth).
        oversample: Repeat eligible slices in the sampler like the offline copies would.
    """

    enabled: bool = True
    min_fraction: float = 5 / _REF**2
    max_fraction: float = 1000 / _REF**2
    a_enabled: bool = True
    a_copies: int = 15
    b_enabled: bool = True
    b_min_pixels_fraction: float = 5 / _REF**2
    b_half_min: float = 150 / _REF
    b_half_max: float = 160 / _REF
    b_dilate: bool = False
    oversample: bool = True

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> SmallTargetConfig:
        """Read the config from ``TrainOptions.extra``.

        ``extra["small_target"]`` may be a bool (switch) or a dict of field values; keys
        ``small_target_<field>`` (e.g. ``small_target_max_fraction``) override single fields.

        Raises:
            ValueError: Unknown field or thresholds out of order.
        """
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        switch = extra.get("small_target", True)
        if isinstance(switch, dict):
            values.update(switch)
        else:
            values["enabled"] = bool(switch)
        for key, value in extra.items():
            if key.startswith("small_target_"):
                values[key[len("small_target_") :]] = value
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown small-target option(s) {sorted(unknown)}; known: {sorted(names)}")
        cfg = cls(**values)
        if not 0 <= cfg.min_fraction < cfg.max_fraction <= 1:
            raise ValueError("small-target thresholds need 0 <= min_fraction < max_fraction <= 1")
        if not 0 < cfg.b_half_min <= cfg.b_half_max <= 0.5:
            raise ValueError("B's half-sizes need 0 < b_half_min <= b_half_max <= 0.5")
        if not 0 <= cfg.a_copies <= len(A_COPIES):
            raise ValueError(f"a_copies must be in 0..{len(A_COPIES)}")
        return cfg

    def is_small(self, label: np.ndarray) -> bool:
        """Whether a (H, W) label qualifies for A (foreground share strictly between bounds)."""
        share = float(np.count_nonzero(label)) / label.size
        return self.min_fraction < share < self.max_fraction

    def b_eligible(self, label: np.ndarray) -> bool:
        """Whether a (H, W) label qualifies for B."""
        return float(np.count_nonzero(label)) / label.size > self.b_min_pixels_fraction

    def weights(self, label: np.ndarray) -> tuple[int, int]:
        """Offline copy counts of a slice: (A copies, B copies)."""
        if not self.enabled:
            return 0, 0
        a = self.a_copies if self.a_enabled and self.is_small(label) else 0
        b = 1 if self.b_enabled and self.b_eligible(label) else 0
        return a, b


def _flip(image: np.ndarray, label: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    if how == "v":
        return image[:, ::-1], label[::-1]
    if how == "h":
        return image[:, :, ::-1], label[:, ::-1]
    return image, label


def crop_zoom(
    image: np.ndarray, label: np.ndarray, y0: int, y1: int, x0: int, x1: int
) -> tuple[np.ndarray, np.ndarray]:
    """Crop rows ``y0:y1`` and columns ``x0:x1`` and resize back to the full (H, W).

    Bilinear for the (C, H, W) float image, nearest for the (H, W) integer label.
    """
    h, w = label.shape
    img = torch.from_numpy(np.ascontiguousarray(image[:, y0:y1, x0:x1], dtype=np.float32))[None]
    lab = torch.from_numpy(np.ascontiguousarray(label[y0:y1, x0:x1]))[None, None]
    img = resize(img, (h, w))[0].numpy()
    lab = resize(lab, (h, w), labels=True)[0, 0].numpy().astype(label.dtype, copy=False)
    return img, lab


def _fit_window(lo: int, hi: int, size: int, fg_lo: int, fg_hi: int) -> tuple[int, int]:
    """Shift the window [lo, hi) (never shrink it) so that it covers [fg_lo, fg_hi] if it can."""
    length = hi - lo
    if fg_hi - fg_lo + 1 > length:
        return lo, hi  # the target is larger than the window: keep the release's window
    if fg_lo < lo:
        lo = fg_lo
    elif fg_hi >= hi:
        lo = fg_hi + 1 - length
    lo = int(np.clip(lo, 0, size - length))
    return lo, lo + length


def copy_a(image: np.ndarray, label: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Copy ``index`` (0..14) of the release's table A, scaled to this slice's size.

    The centre crop is shifted, if needed, to keep all foreground inside.

    Args:
        image: (C, H, W) float.
        label: (H, W) int.
        index: Row of :data:`A_COPIES`.
    """
    how, my, mx = A_COPIES[index]
    image, label = _flip(image, label, how)
    h, w = label.shape
    dy, dx = int(round(my / _REF * h)), int(round(mx / _REF * w))
    if not dy and not dx:
        return np.ascontiguousarray(image), np.ascontiguousarray(label)
    ys, xs = np.nonzero(label)
    y0, y1, x0, x1 = dy, h - dy, dx, w - dx
    if len(ys):
        y0, y1 = _fit_window(y0, y1, h, int(ys.min()), int(ys.max()))
        x0, x1 = _fit_window(x0, x1, w, int(xs.min()), int(xs.max()))
    return crop_zoom(image, label, y0, y1, x0, x1)


def copy_b(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, cfg: SmallTargetConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion-centred crop and zoom (the release's script B), scaled to this slice's size.

    The window is centred on the bounding box of one random connected lesion, has random
    half-sizes in ``[b_half_min, b_half_max]`` of each side, clamped so it stays inside the
    slice (which zooms more near the border, as in the release).
    """
    if cfg.b_dilate:
        label = ndimage.grey_dilation(label, size=(2, 2))
    h, w = label.shape
    comps, n = ndimage.label(label > 0)
    if n == 0:
        return image, label
    ys, xs = np.nonzero(comps == int(rng.integers(1, n + 1)))
    cy = (int(ys.min()) + int(ys.max()) + 1) // 2
    cx = (int(xs.min()) + int(xs.max()) + 1) // 2
    hy = int(round(rng.uniform(cfg.b_half_min, cfg.b_half_max) * h))
    hx = int(round(rng.uniform(cfg.b_half_min, cfg.b_half_max) * w))
    hy = max(1, min(hy, cy, h - cy))
    hx = max(1, min(hx, cx, w - cx))
    # A lesion touching the border gives a centre on it: keep at least a 2-pixel window inside.
    y0, x0 = max(0, min(cy - hy, h - 2)), max(0, min(cx - hx, w - 2))
    return crop_zoom(image, label, y0, max(y0 + 2, cy + hy), x0, max(x0 + 2, cx + hx))


class SmallTargetAugment:
    """Transform that draws the original slice or one of its offline small-target copies.

    Weights per slice: the original 1, each of A's copies 1 (small targets only), B's copy 1.
    With the sampler's repetition (:class:`SmallTargetSliceData`) this reproduces the
    offline data set's distribution.
    """

    def __init__(self, cfg: SmallTargetConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float image and (H, W) label → augmented pair of the same shapes."""
        a, b = self.cfg.weights(label)
        if not a and not b:
            return image, label
        pick = int(rng.integers(1 + a + b))
        if pick == 0:
            return image, label
        if pick <= a:
            return copy_a(image, label, pick - 1)
        return copy_b(image, label, rng, self.cfg)


class SmallTargetSliceData(SliceData):
    """:class:`SliceData` whose sampler repeats small-target slices like offline copies."""

    small_target: SmallTargetConfig | None = None
    bn_batches: int = 0
    bn_batch_size: int = 4

    def validate(self, seg: Segmenter) -> dict[str, float]:
        """Re-estimate BatchNorm statistics on training batches, then validate.

        With few, fast-changing steps (few-shot training on a CPU) the running statistics lag
        far behind the weights and eval-mode output is garbage even when train-mode output is
        right (seen: train-mode Dice 0.95, eval-mode 0.0 on one painted image). A short pass
        in train mode with a cumulative average (dropout off) makes them exact for the
        current weights; the best-weights snapshot taken after validation includes them.
        """
        if self.bn_batches > 0:
            recalibrate_batchnorm(
                seg, self, self.bn_batches, self.bn_batch_size, np.random.default_rng(12345)
            )
        return super().validate(seg)

    @classmethod
    def build(
        cls,
        seg: Segmenter,
        images: Any,
        labels: Any,
        unlabeled: Any,
        options: TrainOptions,
        cfg: SmallTargetConfig,
    ) -> SliceData:
        """:meth:`SliceData.from_arrays` with the small-target transform in front.

        With ``cfg.enabled`` off there is no extra transform and no oversampling.
        ``options.extra["bn_recalibrate"]`` (default 4): batches used to re-estimate the
        BatchNorm statistics before each validation (0: off).
        """
        extra = [SmallTargetAugment(cfg)] if cfg.enabled else []
        data = cls.from_arrays(seg, images, labels, unlabeled, options, extra_transforms=extra)
        data.small_target = cfg if cfg.enabled else None
        data.bn_batches = int(options.extra.get("bn_recalibrate", 4))
        data.bn_batch_size = options.batch_size
        data.shard(0, 1)
        counts = [cfg.weights(lab) for _, lab in data.train]
        log.info(
            "small-target augmentation: %d of %d slices small (A), %d with B; %d draws per epoch",
            sum(1 for a, _ in counts if a),
            len(counts),
            sum(b for _, b in counts),
            len(data),
        )
        return data

    def shard(self, rank: int, world: int) -> None:
        """Shard like :class:`SliceData`, then repeat each kept slice by its copy count."""
        self._indices = list(range(len(self.train)))
        super().shard(rank, world)
        cfg = self.small_target
        if cfg is None or not cfg.oversample:
            return
        out: list[int] = []
        for i in self._indices:
            a, b = cfg.weights(self.train[i][1])
            out += [i] * (1 + a + b)
        self._indices = out

    def __len__(self) -> int:  # noqa: D105
        """Draws per epoch: the size the offline augmented set would have."""
        return len(self._indices) if self._indices else len(self.train)


def recalibrate_batchnorm(
    seg: Segmenter, data: SliceData, batches: int, batch_size: int, rng: np.random.Generator
) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them on training batches.

    Batch norms run in train mode with a cumulative average (``momentum=None``); dropout and
    everything else stay in eval mode, so the statistics are those inference will meet.
    The network is left in eval mode.
    """
    module = seg.module
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    module.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for _ in range(batches):
                batch = data.sample_batch(rng, max(2, batch_size))
                module(seg.network_input(batch["image"].to(seg.device)))
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        module.eval()
