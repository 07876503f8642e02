"""HF-SAM refinement: how much choosing among the refined pieces could gain, and prototype rules.

For the k = 5 model of ``--seed`` (``bench_hf_sam_tta.fine_tuned``: loaded from ``--checkpoint``
or trained with the defaults), every test image's raw prompt-free output is refined with the
shipped code (``hf_sam_refine.refine_slice``, its options as configured), while each piece's
box answer (mask, SAM's IoU score) is recorded. From those answers it reports, per image set:

* ``shipped``: the default refined output (must equal ``bench_hf_sam_tta``'s figures);
* ``best single answer``: an oracle that keeps only the answer with the highest true Dice, the
  ceiling of any rule that only chooses among the head's pieces; ``missed``: images where no
  answer reaches Dice 0.1 (the head did not find the lesion), and the oracle on the others,
  grouped by how the best answer's piece box compares with the lesion's box (area ratio);
* prototype rules: foreground / background prototypes of the fine-tuned encoder's features on
  the five painted images (cosine, k-means: 3 foreground, 8 background centres), each answer's
  mean feature scored ``d`` = nearest foreground − nearest background similarity; ``top-1 by d``
  keeps one answer, ``score + λ·d`` adds it to SAM's score before the shipped margin filter.

Test images: the split's 20 and ``--extra`` more (shuffle positions 25 onwards), as
``bench_hf_sam_tta.py``. Usage::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_hf_sam_pieces.py --dataset busi --seed 0 \\
        --checkpoint /tmp/busi_k5_seed0.safetensors --views 2 --extra 85 --name hf_sam_pieces_busi_seed0
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mb, save, table  # noqa: E402
from bench_hf_sam import channel_axis, load_pair  # noqa: E402
from bench_hf_sam_refine import split  # noqa: E402
from bench_hf_sam_tta import model_from_args, model_parser, test_stems  # noqa: E402

from napari_medseg.engine.image import is_colour  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402
from napari_medseg.engine.networks.hf_sam_refine import refine_slice, refine_view, resolve_score_margin  # noqa: E402
from napari_medseg.engine.prompt import Prompts, mask_box  # noqa: E402

LAMBDAS = (0.5, 1.0)


def unit_features(session) -> tuple[np.ndarray, tuple[int, int]]:
    """(64·64, 256) per-location unit feature vectors of a 2-D session's image, and its resized size."""
    emb = session.embedding(None)
    f = emb["embedding"][0].float()
    f = f / (f.norm(dim=0, keepdim=True) + 1e-6)
    return f.reshape(f.shape[0], -1).T.numpy(), tuple(int(v) for v in emb["resized"])


