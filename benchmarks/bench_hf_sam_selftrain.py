"""HF-SAM few-shot: one round of self-training on unlabeled images (measured, not adopted).

Loads (or trains and saves) the k = 5 model of ``bench_hf_sam_tta.py``'s split and ``--seed``,
segments ``--unlabeled`` images of the same set with the shipped output (refined by its own
boxes, default options) and fine-tunes the model ``--steps`` more steps on the five painted
images (repeated ``--repeat`` times) plus those pseudo-labeled images. Prompt-free Dice
(refined, default options) before and after, on the split's 20 test images and on the images
after the unlabeled ones (shuffle positions 25 + ``--unlabeled`` onwards). ``--no-pseudo``
trains the same extra steps on the painted images only (the control: do the pseudo labels or
the extra steps make the difference?). One thread by default, as the other HF-SAM scripts.
Usage::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_hf_sam_selftrain.py --dataset busi \\
        --seed 0 --checkpoint /tmp/busi_k5_seed0.safetensors --name hf_sam_selftrain_busi_seed0
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
from _common import peak_rss_mb, save, table  # noqa: E402
from bench_hf_sam import channel_axis, load_pair, shuffled_stems  # noqa: E402
from bench_hf_sam_refine import split  # noqa: E402
from bench_hf_sam_tta import fine_tuned, prompt_free_scores  # noqa: E402

from napari_medseg.engine.image import is_colour  # noqa: E402
from napari_medseg.engine.tta import views_for_orientation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="busi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--checkpoint", default="", help="k = 5 model: loaded if it exists, else trained and saved"
    )
    ap.add_argument("--unlabeled", type=int, default=40, help="images pseudo-labeled (positions 25 onwards)")
    ap.add_argument("--steps", type=int, default=60, help="further steps on painted + pseudo-labeled images")
    ap.add_argument("--repeat", type=int, default=1, help="painted images repeated this often in the list")
    ap.add_argument("--no-pseudo", action="store_true", help="control: further steps on painted images only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = args.dataset
    order = shuffled_stems(ds)
    unlabeled = order[25 : 25 + args.unlabeled]
    test = [*order[:20], *order[25 + args.unlabeled :]]
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    seg, train_s = fine_tuned(ds, args.seed, 100, ckpt)
    _, pool = split(ds, 5)
    if seg.config.get("tta_views") is None:
        # A checkpoint saved before mirrored views existed: give it the views training chose.
        prep = seg.prepare(pool[0][0], channel_axis(pool[0][0]))
        seg.config["tta_views"] = views_for_orientation(
            "any" if is_colour(prep.data, prep.rgb) else "upright"
        )
    before = prompt_free_scores(seg, ds, test)
    t0 = time.perf_counter()
    pseudo: list[tuple[np.ndarray, np.ndarray]] = []
    for stem in [] if args.no_pseudo else unlabeled:
        image, _ = load_pair(ds, stem)
        found = seg.segment(image, channel_axis=channel_axis(image)) > 0
        if found.any():
            pseudo.append((image, found.astype(np.int64)))
    pseudo_s = time.perf_counter() - t0
    images = [p[0] for p in pool] * args.repeat + [p[0] for p in pseudo]
    labels = [p[1].astype(np.int64) for p in pool] * args.repeat + [p[1] for p in pseudo]
    t0 = time.perf_counter()
    # val_fraction 0.02: one held-out image, as with the five painted images alone.
    for _ in seg.finetune(
        images,
        labels,
        steps=args.steps,
        seed=args.seed,
        channel_axis=channel_axis(images[0]),
        val_fraction=0.02,
    ):
        pass
    more_s = time.perf_counter() - t0
    after = prompt_free_scores(seg, ds, test)
    row = {
        "dataset": ds,
        "seed": args.seed,
        "pseudo": len(pseudo),
        "before (20)": statistics.mean(before[:20]),
        f"before ({len(test)})": statistics.mean(before),
        "after (20)": statistics.mean(after[:20]),
        f"after ({len(test)})": statistics.mean(after),
        "pseudo_label_s": pseudo_s,
        "more_train_s": more_s,
    }
    print(table([row], list(row)), flush=True)
    name = args.name or f"hf_sam_selftrain_{ds}_seed{args.seed}"
    meta = vars(args) | {"train_s": train_s, "test_images": len(test), "peak_rss_mb": peak_rss_mb()}
    rows = [
        row
        | {"per_image_before": [round(s, 4) for s in before], "per_image_after": [round(s, 4) for s in after]}
    ]
    print("wrote", save(name, {"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
