"""Prompt sessions: encode each slice once, decode every prompt change cheaply.

A :class:`PromptSession` owns one image. It asks its segmenter (any promptable network) for
two things: ``encode_slice`` (expensive, a few hundred ms on a CPU; cached here) and
``decode_prompts`` (cheap, one call per click). Embeddings live in an LRU cache bounded in MB
and, optionally, in one ``.safetensors`` file per image on disk keyed by the image content,
backbone, weights, intensity preset and ROI settings, so reopening a volume needs no
re-encoding.

Coordinates are data pixels in (row, col) order, like napari: points ``(y, x)``, boxes
``(y0, x0, y1, x1)`` with y0 < y1, x0 < x1 (inclusive corners).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from napari_medseg.engine.image import PreparedImage
from napari_medseg.engine.progress import Progress

if TYPE_CHECKING:
    from napari_medseg.engine.segmenter import Segmenter

log = logging.getLogger(__name__)

Embedding = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Prompts:
    """Prompts for one slice, in data pixel coordinates (row, col).

    Attributes:
        points: (N, 2) float array of (y, x), or ``None``.
        point_labels: (N,) int array, 1 = positive, 0 = negative.
        box: (y0, x0, y1, x1) or ``None``.
        mask_input: Low-resolution logits from a previous prediction, or ``None``.
        multimask: Return the best of several candidate masks (a single ambiguous point).
    """

    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    mask_input: torch.Tensor | None = None
    multimask: bool = False

    @classmethod
    def make(
        cls,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> Prompts:
        """Validate and normalise user prompts.

        Raises:
            ValueError: No prompt at all, mismatched point/label counts, or a degenerate box.
        """
        pts = None if points is None or len(points) == 0 else np.asarray(points, np.float64).reshape(-1, 2)
        labs = None
        if pts is not None:
            labs = np.ones(len(pts), np.int64) if point_labels is None else np.asarray(point_labels, np.int64)
            if labs.shape != (len(pts),):
                raise ValueError(f"{len(pts)} points but {labs.size} point labels")
        bx = None
        if box is not None:
            y0, x0, y1, x1 = (float(v) for v in box)
            y0, y1 = sorted((y0, y1))
            x0, x1 = sorted((x0, x1))
            if y1 - y0 < 1 or x1 - x0 < 1:
                raise ValueError(f"the box {tuple(box)} is empty; drag a rectangle around the object")
            bx = (y0, x0, y1, x1)
        if pts is None and bx is None:
            raise ValueError("give at least one point or a box")
        single = pts is not None and len(pts) == 1 and bx is None
        return cls(pts, labs, bx, mask_input, multimask=single)


@dataclass(frozen=True)
class PromptResult:
    """A decoded mask.

    Attributes:
        mask: bool (Y, X) at the slice's resolution.
        score: The model's predicted IoU of the mask (0..1).
        low_res: Low-resolution logits to feed back as ``mask_input``.
    """

    mask: np.ndarray
    score: float
    low_res: torch.Tensor | None = None


class PromptModel(Protocol):
    """What a promptable segmenter provides to a session."""

    def prompt_cache_key(self) -> str: ...
    def encode_slice(self, image: np.ndarray, roi: tuple[int, int, int, int] | None) -> Embedding: ...
    def plan_roi(self, prompts: Prompts, shape: tuple[int, int]) -> tuple[int, int, int, int] | None: ...
    def decode_prompts(
        self,
        embedding: Embedding,
        prompts: Prompts,
        shape: tuple[int, int],
        roi: tuple[int, int, int, int] | None,
    ) -> PromptResult: ...


def image_hash(image: np.ndarray) -> str:
    """Content hash of an array (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    arr = np.ascontiguousarray(image)
    h.update(f"{arr.shape}{arr.dtype}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class PromptSession:
    """Interactive segmentation of one image (2-D, RGB or a volume).

    Args:
        seg: A promptable segmenter (see :class:`PromptModel`).
        prepared: The image, checked and intensity-scaled (``seg.prepare(image)``).
        raw_hash: Content hash of the raw image (part of the disk-cache key).
        cache_mb: Upper bound of the in-memory embedding cache.
        cache_dir: Folder for the on-disk cache, or ``None`` for memory only.
    """

    def __init__(
        self,
        seg: Segmenter,
        prepared: PreparedImage,
        raw_hash: str,
        cache_mb: float = 1024,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.seg = seg
        self.image = prepared
        self.cache_mb = cache_mb
        self._cache: OrderedDict[tuple[int, Any], Embedding] = OrderedDict()
        self.encode_calls = 0
        model: Any = seg
        key = "|".join([raw_hash, model.prompt_cache_key(), prepared.preset.to_json()])
        self.cache_key = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        self.cache_file = Path(cache_dir) / f"{self.cache_key}.safetensors" if cache_dir else None
        self._disk: dict[str, torch.Tensor] = {}
        self._disk_names: set[str] = set()
        if self.cache_file is not None and self.cache_file.is_file():
            self._load_disk()

    # ---------------------------------------------------------------- geometry
    @property
    def num_slices(self) -> int:
        """Z (1 for 2-D images)."""
        return int(self.image.data.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(Y, X) of every slice."""
        return tuple(self.image.data.shape[2:])  # type: ignore[return-value]

    def _z(self, slice_index: int | None) -> int:
        if slice_index is None:
            if self.num_slices > 1:
                raise ValueError("this is a volume: give slice_index")
            return 0
        if not 0 <= slice_index < self.num_slices:
            raise IndexError(f"slice {slice_index} is outside 0..{self.num_slices - 1}")
        return int(slice_index)

    # ---------------------------------------------------------------- embeddings
    def is_cached(self, slice_index: int | None = None, roi: Any = None) -> bool:
        """Whether the embedding of a slice (and ROI) is ready without encoding."""
        z = self._z(slice_index)
        return (z, roi) in self._cache or _disk_name(z, roi) in self._disk_names

    def embedding(
        self, slice_index: int | None = None, roi: tuple[int, int, int, int] | None = None
    ) -> Embedding:
        """The (cached) embedding of a slice, encoding it if needed (may take a second)."""
        z = self._z(slice_index)
        key = (z, roi)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        name = _disk_name(z, roi)
        if name in self._disk_names:
            emb = _unflatten(self._disk, name)
        else:
            model: Any = self.seg
            emb = model.encode_slice(self.image.data[z], roi)
            self.encode_calls += 1
        self._cache[key] = emb
        self._evict()
        return emb

    def _evict(self) -> None:
        limit = self.cache_mb * 2**20
        while len(self._cache) > 1 and sum(_nbytes(e) for e in self._cache.values()) > limit:
            self._cache.popitem(last=False)

    def iter_precompute(self, slices: Sequence[int] | None = None) -> Generator[Progress, None, int]:
        """Encode every slice (or those given) that is not cached yet; a cancel point each.

        Returns:
            The number of slices encoded.
        """
        todo = [
            z for z in (slices if slices is not None else range(self.num_slices)) if not self.is_cached(z)
        ]
        for i, z in enumerate(todo):
            emb = self.embedding(z)
            self._disk.update(_flatten(emb, _disk_name(z, None)))
            self._disk_names.add(_disk_name(z, None))
            yield Progress(i + 1, len(todo), f"embedding slice {z + 1}/{self.num_slices}")
        self.flush()
        return len(todo)

    def flush(self) -> None:
        """Write every embedding computed so far to the disk cache (if one is configured)."""
        if self.cache_file is None:
            return
        from safetensors.torch import save_file

        tensors = dict(self._disk)
        for (z, roi), emb in self._cache.items():
            if roi is None:
                tensors.update(_flatten(emb, _disk_name(z, None)))
                self._disk_names.add(_disk_name(z, None))
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp")
        save_file({k: v.to("cpu", torch.float16).contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.cache_file)
        self._disk = tensors

    def _load_disk(self) -> None:
        from safetensors.torch import load_file

        assert self.cache_file is not None
        try:
            self._disk = {k: v.float() for k, v in load_file(str(self.cache_file)).items()}
            self._disk_names = {k.split(".", 1)[0] for k in self._disk}
        except Exception as err:  # a damaged cache is only a cache: recompute
            log.warning("ignoring damaged embedding cache %s: %s", self.cache_file, err)
            self._disk, self._disk_names = {}, set()

    # ---------------------------------------------------------------- prediction
    def predict_result(self, prompts: Prompts, slice_index: int | None = None) -> PromptResult:
        """Decode ``prompts`` on one slice (encodes the slice first if needed)."""
        z = self._z(slice_index)
        model: Any = self.seg
        roi = model.plan_roi(prompts, self.slice_shape)
        emb = self.embedding(z, roi)
        with torch.inference_mode():
            return model.decode_prompts(emb, prompts, self.slice_shape, roi)

    def predict(
        self,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | None = None,
        slice_index: int | None = None,
    ) -> np.ndarray:
        """Bool (Y, X) mask of the object the prompts point at, on one slice."""
        return self.predict_result(Prompts.make(points, point_labels, box), slice_index).mask

    def iter_propagate(
        self,
        mask: np.ndarray,
        slice_index: int,
        min_score: float = 0.5,
        min_area_ratio: float = 0.1,
        max_slices: int | None = None,
    ) -> Generator[Progress, None, dict[int, np.ndarray]]:
        """Follow an object from ``slice_index`` up and down the volume.

        Each next slice is prompted with the bounding box of the previous slice's mask (and
        its low-resolution logits). Propagation in one direction stops when the predicted IoU
        drops below ``min_score``, the area falls below ``min_area_ratio`` × the start area,
        or the mask vanishes.

        Args:
            mask: bool (Y, X) mask on ``slice_index`` (e.g. the committed preview).
            slice_index: Slice the object was segmented on.

        Yields:
            :class:`Progress` per slice (a cancel point).

        Returns:
            {slice index: bool mask} for the slices reached (the start slice excluded).
        """
        start_area = int(mask.sum())
        if start_area == 0:
            raise ValueError("the start mask is empty: segment the object on this slice first")
        limit = max_slices or self.num_slices
        out: dict[int, np.ndarray] = {}
        total = self.num_slices - 1
        done = 0
        for direction in (1, -1):
            prev, low = mask, None
            z = slice_index + direction
            while 0 <= z < self.num_slices and abs(z - slice_index) <= limit:
                box = mask_box(prev)
                if box is None:
                    break
                res = self.predict_result(Prompts(box=box, mask_input=low), z)
                done += 1
                yield Progress(done, total, f"propagating: slice {z + 1}")
                area = int(res.mask.sum())
                if res.score < min_score or area < min_area_ratio * start_area or area == 0:
                    break
                out[z] = res.mask
                prev, low = res.mask, res.low_res
                z += direction
        return out


def mask_box(mask: np.ndarray, margin: int = 2) -> tuple[float, float, float, float] | None:
    """Bounding box (y0, x0, y1, x1) of a bool mask, widened by ``margin`` pixels."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape
    return (
        float(max(0, ys.min() - margin)),
        float(max(0, xs.min() - margin)),
        float(min(h - 1, ys.max() + margin)),
        float(min(w - 1, xs.max() + margin)),
    )


def _disk_name(z: int, roi: Any) -> str:
    return f"z{z}" if roi is None else f"z{z}_roi{'_'.join(map(str, roi))}"


def _flatten(emb: Embedding, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in emb.items()}


def _unflatten(tensors: dict[str, torch.Tensor], prefix: str) -> Embedding:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def _nbytes(emb: Embedding) -> int:
    return sum(t.numel() * t.element_size() for t in emb.values())
