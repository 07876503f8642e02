"""EFS-MedSeg post-processing rules compared on the same trained models (paired).

    python benchmarks/bench_efs_postprocess.py RUN.json [RUN.json ...] [--name JSON_NAME]

Each RUN.json is a result of ``bench_efs_medseg.py --save-dir DIR`` (it names the saved
checkpoint and the test volumes of its split). Every test volume is segmented once with the
model's own run-time settings (``tta="auto"``) and no post-processing; the label map is then
scored under each rule:

* ``none``: the network's argmax;
* ``per_class``: keep the largest piece of each class that is one piece in every atlas (the
  rule before 2026-12-07);
* ``union_size_strict``: first the largest piece of all classes together, strict
  26-connectivity (nnU-Net's step);
* ``union_size``: the same, pieces at most two voxels apart counted as one;
* ``union``: the same bridge, but the kept piece is the one with the largest geometric mean of
  its per-class voxel counts (the default since 2026-12-07 where the atlases' foreground is
  one piece).

Prints one row per run and the means, writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, table  # noqa: E402
from bench_efs_medseg import CLASSES, load  # noqa: E402

RULES = ("none", "per_class", "union_size_strict", "union_size", "union")


def score_run(path: Path) -> dict[str, Any]:
    """Per-rule mean Dice (per class and overall) of one saved model on its test volumes."""
    import napari_medseg as nms
    from napari_medseg.engine.components import keep_largest
    from napari_medseg.engine.metrics import dice_per_class

    row = [r for r in json.loads(path.read_text())["rows"] if r.get("checkpoint")][0]
    ds = row["dataset"]
    seg = nms.load_model(row["checkpoint"], device="cpu")
    classes = list(seg.config.get("single_piece_classes") or [])
    seg.config["keep_largest"] = False
    rules = {
        "none": lambda lab: lab,
        "per_class": lambda lab: keep_largest(lab, classes),
        "union_size_strict": lambda lab: keep_largest(lab, classes, True, 0, "size"),
        "union_size": lambda lab: keep_largest(lab, classes, True, 1, "size"),
        "union": lambda lab: keep_largest(lab, classes, union=True),
    }
    scores: dict[str, list[list[float]]] = {r: [] for r in RULES}
    for stem in row["test"]:
        img, lab, sp = load(ds, stem)
        raw = seg.segment(img, spacing=sp)
        for name, rule in rules.items():
            d = dice_per_class(rule(raw), lab, seg.num_classes)
            scores[name].append([d[c] for c in range(1, seg.num_classes)])
    out: dict[str, Any] = {
        "run": path.stem,
        "dataset": ds,
        "fold": row.get("fold"),
        "seed": row.get("seed"),
        "mixed_phases": row.get("mixed_phases"),
        "single_piece_classes": classes,
        "single_piece_union": seg.config.get("single_piece_union"),
    }
    for name, v in scores.items():
        arr = np.asarray(v)
        out[name] = float(arr.mean())
        out[f"{name}_per_class"] = dict(zip(CLASSES[ds], arr.mean(0).round(4).tolist()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="bench_efs_medseg.py result JSON files (run with --save-dir)")
    ap.add_argument("--name", default="efs_postprocess", help="JSON name under benchmarks/results")
    args = ap.parse_args()
    rows = []
    for p in args.runs:
        rows.append(score_run(Path(p)))
        print(table(rows[-1:], ["run", *RULES]), flush=True)
    mean = {"run": "mean", **{r: float(np.mean([row[r] for row in rows])) for r in RULES}}
    print(table([*rows, mean], ["run", "fold", "seed", "mixed_phases", *RULES]))
    print("saved", save(args.name, {"rows": rows, "mean": mean, "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
