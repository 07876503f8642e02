"""HF-SAM prompt-free output: raw head vs box refinement, by decoder and agreement guard.

Fine-tunes LiteMedSAM HF-SAM on k images of a set (the split of ``bench_hf_sam.py --fewshot``:
seeded shuffle, the first 20 images are the test set, the next k the training set), or loads a
checkpoint saved by an earlier run, then scores on the 20 test images:

* the raw prompt-free head (``refine="off"``);
* box refinement (``engine/networks/hf_sam_refine.py``) with the fine-tuned decoder and with the
  base decoder;
* the same with a guard that keeps a piece whenever the box answer agrees with it at a Dice
  below ``tau`` (the shipped code has no guard: this measures whether one would help);
* with ``--low-thresholds``: the head's foreground probability cut lower than argmax (0.5),
  plainly and as hysteresis (pieces seeded at 0.5, grown into the lower cut), each raw and
  refined with the fine-tuned decoder (the shipped code cuts at argmax).

Usage::

    python benchmarks/bench_hf_sam_refine.py --dataset kvasir_seg --k 5 --threads 2 \\
        --checkpoint /tmp/kvasir_k5.safetensors --name refine_kvasir_seg_k5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mb, save, table  # noqa: E402
from bench_hf_sam import load_pair, shuffled_stems  # noqa: E402

import napari_medseg as nms  # noqa: E402
from napari_medseg.engine.api import load_model  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402
from napari_medseg.engine.prompt import mask_box  # noqa: E402
from napari_medseg.engine.runner import batched_fit_logits  # noqa: E402

TAUS = (0.0, 0.5, 0.6, 0.7, 0.8)


def split(ds: str, k: int, n_test: int = 20) -> tuple[list, list]:
    """(test pairs, training pairs) as bench_hf_sam.py --fewshot draws them."""
    order = shuffled_stems(ds)
    test = [load_pair(ds, stem) for stem in order[:n_test]]
    pool = [load_pair(ds, stem) for stem in order[n_test : n_test + k]]
    return test, pool


def kept_pieces(mask: np.ndarray, share: float) -> list[np.ndarray]:
    """The 8-connected pieces of ``mask`` that refinement keeps (≥ 16 px and ≥ ``share`` of the largest)."""
    comp, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    return [comp == i for i in np.flatnonzero(sizes >= max(16, share * sizes.max())) + 1]


def pieces_and_answers(seg, image: np.ndarray, share: float = 0.2) -> tuple[np.ndarray, list]:
    """Raw foreground, and for each kept piece its box answers from both decoders."""
    ca = -1 if image.ndim == 3 else None
    seg.config["refine"] = "off"
    raw = seg.segment(image, channel_axis=ca) > 0
    out = []
    for piece in kept_pieces(raw, share):
        answers = {}
        for weights in ("finetuned", "base"):
            seg.config["prompt_weights"] = weights
            answers[weights] = seg.prompt(image, channel_axis=ca).predict(box=mask_box(piece))
        seg.config["prompt_weights"] = "auto"
        out.append((piece, answers))
    return raw, out


def foreground_probability(seg, image: np.ndarray) -> np.ndarray:
    """(Y, X) softmax probability of class 1 from the prompt-free head (a slice that fits)."""
    prep = seg.prepare(image, channel_axis=-1 if image.ndim == 3 else None)
    seg.module.eval()
    with torch.inference_mode():
        logits = batched_fit_logits(torch.from_numpy(prep.data[0:1]), seg.logits, seg.input_size)
    return torch.softmax(logits.float(), 1)[0, 1].numpy()


def refine_pieces(seg, image: np.ndarray, mask: np.ndarray, share: float = 0.2) -> np.ndarray:
    """Union of the fine-tuned decoder's box answers for the pieces of ``mask`` (as shipped)."""
    pieces = kept_pieces(mask, share)
    if not pieces:
        return mask
    seg.config["prompt_weights"] = "finetuned"
    pred = seg.prompt(image, channel_axis=-1 if image.ndim == 3 else None)
    out = np.zeros_like(mask)
    for piece in pieces:
        answer = pred.predict(box=mask_box(piece))
        out |= answer if answer.any() else piece
    seg.config["prompt_weights"] = "auto"
    return out


def low_threshold_rows(seg, test: list, lows: list[float]) -> list[dict]:
    """Dice of lower probability cuts (plain and hysteresis), raw and refined."""
    from skimage.filters import apply_hysteresis_threshold

    rows = []
    probs = [foreground_probability(seg, image) for image, _ in test] if lows else []
    for low in lows:
        for kind in ("plain", "hysteresis"):
            raw, refined = [], []
            for (image, mask), p in zip(test, probs):
                cut = p > low if kind == "plain" else apply_hysteresis_threshold(p, low, 0.5)
                raw.append(dice(cut, mask))
                refined.append(dice(refine_pieces(seg, image, cut), mask))
            label = f"probability > {low}" if kind == "plain" else f"hysteresis {low}–0.5"
            rows.append({"variant": f"{label}, raw", "Dice": statistics.mean(raw)})
            rows.append({"variant": f"{label}, refined", "Dice": statistics.mean(refined)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="kvasir_seg")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default="", help="load it if it exists, else train and save it here")
    ap.add_argument("--name", default="")
    ap.add_argument("--low-thresholds", type=float, nargs="*", default=[], help="e.g. 0.3 0.2 0.1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    test, pool = split(args.dataset, args.k)
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    train_s = None
    if ckpt is not None and ckpt.is_file():
        seg = load_model(str(ckpt), device="cpu")
    else:
        seg = nms.load_model("hf-sam", device="cpu")
        t0 = time.perf_counter()
        for _ in seg.finetune(
            [p[0] for p in pool],
            [p[1].astype(np.int64) for p in pool],
            steps=args.steps,
            channel_axis=-1 if pool[0][0].ndim == 3 else None,
        ):
            pass
        train_s = time.perf_counter() - t0
        if ckpt is not None:
            seg.save(ckpt)
    data = [(mask, *pieces_and_answers(seg, image)) for image, mask in test]
    rows = [{"variant": "raw head (refine off)", "Dice": statistics.mean(dice(r, m) for m, r, _ in data)}]
    for weights in ("finetuned", "base"):
        for tau in TAUS:
            scores = []
            for mask, raw, pieces in data:
                union = np.zeros_like(raw)
                for piece, answers in pieces:
                    a = answers[weights]
                    union |= a if a.any() and dice(a, piece) >= tau else piece
                scores.append(dice(union, mask) if pieces else dice(raw, mask))
            label = f"refined, {weights} decoder" + (
                f", guard Dice ≥ {tau}" if tau else " (shipped)" * (weights == "finetuned")
            )
            rows.append({"variant": label, "Dice": statistics.mean(scores)})
    rows += low_threshold_rows(seg, test, args.low_thresholds)
    print(table(rows, ["variant", "Dice"]))
    name = args.name or f"refine_{args.dataset}_k{args.k}"
    meta = {"argv": vars(args), "train_s": train_s, "peak_rss_mb": peak_rss_mb(), "test_images": len(test)}
    print("wrote", save(name, {"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
