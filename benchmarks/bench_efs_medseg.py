"""EFS-MedSeg few-shot 3-D benchmark: 2 atlases + unlabeled volumes, ablation of each component.

    python benchmarks/bench_efs_medseg.py [--quick] [--datasets acdc,la2018]
        [--variants full,no_switch,no_vae,no_contrast,no_spatial]
        [--name JSON_NAME] [--set KEY=JSON_VALUE ...] [--save-dir DIR] [--steps N] [--scale cpu]
        [--atlases 2|3] [--seed N] [--augment PRESET] [--tta TURNS] [--train-set KEY=JSON_VALUE ...]
        [--atlas-frames] [--transductive] [--fold F] [--one-patient | --mixed-phases]

For each dataset: two labeled volumes (atlases), four unlabeled volumes (six with
``--atlas-frames`` on ACDC: the atlas patients' ES frames too; the test volumes as well with
``--transductive``, which then no longer scores unseen data), per-class Dice on the
remaining development volumes (disjoint by patient for ACDC). ``--fold F`` rotates the
sorted patients (ACDC; LA-2018: the sorted volumes) by 2F before that split, so folds 0-4
(ACDC) or 0-5 (LA-2018) make every patient an atlas once and a test case three times. Each
variant trains in its own subprocess so its peak memory (ru_maxrss) and time are its own.
Reads the research-only data from $MEDSEG_DATA (default ../shared/data) at run time; nothing
is copied.

ACDC files store no spacing (identity affine); we assume 10 mm slices and 1.5 mm pixels,
typical of ACDC. LA-2018 headers give 0.625 mm isotropic.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, parse_pairs, peak_rss_mb, save, table  # noqa: E402

VARIANTS = {
    "full": {},
    "no_switch": {"use_switch": False},
    "no_vae": {"use_vae": False},
    "no_contrast": {"use_contrast": False},
    "no_spatial": {"spatial_prob": 0.0},
}
CLASSES = {"acdc": ["RV", "myocardium", "LV"], "la2018": ["left atrium"]}
ACDC_SPACING = (10.0, 1.5, 1.5)  # assumed: the files carry none


def load(
    ds: str, stem: str, stated: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image (Z, Y, X) float32, labels (Z, Y, X) uint8, spacing (z, y, x)).

    ``stated``: the spacing the file states (ACDC: 1 on every axis) instead of the assumed one.
    """
    import nibabel as nib

    img = nib.load(DATA / ds / "images" / f"{stem}.nii.gz")
    lab = np.asarray(nib.load(DATA / ds / "masks" / f"{stem}.nii.gz").dataobj)
    vol = img.get_fdata(dtype=np.float32)
    # nibabel gives (X, Y, Z); the API takes (Z, Y, X).
    vol, lab = np.ascontiguousarray(vol.transpose(2, 1, 0)), np.ascontiguousarray(lab.transpose(2, 1, 0))
    zooms = tuple(float(v) for v in img.header.get_zooms()[:3])[::-1]
    spacing = ACDC_SPACING if ds == "acdc" and not stated else zooms
    return vol, lab, spacing  # type: ignore[return-value]


def split(
    ds: str,
    quick: bool,
    n_atlases: int = 2,
    atlas_frames: bool = False,
    transductive: bool = False,
    fold: int = 0,
    one_patient: bool = False,
    mixed_phases: bool = False,
) -> tuple[list[str], list[str], list[str]]:
    """Atlases, unlabeled and test stems (ACDC: by patient, ED frames as atlases).

    The test set does not depend on ``n_atlases`` (2 or 3): a third atlas is taken from the
    volumes that are otherwise unlabeled (ACDC: patient 028's ED frame, an HCM heart).
    ``atlas_frames`` (ACDC only) adds the atlas patients' other (ES) frames, unlabeled.
    ``transductive`` adds the test volumes to the unlabeled ones (what a user does who adds the
    volumes to segment as unlabeled layers; then the test is no longer unseen data).
    ``fold`` rotates the sorted patients (or volumes) by two per fold first; fold 0 is the
    split every earlier figure used. ``one_patient`` (ACDC only) labels both frames (ED and ES)
    of the first patient instead of the ED frames of two; the second patient's frames join the
    unlabeled ones, and the test set stays the same. ``mixed_phases`` (ACDC only) labels the
    first patient's ED frame and the second patient's ES frame (the other frames stay unused).
    """
    rows = list(csv.DictReader(open(DATA / ds / "cases.csv")))
    stems = sorted(r["stem"] for r in rows)
    stems = stems[2 * fold :] + stems[: 2 * fold]
    if ds == "acdc":
        pats = sorted({r["patient"] for r in rows})
        pats = pats[2 * fold :] + pats[: 2 * fold]
        by = {p: [r["stem"] for r in rows if r["patient"] == p] for p in pats}
        atlases = [by[p][0] for p in pats[:n_atlases]]
        unlabeled = [s for s in by[pats[2]] + by[pats[3]] if s not in atlases]
        if mixed_phases:
            atlases = [by[pats[0]][0], by[pats[1]][1]]
        if one_patient:
            atlases, unlabeled = by[pats[0]][:2], by[pats[1]] + unlabeled
        if atlas_frames:
            unlabeled += [s for p in pats[:2] for s in by[p] if s not in atlases]
        test = [s for p in pats[4:] for s in by[p]]
    else:
        atlases, unlabeled, test = stems[:n_atlases], stems[n_atlases:6], stems[6:]
    test = test[:4] if quick else test
    return atlases, unlabeled + test if transductive else unlabeled, test