def on_grid(mask: np.ndarray, resized: tuple[int, int], side: int, grid: int) -> np.ndarray:
    """A (Y, X) mask as the share of each of the embedding's (grid·grid) cells it covers, flattened.

    The frame is resized to ``resized`` inside a zero-padded ``side`` square (as the encoder
    sees it), then averaged over each cell.
    """
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, resized, mode="bilinear", align_corners=False)
    t = F.pad(t, [0, side - resized[1], 0, side - resized[0]])
    return F.avg_pool2d(t, side // grid)[0, 0].reshape(-1).numpy()


def kmeans(x: np.ndarray, k: int, iterations: int = 30) -> np.ndarray:
    """(k, D) unit centres of unit vectors ``x`` (N, D), spherical k-means, seeded."""
    rng = np.random.default_rng(0)
    c = x[rng.choice(len(x), k, replace=False)].copy()
    for _ in range(iterations):
        near = (x @ c.T).argmax(1)
        for j in range(k):
            if (near == j).any():
                v = x[near == j].mean(0)
                c[j] = v / np.linalg.norm(v)
    return c


def prototypes(view, pool: list, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) k-means centres of the painted images' encoder features."""
    fg, bg = [], []
    for image, mask in pool:
        x, resized = unit_features(view.prompt(image, channel_axis(image)))
        grid = int(round(len(x) ** 0.5))
        w = on_grid(mask, resized, side, grid)
        inside = on_grid(np.ones_like(mask), resized, side, grid)
        fg.append(x[w > 0.5])
        bg.append(x[(w < 0.05) & (inside > 0.5)])
    return kmeans(np.concatenate(fg), 3), kmeans(np.concatenate(bg), 8)


def score_image(seg, view, image: np.ndarray, truth: np.ndarray, centres: tuple) -> dict[str, float]:
    """Dice of each rule on one image (see the module docstring); ``centres`` = (fg, bg) prototypes."""
    cfg = seg.config
    side = int(seg.input_size)
    seg.config["refine"] = "off"
    labels = seg.segment(image, channel_axis=channel_axis(image))
    seg.config["refine"] = "boxes"
    session = view.prompt(image, channel_axis(image))
    colour = is_colour(session.image.data, session.image.rgb)
    margin = resolve_score_margin(cfg["refine_score_margin"], colour)
    x, resized = unit_features(session)
    grid = int(round(len(x) ** 0.5))
    answers: dict[tuple, tuple[np.ndarray, float, float]] = {}  # box → (mask, SAM score, d)

    def decode(box: tuple, lam: float) -> tuple[np.ndarray, float]:
        if box not in answers:
            r = session.predict_result(Prompts.make(box=box), None)
            m = np.asarray(r.mask, dtype=bool)
            v = (x * on_grid(m, resized, side, grid)[:, None]).sum(0)
            v = v / (np.linalg.norm(v) + 1e-6)
            answers[box] = (m, float(r.score), float((centres[0] @ v).max() - (centres[1] @ v).max()))
        m, s, d = answers[box]
        return m, s + lam * d

    def refined(lam: float) -> np.ndarray:
        share, reach = float(cfg["refine_min_share"]), float(cfg["refine_reach"])
        out = refine_slice(labels.copy(), lambda b: decode(b, lam), share, score_margin=margin, reach=reach)
        return out > 0

    got = {"shipped": dice(refined(0.0), truth)}
    for lam in LAMBDAS:
        got[f"score + {lam}·d"] = dice(refined(lam), truth)
    per = [(dice(m, truth), d, m, box) for box, (m, _, d) in answers.items()]
    best = max(per, key=lambda p: p[0], default=None)
    got["best single answer"] = best[0] if best else 0.0
    got["top-1 by d"] = dice(max(per, key=lambda p: p[1])[2], truth) if per else 0.0
    # Box area of the best answer's piece over the lesion's (both + 2 px): < 1 = the head's
    # piece is smaller than the lesion, and SAM then answers inside that smaller box.
    got["box ratio"] = box_area(best[3]) / box_area(mask_box(truth)) if best and truth.any() else float("nan")
    return got


def box_area(box: tuple[float, float, float, float]) -> float:
    """Area of an inclusive (y0, x0, y1, x1) box in pixels."""
    return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)


def main() -> None:
    ap = model_parser(__doc__, extra=85)
    ap.add_argument("--views", type=int, default=0, help="tta views (0: the model's 'auto')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seg, _ = model_from_args(args)
    if args.views:
        seg.config["tta"] = args.views
    view = refine_view(seg)
    _, pool = split(args.dataset, 5)
    fg_c, bg_c = prototypes(view, pool, int(seg.input_size))

    stems = test_stems(args.dataset, args.extra)
    scores: dict[str, list[float]] = {}
    found: list[tuple[float, float, float]] = []  # (best answer, shipped, box ratio) if the lesion was found
    for stem in stems:
        image, mask = load_pair(args.dataset, stem)
        got = score_image(seg, view, image, mask > 0, (fg_c, bg_c))
        ratio = got.pop("box ratio")
        if got["best single answer"] >= 0.1:
            found.append((got["best single answer"], got["shipped"], ratio))
        for k, v in got.items():
            scores.setdefault(k, []).append(v)

    n = len(stems)
    rows = [
        {
            "rule": k,
            "Dice (20)": statistics.mean(v[:20]),
            f"Dice ({n})": statistics.mean(v),
            "per_image": [round(s, 4) for s in v],
        }
        for k, v in scores.items()
    ]
    print(table(rows, ["rule", "Dice (20)", f"Dice ({n})"]))
    summary: dict = {
        "missed": n - len(found),
        "best single answer where found": statistics.mean(f[0] for f in found) if found else None,
        "shipped where found": statistics.mean(f[1] for f in found) if found else None,
    }
    # Where the lesion was found: how the best piece's box compares with the lesion's.
    for label, lo, hi in (("smaller than", 0.0, 0.8), ("about", 0.8, 1.25), ("larger than", 1.25, np.inf)):
        group = [f[0] for f in found if lo <= f[2] < hi]
        summary[f"piece box {label} the lesion's ({lo}-{hi}x area): images, best answer"] = [
            len(group),
            statistics.mean(group) if group else None,
        ]
    print(summary)
    name = args.name or f"hf_sam_pieces_{args.dataset}_seed{args.seed}"
    meta = vars(args) | {"test_images": n, "peak_rss_mb": peak_rss_mb(), **summary}
    print("wrote", save(name, {"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
