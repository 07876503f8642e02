"""STS-Net benchmark: Dice with and without the small-target augmentation, CPU timings.

Trains ``sts-net`` through the shared loop (``Segmenter.finetune``) on the development split of
a data set under ``$MEDSEG_DATA`` (default /work/shared/data), then reports, per arm
(small-target augmentation on / off):

* mean foreground Dice on held-back cases, overall and on the small-target cases (the
  smallest third of held-back foreground shares);
* training seconds per step and per epoch (one pass over the original training slices);

and, once, CPU inference seconds per 256² and 512² slice (median of repeats, one slice per
call, ``torch`` threads as set by ``--threads``).

Data sets (``--datasets``): ``busi`` (breast ultrasound, seeded 80/20 split), ``cvc-kvasir``
(train CVC-ClinicDB, test Kvasir-SEG), ``drive`` (15 train / 5 test, Dice inside the FOV).
The data are research-only and are read at run time, never copied.

Usage::

    python benchmarks/bench_sts_net.py                # full run (hours on a 2-core CPU)
    python benchmarks/bench_sts_net.py --quick        # minutes: small size, few steps
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

import napari_medseg as nms
from napari_medseg.engine.metrics import dice

DATA = Path(os.environ.get("MEDSEG_DATA", "/work/shared/data"))
RESULTS = Path(__file__).parent / "results" / "bench_sts_net.json"


def _load(folder: Path, stems: list[str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for ip in sorted((folder / "images").iterdir()):
        if stems is not None and ip.stem not in stems:
            continue
        image = np.array(Image.open(ip))
        mask = (np.array(Image.open(folder / "masks" / ip.name)) > 0).astype(np.uint8)
        out.append((ip.stem, image, mask))
    return out


def split(name: str, seed: int, limit: int) -> tuple[list, list, dict[str, np.ndarray]]:
    """(train cases, test cases, FOV masks by test stem) of one data set."""
    rng = np.random.default_rng(seed)
    fov: dict[str, np.ndarray] = {}
    if name == "busi":
        cases = _load(DATA / "busi")
        order = rng.permutation(len(cases))
        n_test = len(cases) // 5
        test, train = [cases[i] for i in order[:n_test]], [cases[i] for i in order[n_test:]]
    elif name == "cvc-kvasir":
        train, test = _load(DATA / "cvc_clinicdb"), _load(DATA / "kvasir_seg")
    elif name == "drive":
        cases = _load(DATA / "drive")
        train, test = cases[:15], cases[15:]
        for stem, _, _ in test:
            fov[stem] = np.array(Image.open(DATA / "drive" / "fov" / f"{stem}.png")) > 0
    else:
        raise ValueError(f"unknown data set {name!r}")
    if limit:
        train = [train[i] for i in sorted(rng.permutation(len(train))[:limit])]
        test = [test[i] for i in sorted(rng.permutation(len(test))[: max(4, limit // 3)])]
    return train, test, fov


def evaluate(seg, test, fov) -> dict[str, float]:
    """Mean Dice overall and on the smallest third of targets (by foreground share)."""
    scores, shares = [], []
    for stem, image, mask in test:
        pred = seg.segment(image) == 1
        ref = mask == 1
        if stem in fov:
            pred, ref = pred & fov[stem], ref & fov[stem]
        scores.append(dice(pred, ref))
        shares.append(ref.mean())
    order = np.argsort(shares)[: max(1, len(shares) // 3)]
    return {
        "dice": float(np.mean(scores)),
        "dice_small": float(np.mean([scores[i] for i in order])),
        "small_max_fg_pct": float(100 * max(shares[i] for i in order)),
        "n_test": len(scores),
    }


def train_arm(name, train, test, fov, small: bool, args) -> dict[str, float]:
    torch.manual_seed(args.seed)
    seg = nms.load_model("sts-net", device=args.device, input_size=args.size)
    images = [c[1] for c in train]
    labels = [c[2] for c in train]
    opts = {"steps": args.steps, "seed": args.seed, "batch_size": args.batch, "lr": args.lr}
    opts["val_every"] = args.steps  # one validation at the end: the loop keeps the last weights
    t0 = time.perf_counter()
    records = list(seg.finetune(images, labels, small_target=small, val_fraction=0.1, **opts))
    last = records[-1] if records else None
    train_s = time.perf_counter() - t0
    per_step = train_s / args.steps
    n_train = round(len(train) * 0.9)
    result = {
        "train_s": round(train_s, 1),
        "s_per_step": round(per_step, 2),
        "s_per_epoch": round(per_step * max(1, -(-n_train // args.batch)), 1),
        "final_loss": round(float(last.loss), 4) if last else float("nan"),
    }
    result.update({k: round(v, 4) for k, v in evaluate(seg, test, fov).items()})
    return result


def time_inference(size: int, repeats: int, output_stride: int = 8) -> float:
    """Median seconds to segment one size² slice (network input = size, one pass)."""
    seg = nms.load_model("sts-net", device="cpu", input_size=size, output_stride=output_stride)
    image = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)
    seg.segment(image, allow_untrained=True)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        seg.segment(image, allow_untrained=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small size, few steps, few cases")
    ap.add_argument("--datasets", default="busi,cvc-kvasir,drive")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--limit", type=int, default=0, help="at most this many training cases")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="training device (inference is timed on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true", help="timings only")
    ap.add_argument("--skip-inference", action="store_true", help="training arms only")
    ap.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.size, args.steps, args.limit, args.repeats = "busi", 64, 20, 16, 2
        args.batch, args.lr = 2, 1e-3
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, load average {load:.1f} at start",
        "args": vars(args),
        "inference_s": {},
        "datasets": {},
    }
    if not args.skip_inference:
        for size in (256, 512):
            report["inference_s"][f"{size}"] = round(time_inference(size, args.repeats), 3)
            report["inference_s"][f"{size}_os16"] = round(time_inference(size, args.repeats, 16), 3)
        inf = report["inference_s"]
        print(f"inference per slice: 256² {inf['256']} s, 512² {inf['512']} s (output stride 8)")
        print(f"inference per slice: 256² {inf['256_os16']} s, 512² {inf['512_os16']} s (output stride 16)")
        _save(report, args.out)
    if not args.skip_train:
        head = ("data set", "small-target", "Dice", "Dice small", "s/step", "s/epoch")
        print("{:12} {:12} {:>6} {:>10} {:>7} {:>8}".format(*head))
        for name in args.datasets.split(","):
            train, test, fov = split(name, args.seed, args.limit)
            arms = {}
            for small in (False, True):
                r = train_arm(name, train, test, fov, small, args)
                arms["on" if small else "off"] = r
                row = (name, "on" if small else "off", r["dice"], r["dice_small"])
                print("{:12} {:12} {:6.3f} {:10.3f}".format(*row), end=" ")
                print(f"{r['s_per_step']:7.2f} {r['s_per_epoch']:8.1f}", flush=True)
                report["datasets"][name] = {"n_train": len(train), **arms}
                _save(report, args.out)
    print(f"wrote {args.out}")
    return 0


def _save(report: dict, out: str) -> None:
    """Write the JSON after every measurement, so an interrupted run keeps what it measured."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
