"""Benchmark S³-Net (label-free per-image clustering) on PH2, BUSI and Kvasir-SEG.

For every image: run ``s3-net`` (per-image optimisation), then score the cluster map with
- ``best``: the best single cluster's Dice, uncropped (the project's figure, specs §3.4; an oracle
  choice of cluster, as in the paper's protocol, without its ground-truth crop);
- ``centre``: the cluster under the image centre (label-free rule = one click in the middle);
- ``centre_cc``: only the connected piece of that cluster under the centre;
- ``centre_ccf``: that piece with its holes filled (the Segment widget's two check boxes);
- ``cropped``: the released code's GT-cropped protocol (for reference only: it leaks the label);
- with ``--oracle-extras``: oracle choices beyond one cluster (see :func:`oracle_extras`).
Per-image wall time and iterations are reported too.

Usage:
    python benchmarks/bench_s3_net.py [--quick] [--datasets ph2 busi kvasir_seg]
        [--modes paper released] [--n 20] [--working-size 256] [--threads 2] [--square 256]
        [--oracle-extras] [--set KEY=JSON_VALUE ...]
    python benchmarks/bench_s3_net.py --iteration-ab --datasets ph2 --threads 2 \
        --out benchmarks/results/bench_s3_net_iteration.json   # CPU forms (s3_ops) vs before

Data: ``$MEDSEG_DATA`` (default /work/shared/data), read at run time, never copied.
Writes benchmarks/results/bench_s3_net.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

import napari_medseg as nms
from napari_medseg.engine.clusters import best_cluster, centre_cluster, gt_cropped_dice
from napari_medseg.engine.metrics import dice

sys.path.insert(0, str(Path(__file__).parent))
from _common import parse_pairs  # noqa: E402

DATA = Path(os.environ.get("MEDSEG_DATA", "/work/shared/data"))
OUT = Path(__file__).parent / "results" / "bench_s3_net.json"


def cases(dataset: str, n: int, square: int = 0, skip: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` (stem, image, mask>0) pairs of a dataset, sorted by file name, after the first ``skip``.

    ``skip`` > 0 scores images that were not used to choose options (held-out images).

    ``square`` > 0 resizes image (bicubic) and mask (nearest) to ``square``² first, the size
    the issue's speed target names (a 256² image).
    """
    root = DATA / dataset
    out = []
    for ip in sorted((root / "images").iterdir())[skip : skip + n]:
        img, msk = Image.open(ip), Image.open(root / "masks" / ip.name)
        if square:
            img = img.resize((square, square), Image.Resampling.BICUBIC)
            msk = msk.resize((square, square), Image.Resampling.NEAREST)
        out.append((ip.stem, np.array(img), np.array(msk) > 0))
    return out


