"""HF-SAM prompt-free head with test-time flips/turns averaged (an experiment, not shipped).

Loads a fine-tuned checkpoint (e.g. the one ``bench_hf_sam_refine.py --checkpoint`` saves),
wraps ``Segmenter.logits`` so the softmax of 1, 2 (h-flip), 4 (all flips) or 8 (flips and
quarter turns) views is averaged, and scores prompt-free Dice (raw head and box-refined) on the
20 test images of ``bench_hf_sam_refine.split``. Usage::

    python benchmarks/bench_hf_sam_tta.py --dataset busi --checkpoint /tmp/busi_k5.safetensors \\
        --views 1 2 4 8 --threads 1 --name hf_sam_busi_k5_tta
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, table  # noqa: E402
from bench_hf_sam_refine import split  # noqa: E402

from napari_medseg.engine.api import load_model  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402

# (quarter turns, mirror) per view, in the order the --views counts take them: 2 = identity +
# horizontal flip, 4 = all flips (vertical = half turn + horizontal, both = half turn), 8 = all.
DIHEDRAL = ((0, False), (0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True))


def averaged_logits(logits, n_views: int):
    """Wrap ``logits`` ((B, C, H, W) → (B, K, H, W)) to average the first ``n_views`` views."""

    def run(x: torch.Tensor) -> torch.Tensor:
        prob = 0
        for turns, mirror in DIHEDRAL[:n_views]:
            v = torch.rot90(x, turns, dims=(-2, -1))
            out = logits(v.flip(-1) if mirror else v)
            prob = prob + torch.rot90(out.flip(-1) if mirror else out, -turns, dims=(-2, -1)).softmax(1)
        return (prob / n_views).clamp_min(1e-8).log()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="busi")
    ap.add_argument("--checkpoint", required=True, help="fine-tuned HF-SAM checkpoint")
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    test, _ = split(args.dataset, 5)
    seg = load_model(args.checkpoint, device="cpu")
    base = seg.logits
    rows = []
    for n in args.views:
        seg.logits = averaged_logits(base, n)
        row = {"views": n}
        for refine in ("off", "boxes"):
            seg.config["refine"] = refine
            t0 = time.perf_counter()
            scores = [
                dice(seg.segment(image, channel_axis=-1 if image.ndim == 3 else None) > 0, mask > 0)
                for image, mask in test
            ]
            row |= {
                f"Dice_{refine}": statistics.mean(scores),
                f"missed_{refine}": sum(s < 0.05 for s in scores),
                f"s_per_image_{refine}": (time.perf_counter() - t0) / len(test),
                f"per_image_{refine}": [round(s, 4) for s in scores],
            }
        rows.append(row)
        print(table([rows[-1]], [k for k in row if not k.startswith("per_image")]), flush=True)
    name = args.name or f"hf_sam_{args.dataset}_tta"
    print("wrote", save(name, {"meta": vars(args) | {"test_images": len(test)}, "rows": rows}))


if __name__ == "__main__":
    main()
