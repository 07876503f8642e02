"""S³-Net stop rule: follow every iteration of `paper` mode and score the rules offline.

For each image the optimisation runs all ``--max-iter`` iterations (no early stop); after every
SGD step the cluster map is recomputed (one extra forward, BN on batch statistics, as the final
prediction is) and scored: the best single cluster's Dice (uncropped, specs §3.4), the centre
cluster's Dice, the cluster sizes and the fraction of pixels that changed cluster. A stop rule
("stop when at most L clusters of at least f of the pixels remain, after at least m
iterations") is then replayed on these trajectories: the loop decides on the labels it sees
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
from bench_s3_net import cases  # noqa: E402

import napari_medseg as nms  # noqa: E402
from napari_medseg.engine.clusters import best_cluster, centre_cluster  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_s3_stop_rule.json"
RULES = [(3, 0.0), (3, 0.01), (4, 0.0), (4, 0.01), (5, 0.0), (5, 0.01), (6, 0.01), (8, 0.01)]


def trajectory(image: np.ndarray, mask: np.ndarray, max_iter: int) -> list[dict]:
    """Per-iteration records of one image (cluster fractions, change, best and centre Dice)."""
    seg = nms.load_model("s3-net", device="cpu", max_iter=max_iter, min_labels=0, min_cluster_fraction=0.0)
    prep = seg.prepare(image, None)
    x = seg._working_input(torch.from_numpy(prep.data[0:1]))
    records, prev = [], None
    for _ in seg.optimise(x, int(seg.config["seed"])):
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
            }
        )
        prev = lab
    return records


def replay(traj: list[dict], min_labels: int, min_fraction: float, min_iter: int = 5) -> tuple[int, dict]:
    """(iterations run, record returned) under one stop rule."""
    for t in range(1, len(traj) + 1):
        if t >= 2 and t >= min_iter:
            seen = traj[t - 2]  # the labels of iteration t's forward = the map after step t - 1
            if sum(1 for f in seen["fracs"] if f >= min_fraction) <= min_labels:
                return t, traj[t - 1]
    return len(traj), traj[-1]


def summarise(data: dict[str, list[dict]]) -> list[dict]:
    """One row per (dataset, rule): mean iterations, best and centre Dice."""
    rows = []
    for ds, images in data.items():
        for min_labels, frac in RULES:
            res = [replay(im["traj"], min_labels, frac) for im in images]
            rows.append(
                {
                    "dataset": ds,
                    "min_labels": min_labels,
                    "min_cluster_fraction": frac,
                    "n": len(images),
                    "iterations": float(np.mean([r[0] for r in res])),
                    "best": float(np.mean([r[1]["best"] for r in res])),
                    "centre": float(np.mean([r[1]["centre"] for r in res])),
                }
            )
        rows.append(
            {
                "dataset": ds,
                "min_labels": "oracle iteration",
                "min_cluster_fraction": "",
                "n": len(images),
                "iterations": float("nan"),
                "best": float(np.mean([max(r["best"] for r in im["traj"]) for im in images])),
                "centre": float("nan"),
            }
        )
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data: dict[str, list[dict]] = {}
    if args.replay:
        for path in args.replay:
            data.update(json.loads(path.read_text()))
    else:
        for ds in args.datasets:
            data[ds] = [
                {"case": stem, "traj": trajectory(image, mask, args.max_iter)}
                for stem, image, mask in cases(ds, args.n)
            ]
        if args.trajectories:
            args.trajectories.write_text(json.dumps(data))
    rows = summarise(data)
    print(f"{'dataset':<11}{'min_labels':>17}{'min_frac':>9}{'n':>4}{'iters':>7}{'best':>7}{'centre':>8}")
    for r in rows:
        print(
            f"{r['dataset']:<11}{r['min_labels']!s:>17}{r['min_cluster_fraction']!s:>9}{r['n']:>4}"
            f"{r['iterations']:>7.1f}{r['best']:>7.3f}{r['centre']:>8.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
