"""S³-Net stop rule: follow every iteration of `paper` mode and score the rules offline.

For each image the optimisation runs all ``--max-iter`` iterations (no early stop); after every
SGD step the cluster map is recomputed (one extra forward, BN on batch statistics, as the final
prediction is) and scored: the best single cluster's Dice (uncropped, specs §3.4), the centre
cluster's Dice, the cluster sizes, the fraction of pixels that changed cluster, the loss terms
and two label-free scores of the map (``edge``: mean image gradient on cluster boundaries over
the mean gradient; ``r2``: share of the colour variance the cluster means explain). A stop rule
("stop when at most L clusters of at least f of the pixels remain, after at least m
iterations"; or "pick the iteration with the best score"; or "stop when few pixels change")
is then replayed on these trajectories: the loop decides on the labels it sees
before its step and returns the map after it, exactly as
:meth:`napari_medseg.engine.networks.s3_net.S3NetSegmenter.optimise` does.

Usage:
    python benchmarks/bench_s3_stop_rule.py --datasets ph2 busi kvasir_seg --n 20 --threads 1 \\
        --out benchmarks/results/bench_s3_stop_rule.json
    python benchmarks/bench_s3_stop_rule.py --replay /tmp/trajectories.json   # rescore only

Timing is not the point here (every image runs all iterations plus one forward each); the
per-image seconds of a rule are its iterations times the per-iteration cost that
``bench_s3_net.py`` measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import parse_pairs  # noqa: E402
from bench_s3_net import cases  # noqa: E402

import napari_medseg as nms  # noqa: E402
from napari_medseg.engine.clusters import best_cluster, centre_cluster  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402
from napari_medseg.models.s3_losses import SOBEL_X  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_s3_stop_rule.json"
LOSS_TERMS = ("ce", "spatial", "affine")
SCORE_WINDOWS = [(3, 10), (3, 20), (5, 50)]  # iterations among which a score picks the map
CHANGE_STOPS = [0.002, 0.01, 0.02]
RULES = [(3, 0.0), (3, 0.01), (4, 0.0), (4, 0.01), (5, 0.0), (5, 0.01), (6, 0.01), (8, 0.01)]


def trajectory(image: np.ndarray, mask: np.ndarray, max_iter: int, options: dict | None = None) -> list[dict]:
    """Per-iteration records of one image (cluster fractions, change, best and centre Dice).

    ``options`` are further S3-Net options (``--set``), e.g. ``working_size`` or ``w_spatial``.
    """
    seg = nms.load_model(
        "s3-net", device="cpu", max_iter=max_iter, min_labels=0, min_cluster_fraction=0.0, **(options or {})
    )
    prep = seg.prepare(image, None)
    x = seg._working_input(torch.from_numpy(prep.data[0:1]))
    records, prev = [], None
    grey = x[0].mean(0)
    grad = _gradient(grey)
    for step in seg.optimise(x, int(seg.config["seed"])):
        with torch.no_grad():
            lab = seg.module(x).argmax(1)[0]
        full = F.interpolate(lab[None, None].float(), size=mask.shape, mode="nearest-exact")[0, 0]
        full_np = full.long().numpy()
        counts = torch.bincount(lab.reshape(-1))
        fracs = sorted((counts[counts > 0].float() / lab.numel()).tolist(), reverse=True)
        records.append(
            {
                "fracs": [round(f, 5) for f in fracs],
                "change": None if prev is None else float((lab != prev).float().mean()),
                "best": float(best_cluster(full_np, mask)[1]),
                "centre": float(dice(centre_cluster(full_np), mask)),
                "edge": _edge_score(lab, grad),
                "r2": _explained_colour(lab, x[0]),
                "loss": {k: round(float(v), 5) for k, v in step.info.items() if k in LOSS_TERMS},
            }
        )
        prev = lab
    return records


def _gradient(grey: torch.Tensor) -> torch.Tensor:
    """(h, w) Sobel gradient magnitude of a (h, w) grey image (replicated borders)."""
    k = SOBEL_X
    g = F.pad(grey[None, None], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(g, k[None, None])[0, 0]
    gy = F.conv2d(g, k.T[None, None])[0, 0]
    return torch.sqrt(gx**2 + gy**2)


def _edge_score(lab: torch.Tensor, grad: torch.Tensor) -> float:
    """Mean image gradient on cluster boundaries over the mean gradient (label-free)."""
    edge = torch.zeros_like(lab, dtype=torch.bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    if not edge.any():
        return 0.0
    return float(grad[edge].mean() / grad.mean().clamp_min(1e-8))


def _explained_colour(lab: torch.Tensor, rgb: torch.Tensor) -> float:
    """Share of the colour variance that the cluster means explain, (3, h, w) image."""
    flat = rgb.reshape(3, -1).T.double()
    ids = torch.unique(lab.reshape(-1), return_inverse=True)[1]
    n = int(ids.max()) + 1
    sums = torch.zeros(n, 3, dtype=torch.float64).index_add_(0, ids, flat)
    counts = torch.bincount(ids, minlength=n).double()[:, None]
    within = ((flat - (sums / counts)[ids]) ** 2).sum()
    total = ((flat - flat.mean(0)) ** 2).sum()
    return float(1.0 - within / total.clamp_min(1e-12))


def replay(traj: list[dict], min_labels: int, min_fraction: float, min_iter: int = 5) -> tuple[int, dict]:
    """(iterations run, record returned) under one stop rule."""
    for t in range(1, len(traj) + 1):
        if t >= 2 and t >= min_iter:
            seen = traj[t - 2]  # the labels of iteration t's forward = the map after step t - 1
            if sum(1 for f in seen["fracs"] if f >= min_fraction) <= min_labels:
                return t, traj[t - 1]
    return len(traj), traj[-1]


def pick_by_score(traj: list[dict], key: str, lo: int, hi: int) -> tuple[int, dict]:
    """Run ``hi`` iterations and return the map of iterations ``lo..hi`` with the top ``key``.

    A trajectory shorter than the window (a small ``--max-iter``) uses what it has.
    """
    hi = min(hi, len(traj))
    return hi, max(traj[min(lo, hi) - 1 : hi], key=lambda r: r[key])


def stop_on_change(traj: list[dict], eps: float, min_iter: int = 5) -> tuple[int, dict]:
    """Stop once fewer than ``eps`` of the pixels changed cluster in the last step seen."""
    for t in range(max(2, min_iter), len(traj) + 1):
        change = traj[t - 2]["change"]
        if change is not None and change < eps:
            return t, traj[t - 1]
    return len(traj), traj[-1]


def _row(ds: str, rule: object, frac: object, results: list[tuple[int, dict]]) -> dict:
    return {
        "dataset": ds,
        "min_labels": rule,
        "min_cluster_fraction": frac,
        "n": len(results),
        "iterations": float(np.mean([r[0] for r in results])),
        "best": float(np.mean([r[1]["best"] for r in results])),
        "centre": float(np.mean([r[1]["centre"] for r in results])),
    }


def summarise(data: dict[str, list[dict]]) -> list[dict]:
    """One row per (dataset, rule): mean iterations, best and centre Dice.

    Besides the count rules: label-free choices of the iteration by a score of the map
    (``edge``, ``r2``; trajectories recorded since 2026-12-03 only) and stops on the share of
    pixels that changed cluster.
    """
    rows = []
    for ds, images in data.items():
        trajs = [im["traj"] for im in images]
        for min_labels, frac in RULES:
            rows.append(_row(ds, min_labels, frac, [replay(t, min_labels, frac) for t in trajs]))
        if all("edge" in t[0] for t in trajs):
            for key in ("edge", "r2"):
                for lo, hi in SCORE_WINDOWS:
                    name = f"max {key} in {lo}-{hi}"
                    rows.append(_row(ds, name, "", [pick_by_score(t, key, lo, hi) for t in trajs]))
        for eps in CHANGE_STOPS:
            rows.append(_row(ds, f"change < {eps:g}", "", [stop_on_change(t, eps) for t in trajs]))
        oracle = _row(ds, "oracle iteration", "", [(0, max(t, key=lambda r: r["best"])) for t in trajs])
        rows.append(oracle | {"iterations": float("nan"), "centre": float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["ph2", "busi", "kvasir_seg"])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--trajectories", type=Path, default=None, help="also write the raw trajectories here")
    ap.add_argument("--replay", type=Path, nargs="*", default=None, help="rescore saved trajectories only")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="S3-Net options (JSON values)")
    args = ap.parse_args()
    options = parse_pairs(args.set)
    torch.set_num_threads(args.threads)
    data: dict[str, list[dict]] = {}
    if args.replay:
        for path in args.replay:
            data.update(json.loads(path.read_text()))
    else:
        for ds in args.datasets:
            data[ds] = [
                {"case": stem, "traj": trajectory(image, mask, args.max_iter, options)}
                for stem, image, mask in cases(ds, args.n)
            ]
        if args.trajectories:
            args.trajectories.write_text(json.dumps(data))
    rows = summarise(data)
    print(
        f"{'dataset':<11}{'rule (min_labels)':>22}{'min_frac':>9}{'n':>4}{'iters':>7}{'best':>7}{'centre':>8}"
    )
    for r in rows:
        print(
            f"{r['dataset']:<11}{r['min_labels']!s:>22}{r['min_cluster_fraction']!s:>9}{r['n']:>4}"
            f"{r['iterations']:>7.1f}{r['best']:>7.3f}{r['centre']:>8.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"argv": sys.argv, "threads": args.threads, "options": options, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
