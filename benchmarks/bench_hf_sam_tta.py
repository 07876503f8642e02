"""HF-SAM prompt-free head with test-time flips/turns averaged (an experiment, not shipped).

Loads a fine-tuned checkpoint (e.g. the one ``bench_hf_sam_refine.py --checkpoint`` saves),
wraps ``Segmenter.logits`` so the softmax of 1, 2 (h-flip), 4 (all flips) or 8 (dihedral)
views is averaged, and prints prompt-free Dice (raw head and box-refined) on the 20 test images
of ``bench_hf_sam_refine.split``. Usage::

    python benchmarks/bench_hf_sam_tta.py busi /tmp/busi_k5.safetensors 1,2,4,8
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf_sam_refine import split

from napari_medseg.engine.api import load_model
from napari_medseg.engine.metrics import dice

ds, ckpt = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
test, _ = split(ds, 5)
seg = load_model(ckpt, device="cpu")
base_logits = seg.logits


def views(n):
    # (forward, inverse) pairs on (B, C, H, W)
    v = [
        (lambda t: t, lambda t: t),
        (lambda t: t.flip(-1), lambda t: t.flip(-1)),
        (lambda t: t.flip(-2), lambda t: t.flip(-2)),
        (lambda t: t.flip(-1, -2), lambda t: t.flip(-1, -2)),
    ]
    v += [
        (lambda t: t.rot90(1, (-2, -1)), lambda t: t.rot90(-1, (-2, -1))),
        (lambda t: t.rot90(-1, (-2, -1)), lambda t: t.rot90(1, (-2, -1))),
        (lambda t: t.rot90(1, (-2, -1)).flip(-1), lambda t: t.flip(-1).rot90(-1, (-2, -1))),
        (lambda t: t.rot90(-1, (-2, -1)).flip(-1), lambda t: t.flip(-1).rot90(1, (-2, -1))),
    ]
    return v[:n]


for n in [int(a) for a in sys.argv[3].split(",")]:
    vs = views(n)

    def tta_logits(x, vs=vs):
        p = sum(inv(base_logits(fwd(x))).softmax(1) for fwd, inv in vs) / len(vs)
        return p.clamp_min(1e-8).log()

    seg.logits = tta_logits
    for refine in ("off", "boxes"):
        seg.config["refine"] = refine
        t0 = time.perf_counter()
        sc = []
        for image, mask in test:
            pred = seg.segment(image, channel_axis=-1 if image.ndim == 3 else None) > 0
            sc.append(dice(pred, mask > 0))
        print(
            f"{ds} views={n} refine={refine} Dice {statistics.mean(sc):.3f} "
            f"zeros {sum(s < 0.05 for s in sc)} "
            f"s/img {(time.perf_counter() - t0) / len(test):.2f}",
            [round(s, 2) for s in sc],
            flush=True,
        )
