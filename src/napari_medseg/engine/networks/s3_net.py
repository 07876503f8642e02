"""S³-Net in the engine: per-image self-supervised clustering, registered as ``"s3-net"``.

Nothing is trained once: for every image (every slice of a volume) a freshly seeded
:class:`~napari_medseg.models.s3_net.S3Net` is optimised on that image alone, following Kim &
Kanezaki's loop (argmax pseudo-labels → losses → one SGD step → stop when few clusters remain).
The result is a map of cluster ids 1..K ordered by size (1 = largest); the user then keeps the
clusters that make up the lesion (:func:`napari_medseg.engine.clusters.cluster_at`).
Specification: ``specs/networks.md`` §3; choices: ``docs/models/s3-net.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.engine.clusters import consensus_clusters, relabel_by_size, split_regions
from napari_medseg.engine.networks.s3_net_config import CARD, RUN_OPTIONS, RUN_RECIPES
from napari_medseg.engine.progress import Progress
from napari_medseg.engine.registry import register
from napari_medseg.engine.runner import fit_shape, resize
from napari_medseg.engine.segmenter import Segmenter, match_channels
from napari_medseg.models import s3_losses
from napari_medseg.models.s3_net import MODES, S3Net

log = logging.getLogger(__name__)


PAPER_SIZE = 128  # default working size in paper mode (benchmarks in docs/models/s3-net.md)
# Stop-rule defaults per mode (``None`` in the config = these). The notebook counts every
# cluster and stops at 3. In paper mode the clusters keep merging after the lesion has formed
# its own one, and specks of a few pixels keep the count up, so stopping at 5 clusters of at
# least 1 % of the pixels is both earlier and better: replayed on full trajectories, PH2 needs
# 12.4 instead of 34.5 iterations with best-cluster Dice 0.714 instead of 0.628, and BUSI and
# Kvasir-SEG gain too (benchmarks/bench_s3_stop_rule.py, docs/models/s3-net.md).
STOP_DEFAULTS: dict[str, dict[str, float]] = {
    "paper": {"min_labels": 5, "min_cluster_fraction": 0.01},
    "released": {"min_labels": 3, "min_cluster_fraction": 0.0},
}


def count_clusters(labels: torch.Tensor, min_fraction: float = 0.0) -> int:
    """Number of clusters in a label map, ignoring those below ``min_fraction`` of the pixels.

    Args:
        labels: Integer cluster ids of any shape (e.g. (1, h, w)).
        min_fraction: Clusters covering fewer than this fraction of the pixels are not counted
            (0 counts every id present).

    Returns:
        The count; 0 when no cluster reaches ``min_fraction``.
    """
    counts = torch.bincount(labels.reshape(-1))
    counts = counts[counts > 0]
    return int((counts >= min_fraction * labels.numel()).sum())


RELEASED_SIZE = 256  # the authors' notebook resizes every image to 256²


def flatten_shading(x: torch.Tensor, sigma_fraction: float) -> torch.Tensor:
    """Divide out slow illumination changes (vignetting, shading) before clustering.

    Args:
        x: (1, C, h, w) float in [0, 1].
        sigma_fraction: Standard deviation of the Gaussian blur that estimates the
            illumination from the mean brightness, as a share of the longer side; 0 returns
            ``x`` unchanged.

    Returns:
        (1, C, h, w) float in [0, 1]: every channel divided by the illumination estimate,
        rescaled so that its 99th percentile is 1.
    """
    if sigma_fraction <= 0:
        return x
    # Imported here: torchvision.transforms.v2 costs about 2 s at start-up, needed only when on.
    from torchvision.transforms.v2.functional import gaussian_blur

    sigma = max(1.0, sigma_fraction * max(x.shape[2:]))
    # Reflected borders (torchvision's), so the image frame does not darken the estimate.
    radius = min(int(3 * sigma), min(x.shape[2:]) - 1)
    light = gaussian_blur(x.mean(1, keepdim=True), [2 * radius + 1] * 2, [sigma] * 2)
    out = x / (light + 0.02)  # the offset keeps near-black frames from turning into noise
    top = torch.quantile(out.flatten(2), 0.99, dim=2).clamp_min(1e-6)
    return (out / top[..., None, None]).clamp(0.0, 1.0)


class S3NetSegmenter(Segmenter):
    """Runs the per-image S³-Net optimisation; see :meth:`iter_segment`."""

    card = CARD
    RUN_OPTIONS = RUN_OPTIONS  # the Segment widget's form (figures: docs/models/s3-net.md)
    RUN_RECIPES = RUN_RECIPES

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """Options (all overridable in ``load_model("s3-net", **options)``).

        ``mode``: ``"paper"`` (offsets predicted from features, input-transform affine loss,
        differentiable spatial loss; any size) or ``"released"`` (notebook: free per-pixel
        offsets at ``working_size``², aux-vs-final 90° loss, Sobel term without gradient).
        ``working_size``: longest side the optimisation runs at (``"released"``: square side);
        0 = 128 in ``"paper"`` mode, 256 (the notebook's) in ``"released"`` mode.
        ``w_ce`` / ``w_affine`` / ``w_spatial``: loss weights 3.5 / 0.2 / 4.
        ``max_iter``, ``min_labels``, ``min_iter``, ``min_cluster_fraction``: stop when ≤
        ``min_labels`` clusters of at least ``min_cluster_fraction`` of the pixels remain after at
        least ``min_iter`` iterations, or after ``max_iter``. ``None`` = the mode's default
        (:data:`STOP_DEFAULTS`: paper 5 and 0.01, released 3 and 0, the notebook's rule).
        ``seed``: base seed; slice z of a volume uses ``seed + z``.
        ``flatten``: divide out slow shading before clustering (:func:`flatten_shading`;
        its blur width as a share of the longer side; 0 = off, as in the paper).
        ``restarts``: optimisations per image with different seeds, combined by
        :func:`~napari_medseg.engine.clusters.consensus_clusters` with ``consensus_threshold``
        (1 = one run, as in the paper; R runs cost R times as long).
        ``regions``: split each cluster into its connected pieces, pieces under
        ``min_region_fraction`` of the pixels joining a neighbour
        (:func:`~napari_medseg.engine.clusters.split_regions`), so that the lesion is an id of
        its own even when dark corners or hair share its colour (False = clusters, as in the
        paper).
        """
        return {
            "mode": "paper",
            "in_channels": 3,
            "channels": 64,
            "n_conv": 2,
            "working_size": 0,
            "max_iter": 50,
            "min_labels": None,
            "min_iter": 5,
            "min_cluster_fraction": None,
            "lr": 0.2,
            "momentum": 0.9,
            "w_ce": 3.5,
            "w_affine": 0.2,
            "w_spatial": 4.0,
            "max_scale": 1.25,
            "seed": 0,
            "flatten": 0.0,
            "restarts": 1,
            "consensus_threshold": 0.75,
            "regions": False,
            "min_region_fraction": 0.01,
            "deform_impl": "auto",
            "channels_last": True,
        }

    def default_class_names(self) -> list[str]:
        return ["background", "cluster"]

    @property
    def working_size(self) -> int:
        """Longest side the optimisation runs at (``working_size``; 0 = the mode's default).

        ``paper`` mode defaults to 128: on PH², BUSI and Kvasir-SEG it scored at least as well
        as 256 at a quarter of the cost per iteration (docs/models/s3-net.md, Benchmarks);
        ``released`` keeps the notebook's 256².
        """
        size = int(self.config["working_size"])
        if size > 0:
            return size
        return RELEASED_SIZE if self.config["mode"] == "released" else PAPER_SIZE

    def stop_option(self, key: str) -> float:
        """``min_labels`` or ``min_cluster_fraction``: the config's value, or the mode's default."""
        value = self.config.get(key)
        return float(STOP_DEFAULTS[str(self.config["mode"])][key] if value is None else value)

    def build_module(self) -> nn.Module:
        """A fresh, randomly initialised S³-Net (the global torch RNG draws the weights)."""
        mode = str(self.config["mode"])
        if mode not in MODES:
            raise ValueError(f"s3-net: mode must be one of {MODES}, got {mode!r}")
        return S3Net(
            in_channels=int(self.config["in_channels"]),
            channels=int(self.config["channels"]),
            n_conv=int(self.config["n_conv"]),
            mode=mode,
            size=self.working_size,
            deform_impl=str(self.config["deform_impl"]),
        )

    # ----------------------------------------------------------------- one image
    def _working_input(self, x: torch.Tensor) -> torch.Tensor:
        """(1, C, Y, X) in [0, 1] → (1, 3, h, w) at the working resolution."""
        x = match_channels(x, int(self.config["in_channels"]))
        size = self.working_size
        shape = (size, size) if self.config["mode"] == "released" else fit_shape(x.shape[2:], size)
        if tuple(x.shape[2:]) != tuple(shape):
            x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True)
        x = flatten_shading(x.clamp(0.0, 1.0), float(self.config.get("flatten", 0.0)))
        if self.config["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def optimise(
        self,
        x: torch.Tensor,
        seed: int,
        slice_index: int = 0,
        n_slices: int = 1,
        restart: int = 0,
        restarts: int = 1,
    ) -> Generator[Progress, None, torch.Tensor]:
        """Optimise a new network on one image and return its clusters.

        Args:
            x: (1, 3, h, w) float in [0, 1] at the working resolution, on :attr:`device`.
            seed: Seeds the weights, the affine transforms and the Sobel palette.
            slice_index, n_slices: Position in a volume (for the progress record only).
            restart, restarts: Which of the image's seeded runs this is (progress only).

        Yields:
            :class:`Progress` after every SGD step (a cancel point).

        Returns:
            (h, w) int64 raw cluster ids (argmax channels, not yet relabelled).
        """
        cfg = self.config
        max_iter = int(cfg["max_iter"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build_module().to(self.device)
        if cfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.module = model
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]))
        released = cfg["mode"] == "released"
        min_labels, min_fraction = self.stop_option("min_labels"), self.stop_option("min_cluster_fraction")
        for t in range(max_iter):
            opt.zero_grad(set_to_none=True)
            terms: dict[str, torch.Tensor] = {}
            if released:
                r, aux = model.forward_both(x)
                terms["ce"] = float(cfg["w_ce"]) * s3_losses.clustering_ce(r)
                terms["affine"] = float(cfg["w_affine"]) * s3_losses.released_aux_consistency(r, aux)
                labels = r.detach().argmax(1)
                terms["spatial"] = float(cfg["w_spatial"]) * s3_losses.sobel_term(labels, r.shape[1], gen)
            else:
                r = model(x)
                terms["ce"] = float(cfg["w_ce"]) * s3_losses.clustering_ce(r)
                terms["spatial"] = float(cfg["w_spatial"]) * s3_losses.spatial_consistency(r)
                if float(cfg["w_affine"]) > 0:
                    tf = s3_losses.sample_affine(gen, float(cfg["max_scale"]))
                    terms["affine"] = float(cfg["w_affine"]) * s3_losses.affine_consistency(model, x, r, tf)
                labels = r.detach().argmax(1)
            loss = torch.stack(list(terms.values())).sum()
            loss.backward()
            opt.step()
            n_labels = count_clusters(labels)
            n_large = count_clusters(labels, min_fraction) if min_fraction > 0 else n_labels
            large = f" ({n_large} of >= {100 * min_fraction:g} % of the pixels)" if min_fraction > 0 else ""
            run = f", run {restart + 1}/{restarts}" if restarts > 1 else ""
            yield Progress(
                (slice_index * restarts + restart) * max_iter + t + 1,
                n_slices * restarts * max_iter,
                f"slice {slice_index + 1}/{n_slices}{run}: iteration {t + 1}, {n_labels} clusters{large}",
                {
                    "slice": slice_index,
                    "restart": restart,
                    "iteration": t + 1,
                    "clusters": n_labels,
                    "large_clusters": n_large,
                    "loss": float(loss.detach()),
                }
                | {k: float(v.detach()) for k, v in terms.items()},
            )
            if n_large <= min_labels and t + 1 >= int(cfg["min_iter"]):
                break
        # As in the notebook: one more forward, BN still on batch statistics.
        with torch.no_grad():
            return model(x).argmax(1)[0]

    # ----------------------------------------------------------------- segmentation
    def iter_segment(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        allow_untrained: bool = False,
    ) -> Generator[Progress, None, np.ndarray]:
        """Cluster every image/slice with its own optimisation.

        Args:
            image: (Y, X), (Y, X, C) or (Z, Y, X); see :meth:`Segmenter.segment`.
            channel_axis: Axis of RGB channels, if any.
            allow_untrained: Ignored (nothing to train).

        Yields:
            :class:`Progress` per iteration; ``info`` holds slice, iteration, clusters, losses.

        Returns:
            int32 cluster ids of the input's spatial shape, 1..K per slice with 1 = the largest
            cluster of that slice (no 0: every pixel belongs to a cluster).
        """
        prep = self.prepare(image, channel_axis)
        z = prep.data.shape[0]
        out = np.zeros((z,) + prep.data.shape[2:], dtype=np.int32)
        seed = int(self.config["seed"])
        restarts = int(self.config.get("restarts", 1))
        if restarts < 1:
            raise ValueError(f"s3-net: restarts must be at least 1, got {restarts}")
        for i in range(z):
            x = self._working_input(torch.from_numpy(prep.data[i : i + 1]).to(self.device))
            runs = []
            for r in range(restarts):
                # Run r of slice i: seed + i + r·z, so run 0 keeps the single-run seed and
                # no two (slice, run) pairs of a volume share one.
                raw = yield from self.optimise(x, seed + i + r * z, i, z, r, restarts)
                runs.append(raw.to(torch.int64).cpu().numpy())
            if restarts > 1:
                merged = consensus_clusters(runs, float(self.config.get("consensus_threshold", 0.75)))
            else:
                merged = runs[0]
            if self.config.get("regions", False):
                # At the working size: cheaper, and the pieces are those the runs formed.
                merged = split_regions(merged, float(self.config.get("min_region_fraction", 0.01)))
            raw = resize(torch.from_numpy(merged).to(torch.int64)[None, None], out.shape[1:], labels=True)
            out[i] = relabel_by_size(raw[0, 0].numpy())
            per_slice = restarts * int(self.config["max_iter"])
            yield Progress((i + 1) * per_slice, z * per_slice, f"slice {i + 1}/{z} done")
        self.module.eval()
        return out.reshape(prep.spatial_shape)


register(CARD, S3NetSegmenter)