def run_one(ds: str, variant: str, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Train one variant and evaluate it (runs inside the child process)."""
    import torch

    import napari_medseg as nms
    from napari_medseg.engine.metrics import dice_per_class

    steps, quick, scale, save_dir, tta, augment = (
        args.steps,
        args.quick,
        args.scale,
        args.save_dir,
        args.tta,
        args.augment,
    )
    atl, unl, test = split(
        ds,
        quick,
        args.atlases,
        args.atlas_frames,
        args.transductive,
        args.fold,
        args.one_patient,
        args.mixed_phases,
    )
    a = [load(ds, s, args.stated_spacing) for s in atl]
    u = [load(ds, s, args.stated_spacing) for s in unl]
    torch.manual_seed(args.seed)
    seg = nms.load_model("efs-medseg", device="cpu", scale=scale, **{**VARIANTS[variant], **(extra or {})})
    t0 = time.perf_counter()
    last = None
    for last in seg.finetune(
        [x[0] for x in a],
        [x[1] for x in a],
        unlabeled=[x[0] for x in u],
        steps=steps,
        seed=args.seed,
        spacing=[x[2] for x in a],
        unlabeled_spacing=[x[2] for x in u],
        class_names=CLASSES[ds],
        **({"augment": augment} if augment else {}),
        **parse_pairs(args.train_set),
    ):
        if last.step % max(1, steps // 10) == 0:
            print(
                f"  {ds}/{variant} step {last.step}/{steps} loss {last.loss:.3f} {last.metrics}", flush=True
            )
    train_s = time.perf_counter() - t0
    per: dict[int, list[float]] = {}
    raw: dict[int, list[float]] = {}
    per_volume: dict[str, list[float]] = {}
    tta_scores: dict[int, list[float]] = {}
    rule = seg.config["keep_largest"]
    infer_s = 0.0
    for stem in test:
        img, lab, sp = load(ds, stem, args.stated_spacing)
        seg.config["keep_largest"] = False  # raw network output, then the post-processing rule
        t1 = time.perf_counter()
        pred_raw = seg.segment(img, spacing=sp)
        seg.config["keep_largest"] = rule
        pred = seg.postprocess(pred_raw)
        infer_s += time.perf_counter() - t1
        scores = dice_per_class(pred, lab, seg.num_classes)
        per_volume[stem] = [round(float(v), 4) for _, v in sorted(scores.items())]
        for c, d in scores.items():
            per.setdefault(c, []).append(d)
        for c, d in dice_per_class(pred_raw, lab, seg.num_classes).items():
            raw.setdefault(c, []).append(d)
        if tta > 1:  # the same, averaged over in-plane quarter turns
            turns = seg.config["tta"]
            seg.config["tta"] = tta
            for c, d in dice_per_class(seg.segment(img, spacing=sp), lab, seg.num_classes).items():
                tta_scores.setdefault(c, []).append(d)
            seg.config["tta"] = turns
    infer_s /= max(1, len(test))
    row: dict[str, Any] = {
        "dataset": ds,
        "variant": variant,
        "steps": steps,
        "options": extra or {},
        "train_options": parse_pairs(args.train_set),
        "seed": args.seed,
        "fold": args.fold,
        "one_patient": args.one_patient,
        "mixed_phases": args.mixed_phases,
        "stated_spacing": args.stated_spacing,
        "assumed_spacing": seg.config.get("assumed_spacing"),
        "augment": augment,
    }
    for c, v in sorted(per.items()):
        row[CLASSES[ds][c - 1]] = float(np.mean(v))
    row["mean_dice"] = float(np.mean([row[n] for n in CLASSES[ds] if n in row]))
    row["mean_dice_no_postprocess"] = float(np.mean([np.mean(v) for v in raw.values()]))
    if tta_scores:
        row[f"mean_dice_tta{tta}"] = float(np.mean([np.mean(v) for v in tta_scores.values()]))
    row["single_piece_classes"] = seg.config.get("single_piece_classes")
    row["single_piece_union"] = seg.config.get("single_piece_union")
    row["tta_turns"] = seg.config.get("tta_turns")  # what tta="auto" resolved to (mean_dice uses it)
    row["per_volume"] = per_volume
    if save_dir:
        row["checkpoint"] = str(seg.save(Path(save_dir) / f"efs_{ds}_{variant}_{steps}.safetensors"))
    row.update(
        train_min=train_s / 60,
        s_per_step=train_s / steps,
        infer_s_per_volume=infer_s,
        peak_rss_mb=peak_rss_mb(),
        atlases=atl,
        unlabeled=unl,
        test=test,
        target_spacing=seg.config["target_spacing"],
        patch=seg.config["patch_size"],
        widths=seg.config["widths"],
        best_val=last.best if last else None,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="40 steps, 4 test volumes, full variant only")
    ap.add_argument("--datasets", default="acdc,la2018")
    ap.add_argument("--variants", default="")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--name", default="", help="JSON name under benchmarks/results")
    ap.add_argument(
        "--set", action="append", default=[], help="extra model option KEY=JSON_VALUE (repeatable)"
    )
    ap.add_argument(
        "--train-set", action="append", default=[], help="training option KEY=JSON_VALUE, e.g. ema=0.99"
    )
    ap.add_argument("--augment", default="", help="augmentation preset (default: the network's)")
    ap.add_argument("--tta", type=int, default=4, help="also score with this many quarter turns")
    ap.add_argument("--save-dir", default="", help="also save each trained model here")
    ap.add_argument("--atlases", type=int, default=2, help="labeled volumes (2 or 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--atlas-frames", action="store_true", help="ACDC: also the atlas patients' ES frames, unlabeled"
    )
    ap.add_argument(
        "--transductive", action="store_true", help="the test volumes also join the unlabeled ones"
    )
    ap.add_argument(
        "--one-patient", action="store_true", help="ACDC: ED and ES of one patient as the two atlases"
    )
    ap.add_argument(
        "--mixed-phases", action="store_true", help="ACDC: one patient's ED and another's ES frame as atlases"
    )
    ap.add_argument("--fold", type=int, default=0, help="rotate the split by 2 patients per fold")
    ap.add_argument(
        "--stated-spacing",
        action="store_true",
        help="ACDC: give the spacing the files state (1 mm everywhere), not the assumed 10 x 1.5 x 1.5",
    )
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    extra = parse_pairs(args.set)
    if args.child:
        ds, variant = args.child.split(":")
        print("RESULT " + json.dumps(run_one(ds, variant, args, extra)), flush=True)
        return
    steps = args.steps or (40 if args.quick else 1500)
    variants = args.variants.split(",") if args.variants else (["full"] if args.quick else list(VARIANTS))
    rows = []
    for ds in args.datasets.split(","):
        for variant in variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                f"{ds}:{variant}",
                "--steps",
                str(steps),
                "--scale",
                args.scale,
            ]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--save-dir", args.save_dir] if args.save_dir else []
            cmd += [a for kv in args.set for a in ("--set", kv)] + ["--tta", str(args.tta)]
            cmd += [a for kv in args.train_set for a in ("--train-set", kv)]
            cmd += ["--augment", args.augment] if args.augment else []
            cmd += ["--atlases", str(args.atlases), "--seed", str(args.seed)]
            cmd += ["--atlas-frames"] if args.atlas_frames else []
            cmd += ["--transductive"] if args.transductive else []
            cmd += ["--fold", str(args.fold)] + (["--one-patient"] if args.one_patient else [])
            cmd += ["--mixed-phases"] if args.mixed_phases else []
            cmd += ["--stated-spacing"] if args.stated_spacing else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not found:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                rows.append({"dataset": ds, "variant": variant, "error": proc.stderr[-500:]})
                continue
            rows.append(json.loads(found[-1][7:]))
            print(
                table([rows[-1]], ["dataset", "variant", "mean_dice", "train_min", "peak_rss_mb"]), flush=True
            )
    cols = [
        "dataset",
        "variant",
        "steps",
        "RV",
        "myocardium",
        "LV",
        "left atrium",
        "mean_dice",
        "mean_dice_no_postprocess",
        f"mean_dice_tta{args.tta}",
        "train_min",
        "s_per_step",
        "infer_s_per_volume",
        "peak_rss_mb",
    ]
    print(table(rows, cols))
    name = args.name or "bench_efs_medseg" + ("_quick" if args.quick else "")
    print("saved", save(name, {"rows": rows, "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
