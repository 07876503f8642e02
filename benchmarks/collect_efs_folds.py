"""Merge EFS-MedSeg runs over rotated splits (``bench_efs_medseg.py --fold F``) into one table.

Each fold trains on its own two atlases and scores its own six test patients, so a single
split's mean depends on which patients it happens to test. This prints, per run, the fold's
atlases and per-class Dice; then the mean over folds (per seed and over all runs) and each
patient's mean Dice over the runs that tested it, and (ACDC) the mean per cardiac phase.

Usage:
    python benchmarks/collect_efs_folds.py results/efs_acdc_fold*_seed*_1500.json ... [--name NAME]

Runs without a ``fold`` field are fold 0 (the split used before folds existed). Writes
benchmarks/results/<NAME>.json (default ``efs_acdc_folds``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from _common import save, table


def patient(stem: str) -> str:
    """``patient039_frame01`` → ``patient039``; LA-2018 stems are their own patient."""
    return stem.split("_frame")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--name", default="efs_acdc_folds")
    args = ap.parse_args()
    runs = []
    for f in args.files:
        for row in json.loads(f.read_text()).get("rows", []):
            if "per_volume" in row:
                runs.append(row | {"fold": row.get("fold", 0), "file": f.name})
    runs.sort(key=lambda r: (r["seed"], r["fold"]))
    classes = [c for c in ("RV", "myocardium", "LV", "left atrium") if c in runs[0]]
    for r in runs:
        r["atlas patients"] = " ".join(sorted({patient(s) for s in r["atlases"]}))
    print(table(runs, ["seed", "fold", "atlas patients", *classes, "mean_dice", "train_min", "file"]))

    by_seed: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        by_seed[r["seed"]].append(r["mean_dice"])
    summary = [
        {"seed": s, "folds": len(v), "mean over folds": float(np.mean(v)), "min": min(v), "max": max(v)}
        for s, v in sorted(by_seed.items())
    ]
    overall = float(np.mean([r["mean_dice"] for r in runs]))
    print()
    print(table(summary, ["seed", "folds", "mean over folds", "min", "max"]))
    print(f"\nmean over all {len(runs)} runs: {overall:.3f}")

    scores: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        for stem, dice in r["per_volume"].items():
            scores[patient(stem)].append(float(np.mean(dice)))
    per_patient = [
        {"patient": p, "volumes scored": len(v), "mean Dice": float(np.mean(v))}
        for p, v in sorted(scores.items())
    ]
    print()
    print(table(per_patient, ["patient", "volumes scored", "mean Dice"]))
    phases: dict[str, list[list[float]]] = defaultdict(list)
    for r in runs:
        for stem, dice in r["per_volume"].items():
            if "_frame" in stem:  # ACDC: frame01 is end-diastole, the other frame end-systole
                phases["ED" if stem.endswith("_frame01") else "ES"].append(dice)
    per_phase = [
        {
            "phase": ph,
            "volumes scored": len(v),
            **dict(zip(classes, np.mean(v, 0).tolist())),
            "mean Dice": float(np.mean(v)),
        }
        for ph, v in sorted(phases.items())
    ]
    if per_phase:
        print()
        print(table(per_phase, ["phase", "volumes scored", *classes, "mean Dice"]))
    keep = ["seed", "fold", "atlases", "unlabeled", "test", *classes, "mean_dice", "per_volume", "file"]
    print(
        "saved",
        save(
            args.name,
            {
                "runs": [{k: r[k] for k in keep if k in r} for r in runs],
                "by_seed": summary,
                "mean_over_runs": overall,
                "per_patient": per_patient,
                "per_phase": per_phase,
            },
        ),
    )


if __name__ == "__main__":
    main()
