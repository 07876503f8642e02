"""Benchmark MS-LKSeg (and STS-Net on the same splits, if registered) on development data.

For each dataset (BUSI, Kvasir-SEG, PH2 under $MEDSEG_DATA, default /work/shared/data) the
cases are shuffled with a fixed seed; the first ``--train`` cases are trained on through the
shared fine-tune loop (``seg.finetune``) and the next ``--test`` cases are held back and scored
(foreground Dice of ``seg.segment`` at the image's own resolution). Also measured: parameters,
FLOPs of one 256² forward (torch.utils.flop_counter, 1 FLOP = 1 multiply or add), CPU
time of one 256² forward (median; MS-LKSeg fused and unfused) and training time per epoch.

    python benchmarks/bench_ms_lkseg.py            # full: 256² input, 20 train / 10 test, 200 steps
    python benchmarks/bench_ms_lkseg.py --quick    # 128² input, 8 train / 5 test, 30 steps

Prints a table and writes benchmarks/results/bench_ms_lkseg.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import napari_medseg as nms
from napari_medseg.engine.metrics import dice

DATASETS = ("busi", "kvasir_seg", "ph2")


def load_split(root: Path, name: str, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """((image, mask) train pairs, held-back pairs); images (H, W) grey or (H, W, 3) RGB."""
    stems = sorted(p.name for p in (root / name / "images").iterdir())
    order = np.random.default_rng(seed).permutation(len(stems))
    pick = [stems[i] for i in order[: n_train + n_test]]
    pairs = [
        (
            np.array(Image.open(root / name / "images" / s)),
            (np.array(Image.open(root / name / "masks" / s)) > 0).astype(np.uint8),
        )
        for s in pick
    ]
    return pairs[:n_train], pairs[n_train:]


def count_flops(module: torch.nn.Module, channels: int, size: int = 256) -> int:
    x = torch.rand(1, channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def time_forward(module: torch.nn.Module, channels: int, size: int = 256, repeats: int = 5) -> float:
    x = torch.rand(1, channels, size, size)
    times = []
    with torch.inference_mode():
        module(x)
        for _ in range(repeats):
            t = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_skips(module: torch.nn.Module, channels: int, size: int = 256, repeats: int = 5) -> float:
    """Median CPU time of the LD skip blocks alone (``module.skips``) for one 256² input.

    The skips' inputs are recorded with hooks during one forward, then the blocks are timed on
    tensors of those shapes, so the figure isolates what ``fuse()`` changes.
    """
    shapes: list[torch.Size] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: shapes.append(a[0].shape)) for m in module.skips]
    with torch.inference_mode():
        module(torch.rand(1, channels, size, size))
    for h in hooks:
        h.remove()
    inputs = [torch.rand(s) for s in shapes]

    def run() -> None:
        for blk, x in zip(module.skips, inputs):
            blk(x)

    times = []
    with torch.inference_mode():
        run()
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_network(
    name: str, options: dict[str, Any], train: list, test: list, args: argparse.Namespace
) -> dict[str, Any]:
    torch.manual_seed(0)
    seg = nms.load_model(name, device="cpu", **options)
    images = [p[0] for p in train]
    labels = [p[1] for p in train]
    t0 = time.perf_counter()
    records = list(
        seg.finetune(images, labels, steps=args.steps, batch_size=args.batch, seed=0, val_fraction=0.2)
    )
    last = records[-1] if records else None
    train_s = time.perf_counter() - t0
    assert last is not None
    n_train_slices = max(1, len(train) - max(1, round(len(train) * 0.2)))
    per_epoch = math.ceil(n_train_slices / args.batch)
    scores = [dice(seg.segment(img) == 1, mask == 1) for img, mask in test]
    module = seg.module.eval()
    out: dict[str, Any] = {
        "dice_mean": float(np.mean(scores)),
        "dice_std": float(np.std(scores)),
        "n_train": len(train),
        "n_test": len(test),
        "best_val_dice": float(last.best),
        "steps": args.steps,
        "train_s": round(train_s, 1),
        "train_s_per_epoch": round(train_s / args.steps * per_epoch, 2),
        "params": sum(p.numel() for p in module.parameters()),
    }
    return out


def static_figures(name: str, options: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Params, FLOPs and CPU time at 256² (fused and unfused for MS-LKSeg)."""
    torch.manual_seed(0)
    seg = nms.load_model(name, device="cpu", **{k: v for k, v in options.items() if k != "input_size"})
    module = seg.module.eval()
    ch = int(seg.config.get("in_channels", 3))
    res: dict[str, Any] = {
        "params": sum(p.numel() for p in module.parameters()),
        "gflops_256": round(count_flops(module, ch) / 1e9, 3),
        "cpu_s_256": round(time_forward(module, ch, repeats=repeats), 3),
    }
    if hasattr(module, "fuse"):
        fused = copy.deepcopy(module).fuse()
        res["params_fused"] = sum(p.numel() for p in fused.parameters())
        res["gflops_256_fused"] = round(count_flops(fused, ch) / 1e9, 3)
        res["cpu_s_256_fused"] = round(time_forward(fused, ch, repeats=repeats), 3)
        res["ld_skips_s_256"] = round(time_skips(module, ch, repeats=repeats), 4)
        res["ld_skips_s_256_fused"] = round(time_skips(fused, ch, repeats=repeats), 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="128² input, 8/5 cases, 30 steps")
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), help="none: static figures only")
    ap.add_argument("--train", type=int, default=None)
    ap.add_argument("--test", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--no-sts", action="store_true", help="skip the STS-Net comparison")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_ms_lkseg.json"))
    args = ap.parse_args()
    q = args.quick
    args.train = args.train or (8 if q else 20)
    args.test = args.test or (5 if q else 10)
    args.steps = args.steps or (30 if q else 200)
    args.batch = args.batch or (2 if q else 4)
    size = args.input_size or (128 if q else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(os.environ.get("MEDSEG_DATA", "/work/shared/data"))

    nets: dict[str, dict[str, Any]] = {"ms-lkseg": {"input_size": size}}
    sts_note = ""
    if not args.no_sts:
        try:
            nms.model_card("sts-net")
            nets["sts-net"] = {"input_size": size}
        except Exception as err:  # noqa: BLE001 - report why the comparison is missing
            sts_note = f"sts-net unavailable: {err}"
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f} at start",
        "config": {
            "train": args.train,
            "test": args.test,
            "steps": args.steps,
            "batch": args.batch,
            "input_size": size,
            "quick": q,
        },
        "note": sts_note,
        "static": {},
        "datasets": {},
    }
    for name, opts in nets.items():
        results["static"][name] = static_figures(name, opts, repeats=3 if q else 5)
        print(name, results["static"][name], flush=True)
    for ds in args.datasets:
        train, test = load_split(root, ds, args.train, args.test, seed=0)
        results["datasets"][ds] = {}
        for name, opts in nets.items():
            r = run_network(name, opts, train, test, args)
            results["datasets"][ds][name] = r
            print(ds, name, r, flush=True)
    results["load_avg_end"] = round(os.getloadavg()[0], 1)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print()
    print("| network | params | GFLOPs 256² | CPU s/256² (unfused / fused) | LD skips s (unfused / fused) |")
    print("|---|---|---|---|---|")
    for name, s in results["static"].items():
        fused = f" / {s['cpu_s_256_fused']}" if "cpu_s_256_fused" in s else ""
        ld = f"{s['ld_skips_s_256']} / {s['ld_skips_s_256_fused']}" if "ld_skips_s_256" in s else ""
        print(f"| {name} | {s['params'] / 1e6:.2f} M | {s['gflops_256']} | {s['cpu_s_256']}{fused} | {ld} |")
    print()
    print("| dataset | network | held-back Dice (mean ± sd) | train s/epoch | steps |")
    print("|---|---|---|---|---|")
    for ds, per in results["datasets"].items():
        for name, r in per.items():
            print(
                f"| {ds} | {name} | {r['dice_mean']:.3f} ± {r['dice_std']:.3f} "
                f"| {r['train_s_per_epoch']} | {r['steps']} |"
            )
    if sts_note:
        print(sts_note)
    print(f"machine: {results['machine']}; load avg at end {results['load_avg_end']}")


if __name__ == "__main__":
    main()
