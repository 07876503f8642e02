"""HF-SAM prompt-free head averaged over mirrored views (the ``tta`` option), per seed.

Fine-tunes LiteMedSAM HF-SAM on the k = 5 training images of ``bench_hf_sam.py --fewshot``'s
split with the defaults and ``--seed`` (or loads the checkpoint an earlier run saved at
``--checkpoint``), then scores prompt-free Dice with ``tta`` = each of ``--views`` — raw head
(``refine="off"``) and refined by its own boxes (the default output) — on the split's 20 test
images and on ``--extra`` more images of the set (shuffle positions 25 onwards), which narrows
the noise of a 20-image mean (``--extra 85`` takes every other image of a 110-image set).
``--set KEY=JSON`` overrides an inference option first (e.g. ``refine_score_margin=null``:
the refinement before its score filter); ``--skip-raw`` scores only the refined output.
``--model-option KEY=JSON`` / ``--train-option KEY=JSON`` train a variant of the defaults
instead (a ``load_model`` option such as ``lora_rank=0``, a ``finetune`` option such as
``lr=5e-4``); a checkpoint that already exists is loaded as it is.
Usage::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_hf_sam_tta.py --dataset busi --seed 0 \\
        --checkpoint /tmp/busi_k5_seed0.safetensors --views 1 2 --threads 1 --name hf_sam_tta_busi_seed0
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
from _common import parse_pairs, peak_rss_mb, save, table  # noqa: E402
from bench_hf_sam import channel_axis, load_pair, shuffled_stems  # noqa: E402
from bench_hf_sam_refine import split  # noqa: E402

import napari_medseg as nms  # noqa: E402
from napari_medseg.engine.api import load_model  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402


def fine_tuned(
    ds: str,
    seed: int,
    steps: int,
    ckpt: Path | None,
    model_options: dict | None = None,
    train_options: dict | None = None,
) -> tuple[object, float | None]:
    """The k = 5 model of ``seed``: loaded from ``ckpt`` if it exists, else trained (and saved).

    ``model_options`` go to ``load_model`` and ``train_options`` to ``finetune`` (variants of
    the defaults, e.g. ``lora_rank=0``); both are ignored when the checkpoint is loaded.
    """
    if ckpt is not None and ckpt.is_file():
        return load_model(str(ckpt), device="cpu"), None
    _, pool = split(ds, 5)
    seg = nms.load_model("hf-sam", device="cpu", **(model_options or {}))
    t0 = time.perf_counter()
    for _ in seg.finetune(
        [p[0] for p in pool],
        [p[1].astype(np.int64) for p in pool],
        steps=steps,
        channel_axis=channel_axis(pool[0][0]),
        seed=seed,
        **(train_options or {}),
    ):
        pass
    took = time.perf_counter() - t0
    if ckpt is not None:
        seg.save(ckpt)
    return seg, took


def prompt_free_scores(seg, ds: str, stems: list[str]) -> list[float]:
    """Prompt-free foreground Dice per image of ``seg``'s output with its current options."""
    out = []
    for stem in stems:
        image, mask = load_pair(ds, stem)
        out.append(dice(seg.segment(image, channel_axis=channel_axis(image)) > 0, mask > 0))
    return out


def model_parser(doc: str, extra: int) -> argparse.ArgumentParser:
    """Options shared by the scripts that score one seed's k = 5 model on the split and beyond."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--dataset", default="busi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--checkpoint", default="", help="load it if it exists, else train and save it here")
    ap.add_argument("--extra", type=int, default=extra, help="more test images beyond the split's 20")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="")
    ap.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="load_model option when training",
    )
    ap.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="finetune() option when training",
    )
    return ap


def model_from_args(args: argparse.Namespace) -> tuple[object, float | None]:
    """``fine_tuned`` with the parser's dataset, seed, steps, checkpoint and options."""
    return fine_tuned(
        args.dataset,
        args.seed,
        args.steps,
        Path(args.checkpoint) if args.checkpoint else None,
        parse_pairs(args.model_option),
        parse_pairs(args.train_option),
    )


def test_stems(ds: str, extra: int) -> list[str]:
    """The split's 20 test images, then ``extra`` more from shuffle position 25 on (past the pool)."""
    order = shuffled_stems(ds)
    return [*order[:20], *order[25 : 25 + extra]]


def main() -> None:
    ap = model_parser(__doc__, extra=40)
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="inference option")
    ap.add_argument("--skip-raw", action="store_true", help="score only the refined output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seg, train_s = model_from_args(args)
    overrides = parse_pairs(args.set)
    unknown = sorted(set(overrides) - set(seg.config))
    if unknown:
        sys.exit(f"unknown option(s) {unknown}")
    seg.config.update(overrides)
    stems = test_stems(args.dataset, args.extra)
    rows = []
    for n in args.views:
        seg.config["tta"] = n
        row: dict = {"views": n}
        for refine in ("boxes",) if args.skip_raw else ("off", "boxes"):
            seg.config["refine"] = refine
            t0 = time.perf_counter()
            scores = prompt_free_scores(seg, args.dataset, stems)
            row |= {
                f"Dice_{refine} (20)": statistics.mean(scores[:20]),
                f"Dice_{refine} ({len(scores)})": statistics.mean(scores),
                f"s_per_image_{refine}": (time.perf_counter() - t0) / len(scores),
                f"per_image_{refine}": [round(s, 4) for s in scores],
            }
        rows.append(row)
        print(table([rows[-1]], [k for k in row if not k.startswith("per_image")]), flush=True)
    seg.config["tta"], seg.config["refine"] = "auto", "boxes"
    name = args.name or f"hf_sam_tta_{args.dataset}_seed{args.seed}"
    meta = vars(args) | {"train_s": train_s, "test_images": len(stems), "peak_rss_mb": peak_rss_mb()}
    print("wrote", save(name, {"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
