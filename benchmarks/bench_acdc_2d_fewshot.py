"""The two ACDC atlases of the EFS-MedSeg benchmark, given to a 2-D few-shot network instead.

    python benchmarks/bench_acdc_2d_fewshot.py [--network hf-sam] [--fold F] [--seed S]
        [--steps N] [--threads T] [--train-set KEY=JSON_VALUE ...] [--name JSON_NAME]

Same split as ``bench_efs_medseg.py --fold F`` (ACDC: the ED frames of two patients labeled,
the other six patients' 12 volumes scored), but the labeled slices of the two atlases train a
2-D network through the same ``finetune`` a user runs from the Fine-tune widget (every slice
with a label is a training slice; the unlabeled volumes are not used), and each test volume is
segmented slice by slice. Dice per class on each whole volume, as in the EFS-MedSeg
benchmark, so the two rows compare: which network should a user with two labeled cine-MRI
volumes pick? Prints one row and writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import parse_pairs, peak_rss_mb, save, table  # noqa: E402
from bench_efs_medseg import CLASSES, load, split  # noqa: E402


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune the 2-D network on the atlases' slices and score the test volumes."""
    import torch

    import napari_medseg as nms
    from napari_medseg.engine.metrics import dice_per_class

    torch.set_num_threads(args.threads)
    atl, _, test = split("acdc", False, fold=args.fold)
    a = [load("acdc", s) for s in atl]
    torch.manual_seed(args.seed)
    seg = nms.load_model(args.network, device="cpu")
    t0 = time.perf_counter()
    last = None
    for last in seg.finetune(
        [x[0] for x in a],
        [x[1] for x in a],
        steps=args.steps,
        seed=args.seed,
        class_names=CLASSES["acdc"],
        **parse_pairs(args.train_set),
    ):
        if last.step % max(1, (last.total or 1) // 10) == 0:
            print(f"  step {last.step}/{last.total} loss {last.loss:.3f} {last.metrics}", flush=True)
    train_s = time.perf_counter() - t0
    per: dict[int, list[float]] = {}
    per_volume: dict[str, list[float]] = {}
    t1 = time.perf_counter()
    for stem in test:
        img, lab, _ = load("acdc", stem)
        scores = dice_per_class(np.asarray(seg.segment(img)), lab, 4)
        per_volume[stem] = [round(float(v), 4) for _, v in sorted(scores.items())]
        for c, d in scores.items():
            per.setdefault(c, []).append(d)
        print(f"  {stem} {per_volume[stem]}", flush=True)
    row: dict[str, Any] = {
        "network": args.network,
        "fold": args.fold,
        "seed": args.seed,
        "steps": last.total if last else args.steps,
        "train_options": parse_pairs(args.train_set),
    }
    for c, v in sorted(per.items()):
        row[CLASSES["acdc"][c - 1]] = float(np.mean(v))
    row["mean_dice"] = float(np.mean([row[n] for n in CLASSES["acdc"]]))
    row.update(
        train_min=train_s / 60,
        infer_s_per_volume=(time.perf_counter() - t1) / len(test),
        peak_rss_mb=peak_rss_mb(),
        atlases=atl,
        test=test,
        per_volume=per_volume,
        best_val=last.best if last else None,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default="hf-sam", help="a trainable 2-D network (hf-sam, sts-net, ms-lkseg)")
    ap.add_argument("--fold", type=int, default=0, help="split rotation, as bench_efs_medseg.py --fold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the network's own)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--train-set", action="append", default=[], help="training option KEY=JSON_VALUE")
    ap.add_argument("--name", default=None, help="JSON name under benchmarks/results")
    args = ap.parse_args()
    row = run(args)
    cols = ["network", "fold", "seed", "steps", *CLASSES["acdc"], "mean_dice"]
    print(table([row], [*cols, "train_min", "infer_s_per_volume", "peak_rss_mb"]))
    name = args.name or f"acdc_2d_{args.network}_fold{args.fold}_seed{args.seed}"
    print("saved", save(name, {"rows": [row], "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