def oracle_extras(labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Oracle choices beyond one cluster: how far a better choice alone could go.

    ``best_filled``: best cluster with its holes filled; ``best_piece``: best connected piece
    (among the five largest of each cluster), ``best_piece_filled`` that piece filled;
    ``best_union2``: best union of two of the four best clusters (``_filled``: then filled).
    """
    clusters = [labels == k for k in np.unique(labels)]
    pieces = []
    for c in clusters:
        comp, n = ndimage.label(c, structure=np.ones((3, 3), bool))
        sizes = ndimage.sum(c, comp, range(1, n + 1))
        pieces += [comp == j + 1 for j in np.argsort(sizes)[::-1][:5]]
    top = sorted(clusters, key=lambda c: -dice(c, mask))[:4]
    unions = [a | b for i, a in enumerate(top) for b in top[i:]]
    fill = ndimage.binary_fill_holes
    return {
        "best_filled": max(dice(fill(c), mask) for c in clusters),
        "best_piece": max(dice(p, mask) for p in pieces),
        "best_piece_filled": max(dice(fill(p), mask) for p in pieces),
        "best_union2": max(dice(u, mask) for u in unions),
        "best_union2_filled": max(dice(fill(u), mask) for u in unions),
    }


def run_one(mode: str, image: np.ndarray, options: dict) -> tuple[np.ndarray, float, int]:
    """Segment one image; returns (cluster map, seconds, iterations run)."""
    seg = nms.load_model("s3-net", device="cpu", mode=mode, **options)
    t0 = time.perf_counter()
    gen = seg.iter_segment(image)
    iterations = 0
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            labels = stop.value
            break
        iterations = max(iterations, int(p.info.get("iteration", 0)))
    return labels, time.perf_counter() - t0, iterations


def iteration_ab(image: np.ndarray, working_size: int, iterations: int = 6) -> dict[str, float]:
    """Seconds per ``paper`` iteration with and without the CPU forms of ``models/s3_ops.py``.

    All variants run the same seeded optimisation in this process, alternating twice; the first
    two iterations of each run are warm-up. Returns the medians (and minima) of the rest.
    """
    import napari_medseg.models.s3_net as s3_net_module
    from napari_medseg.models import s3_ops

    fast = (s3_ops.depthwise_conv2d, s3_ops.pointwise_conv2d)
    plain = (lambda conv, x: conv(x), lambda conv, x: conv(x))
    sub_lattice = s3_ops.POLYPHASE_MIN_DILATION
    variants = {  # (conv forms, deformable conv, smallest dilation run on sub-lattices)
        "cpu forms + auto deform": (fast, "auto", sub_lattice),
        "cpu forms, no sub-lattices + auto deform": (fast, "auto", 10**6),
        "cpu forms + banded deform": (fast, "banded", sub_lattice),
        "cpu forms + sampling deform": (fast, "sampling", sub_lattice),
        "nn.Conv2d + sampling deform": (plain, "sampling", sub_lattice),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(2):
            for name, ((dw, pw), deform, poly) in variants.items():
                s3_net_module.depthwise_conv2d, s3_net_module.pointwise_conv2d = dw, pw
                s3_ops.POLYPHASE_MIN_DILATION = poly
                seg = nms.load_model(
                    "s3-net", device="cpu", working_size=working_size, min_iter=10**6, deform_impl=deform
                )
                prep = seg.prepare(image, -1 if image.ndim == 3 else None)
                x = seg._working_input(torch.from_numpy(prep.data[0:1]))
                gen, t0 = seg.optimise(x, 0), time.perf_counter()
                for i, _ in enumerate(gen):
                    t1 = time.perf_counter()
                    if i >= 2:
                        times[name].append(t1 - t0)
                    t0 = t1
                    if i + 1 >= iterations:
                        break
    finally:
        s3_net_module.depthwise_conv2d, s3_net_module.pointwise_conv2d = fast
        s3_ops.POLYPHASE_MIN_DILATION = sub_lattice
    out = {f"{k} median (s)": statistics.median(v) for k, v in times.items()}
    return out | {f"{k} min (s)": min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 PH2 images, paper mode only")
    ap.add_argument("--datasets", nargs="+", default=["ph2", "busi", "kvasir_seg"])
    ap.add_argument("--modes", nargs="+", default=["paper", "released"])
    ap.add_argument("--n", type=int, default=20, help="images per dataset")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N images (by name) of each set")
    ap.add_argument("--working-size", type=int, default=0, help="0: the default (paper 128, released 256)")
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--square", type=int, default=0, help="resize every image to N x N first (0 = keep)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--set", nargs="*", default=[], help="S3-Net options KEY=JSON_VALUE (e.g. w_spatial=8)")
    ap.add_argument("--recipe", default=None, help="a named set of run options (e.g. consensus); --set wins")
    ap.add_argument(
        "--oracle-extras", action="store_true", help="also score oracle choices beyond one cluster"
    )
    ap.add_argument(
        "--iteration-ab", action="store_true", help="only time paper iterations with/without CPU conv forms"
    )
    args = ap.parse_args()
    if args.quick:
        args.datasets, args.modes, args.n = ["ph2"], ["paper"], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"working_size": args.working_size, "max_iter": args.max_iter} | parse_pairs(args.set)
    if args.recipe:
        options["recipe"] = args.recipe
    if args.iteration_ab:
        stem, image, _ = cases(args.datasets[0], 1)[0]
        ab = iteration_ab(image, args.working_size)
        for k, v in ab.items():
            print(f"{stem} {args.working_size}: {k:<40}{v:.3f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": torch.get_num_threads(), "case": stem, "load_average": os.getloadavg()}
        args.out.write_text(json.dumps({"meta": meta, "iteration_ab": ab}, indent=1))
        return

    rows, per_image = [], []
    for dataset in args.datasets:
        data = cases(dataset, args.n, args.square, args.skip)
        for mode in args.modes:
            scores: dict[str, list[float]] = {}
            for stem, image, mask in data:
                labels, secs, iters = run_one(mode, image, options)
                rec = {
                    "best": best_cluster(labels, mask)[1],
                    "centre": dice(centre_cluster(labels), mask),
                    "centre_cc": dice(centre_cluster(labels, connected=True), mask),
                    "centre_ccf": dice(centre_cluster(labels, connected=True, fill_holes=True), mask),
                    "cropped": gt_cropped_dice(labels, mask),
                    "seconds": secs,
                    "iterations": iters,
                    "clusters": int(labels.max()),
                } | (oracle_extras(labels, mask) if args.oracle_extras else {})
                for k, v in rec.items():
                    scores.setdefault(k, []).append(float(v))
                per_image.append({"dataset": dataset, "mode": mode, "case": stem, **rec})
                print(
                    f"  {dataset} {mode} {stem}: " + " ".join(f"{k}={v:.3f}" for k, v in rec.items()),
                    flush=True,
                )
            rows.append(
                {"dataset": dataset, "mode": mode, "n": len(data)}
                | {k: statistics.mean(v) for k, v in scores.items()}
            )

    header = (
        f"{'dataset':<11}{'mode':<10}{'n':>3}{'best':>7}{'centre':>8}{'ctr_cc':>8}{'ctr_ccf':>8}"
        f"{'cropped*':>9}{'s/img':>8}{'iters':>7}{'K':>5}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['dataset']:<11}{r['mode']:<10}{r['n']:>3}{r['best']:>7.3f}{r['centre']:>8.3f}{r['centre_cc']:>8.3f}"
            f"{r['centre_ccf']:>8.3f}"
            f"{r['cropped']:>9.3f}{r['seconds']:>8.1f}{r['iterations']:>7.1f}{r['clusters']:>5.1f}"
        )
    print("* cropped = released GT-cropped protocol, leaks the label; reference only")
    extras = [k for k in rows[0] if k.startswith("best_")] if rows else []
    if extras:
        print(f"{'dataset':<11}{'mode':<10}" + "".join(f"{k:>20}" for k in extras))
        for r in rows:
            print(f"{r['dataset']:<11}{r['mode']:<10}" + "".join(f"{r[k]:>20.3f}" for k in extras))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "load_average_at_end": os.getloadavg(),
        "options": options,
        "argv": vars(args) | {"out": str(args.out)},
    }
    args.out.write_text(json.dumps({"meta": meta, "summary": rows, "images": per_image}, indent=1))


if __name__ == "__main__":
    main()
