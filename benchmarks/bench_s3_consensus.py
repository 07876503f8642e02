"""How many S³-Net runs to combine, and at which consensus threshold (offline, one capture).

Optimises ``--runs`` seeded networks per image once (run r uses ``seed + r``, exactly as
``load_model("s3-net", restarts=R)`` does for a 2-D image), keeps every run's cluster map at
the working resolution in an ``.npz`` file, and then scores the consensus of the first R runs
(``engine.clusters.consensus_clusters``, taken at the working resolution and scaled back to the
image as the product does) for every R in ``--subsets`` and every threshold in
``--thresholds``: best single cluster (uncropped) and one click in the middle (centre,
connected, filled). The capture is the slow part; a second call with the same ``--maps`` file
only rescores; ``--regions`` rescores the same maps split into connected regions (as the
option ``regions=True`` does). This is how the *consensus* recipe was chosen
(docs/models/s3-net.md).

Usage::

    python benchmarks/bench_s3_consensus.py --dataset ph2 --skip 20 --n 40 --runs 10 --threads 1 \\
        --set channels=16 flatten=0.25 --maps /tmp/ph2_21_60_c16.npz --name s3_consensus_ph2_21_60_c16

Data: ``$MEDSEG_DATA`` (default /work/shared/data), read at run time, never copied.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parse_pairs, save, table  # noqa: E402
from bench_s3_net import cases  # noqa: E402

import napari_medseg as nms  # noqa: E402
from napari_medseg.engine.clusters import (  # noqa: E402
    best_cluster,
    centre_cluster,
    consensus_clusters,
    split_regions,
)
from napari_medseg.engine.metrics import dice  # noqa: E402
from napari_medseg.engine.runner import drain, resize  # noqa: E402


def capture(image: np.ndarray, runs: int, options: dict) -> np.ndarray:
    """(runs, h, w) int16 cluster maps at the working resolution, run r seeded ``seed + r``."""
    seg = nms.load_model("s3-net", device="cpu", **options)
    prep = seg.prepare(image)
    x = seg._working_input(torch.from_numpy(prep.data[0:1]).to(seg.device))
    seed = int(seg.config["seed"])
    maps = [drain(seg.optimise(x, seed + r, 0, 1, r, runs)).cpu().numpy() for r in range(runs)]
    return np.stack(maps).astype(np.int16)


def to_image(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour scaling of a working-resolution map back to the image (as the product)."""
    return resize(torch.from_numpy(labels.astype(np.int64))[None, None], shape, labels=True)[0, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ph2")
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--square", type=int, default=0, help="resize every image to this square first (0 = off)")
    ap.add_argument("--runs", type=int, default=10, help="runs captured per image")
    ap.add_argument("--subsets", type=int, nargs="+", default=[1, 3, 5, 7, 10])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.65, 0.7, 0.75, 0.8])
    ap.add_argument("--set", nargs="*", default=[], help="S3-Net options KEY=JSON_VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--maps", type=Path, required=True, help=".npz of captured maps (reused if present)")
    ap.add_argument(
        "--regions", action="store_true", help="split the consensus into connected regions (as regions=True)"
    )
    ap.add_argument("--name", default="s3_consensus")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = parse_pairs(args.set)
    data = cases(args.dataset, args.n, square=args.square, skip=args.skip)
    t0 = time.perf_counter()
    if args.maps.is_file():
        stored = np.load(args.maps)
        maps = {stem: stored[stem] for stem, _, _ in data}
    else:
        maps = {}
        for stem, image, _ in data:
            maps[stem] = capture(image, args.runs, options)
            print(f"  captured {stem}: {len(maps[stem])} runs", flush=True)
        args.maps.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.maps, **maps)
    capture_s = time.perf_counter() - t0
    rows = []
    for r in args.subsets:
        for threshold in args.thresholds if r > 1 else args.thresholds[:1]:
            best, click, clusters = [], [], []
            for stem, _, mask in data:
                runs = list(maps[stem][:r])
                merged = consensus_clusters(runs, threshold) if r > 1 else runs[0]
                if args.regions:
                    merged = split_regions(merged, float(options.get("min_region_fraction", 0.01)))
                labels = to_image(merged, mask.shape)
                best.append(best_cluster(labels, mask)[1])
                click.append(dice(centre_cluster(labels, connected=True, fill_holes=True), mask))
                clusters.append(len(np.unique(labels)))
            rows.append(
                {
                    "runs": r,
                    "threshold": threshold if r > 1 else "-",
                    "best": statistics.mean(best),
                    "click": statistics.mean(click),
                    "clusters": statistics.mean(clusters),
                }
            )
    print(table(rows, ["runs", "threshold", "best", "click", "clusters"]))
    meta = {"argv": vars(args) | {"maps": str(args.maps)}, "options": options, "capture_s": capture_s}
    print("wrote", save(args.name, {"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
