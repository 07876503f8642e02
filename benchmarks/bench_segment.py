"""Time ``segment`` per slice for every registered network at 256² and 512².

    python benchmarks/bench_segment.py [--quick] [--device auto] [--models sts-net,hf-sam]

Untrained networks run with random weights (speed does not depend on the weights). S³-Net's
figure is its whole per-image optimisation; EFS-MedSeg's is per slice of a 32-slice volume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mb, save, table, timeit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default="", help="comma-separated subset")
    args = ap.parse_args()

    import napari_medseg as nms

    names = [m for m in nms.list_models() if not args.models or m in args.models.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    for name in names:
        seg = nms.load_model(name, device=args.device)
        card = nms.model_card(name)
        if name == "hf-sam":
            # Random class tokens paint noise; box refinement of real pieces is timed on trained
            # models by bench_hf_sam.py --fewshot ("prompt-free s/image").
            seg.config["refine"] = "off"
        for size in (256, 512):
            if card.spatial_dims == 3:
                z = 32
                image = rng.normal(0, 1, (z, size // 2, size // 2)).astype(np.float32)
                per = z
            else:
                image = (rng.random((size, size)) * 255).astype(np.uint8)
                per = 1
            if hasattr(seg, "config") and "working_size" in seg.config:
                seg.config["working_size"] = size if card.name != "hf-sam" else seg.config["working_size"]

            def run(seg: Any = seg, image: np.ndarray = image) -> None:  # bind this iteration's
                seg.segment(image, allow_untrained=True)

            try:
                t = timeit(run, repeat=1 if args.quick else 3, warmup=0 if args.quick else 1)
            except Exception as err:  # report, don't hide, what cannot run
                rows.append({"network": name, "size": size, "error": str(err)[:80]})
                continue
            rows.append(
                {
                    "network": name,
                    "size": f"{size}²" if per == 1 else f"{per}×{size // 2}²",
                    "device": str(seg.device),
                    "s_per_slice": t["median_s"] / per,
                    "peak_rss_mb": round(peak_rss_mb()),
                }
            )
            print(rows[-1], flush=True)
    print(table(rows, ["network", "size", "device", "s_per_slice", "peak_rss_mb", "error"]))
    print("wrote", save("bench_segment", {"rows": rows}))


if __name__ == "__main__":
    main()
