"""Command line: ``napari-medseg models | segment | train | demo`` (each has ``--help``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_medseg.engine.train.options import AUGMENT_PRESETS, ORIENTATIONS

log = logging.getLogger("napari_medseg")

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --option takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise SystemExit(f"error: no image files in {p}")
        return files
    if not p.exists():
        raise SystemExit(f"error: {p} does not exist")
    return [p]


def _pairs(images: str, labels: str) -> list[tuple[Path, Path]]:
    imgs, labs = _files(images), _files(labels)
    if len(imgs) == 1 and len(labs) == 1:
        return [(imgs[0], labs[0])]
    by_stem = {_stem(f): f for f in labs}
    pairs = [(f, by_stem[_stem(f)]) for f in imgs if _stem(f) in by_stem]
    if not pairs:
        raise SystemExit("error: no image has a label file of the same name")
    missing = len(imgs) - len(pairs)
    if missing:
        log.warning("%d images have no label file of the same name and are skipped", missing)
    return pairs


def _progress(total: int, desc: str, enabled: bool = True) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr)


# ------------------------------------------------------------------------------ commands
def _describe(name: str) -> str:
    """One network's card and run options, as ``models NAME`` prints them."""
    from napari_medseg.engine.registry import model_card, segmenter_class

    c = model_card(name)
    lines = [
        f"{c.name}: {c.title}",
        c.summary,
        f"paper: {c.paper}",
        f"weights: {c.weights}",
        f"docs: {c.docs}",
    ]
    options = segmenter_class(name).run_options()
    if options:
        lines.append("run options (segment --option KEY=VALUE; also in the Segment widget):")
        for o in options:
            if o.kind == "choice":
                allowed = " | ".join(json.dumps(v) for v in o.choices)
            elif o.kind == "bool":
                allowed = " | ".join(json.dumps(v) for v in o.values)
            elif o.kind == "int":
                allowed = f"{int(o.minimum)}…{int(o.maximum)}"
            else:
                allowed = f"{o.minimum:g}…{o.maximum:g}"
            lines.append(f"  {o.key} = {json.dumps(o.default)}  ({o.kind}: {allowed})  {o.help}")
    recipes = segmenter_class(name).RUN_RECIPES
    if recipes:
        lines.append("recipes (segment --recipe NAME; the Segment widget's Recipe list):")
        for r in recipes:
            values = ", ".join(f"{k}={json.dumps(v)}" for k, v in r.values) or "the defaults"
            lines.append(f"  {r.name}: {values}  {r.help}")
    return "\n".join(lines) + "\n"


def cmd_models(args: argparse.Namespace) -> int:
    """List registered networks, or describe one (``models NAME``)."""
    from napari_medseg.engine.registry import list_models, model_card

    if args.name:
        sys.stdout.write(_describe(args.name))
        return 0
    rows = []
    for name in list_models():
        c = model_card(name)
        kind = "prompt + train" if c.promptable else ("train first" if c.needs_labels else "no labels")
        rows.append((name, f"{c.spatial_dims}D", kind, c.title))
    if args.json:
        from dataclasses import asdict

        sys.stdout.write(json.dumps([asdict(model_card(n)) for n in list_models()], indent=2) + "\n")
        return 0
    width = max(len(r[0]) for r in rows)
    for r in rows:
        sys.stdout.write(f"{r[0]:<{width}}  {r[1]}  {r[2]:<15} {r[3]}\n")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment one image file and write the labels."""
    from napari_medseg.engine.api import load_model
    from napari_medseg.engine.io import read_image, write_image

    image = read_image(args.input)
    extra = _options(args.option)
    if args.preset:
        extra["preset"] = args.preset
    if args.recipe:
        extra["recipe"] = args.recipe
    seg = load_model(args.model, device=args.device, **extra)
    if seg.card.spatial_dims == 3:
        seg.config["spacing"] = list(image.scale)
    bar = _progress(0, f"{seg.card.name} on {Path(args.input).name}")
    gen = seg.iter_segment(image.data, channel_axis=args.channel_axis)
    try:
        while True:
            p = next(gen)
            bar.total = p.total
            bar.n = p.done
            bar.refresh()
    except StopIteration as stop:
        labels = stop.value
    finally:
        bar.close()
    out = write_image(
        args.output, labels.astype("uint16" if labels.max() > 255 else "uint8"), image.scale, image.metadata
    )
    import numpy as np

    classes = [int(c) for c in np.unique(labels) if c != 0]
    sys.stdout.write(f"wrote {out} ({int((labels > 0).sum())} labeled pixels, classes {classes[:10]})\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a network on a folder (or file) of images and labels."""
    import numpy as np

    from napari_medseg.engine.api import load_model
    from napari_medseg.engine.io import read_image
    from napari_medseg.engine.train.distributed import shutdown

    rank = int(os.environ.get("RANK", "0"))
    pairs = _pairs(args.images, args.labels)
    images, labels, scales = [], [], []
    for ip, lp in pairs:
        img, lab = read_image(ip), read_image(lp)
        lab_data = np.asarray(lab.data)
        if (
            lab_data.ndim == 3
            and lab_data.shape[-1] in (3, 4)
            and img.data.ndim == 3
            and img.data.shape[-1] == 3
        ):
            lab_data = lab_data[..., 0]
        values = np.unique(lab_data)
        if args.binarize or set(values.tolist()) <= {0, 255}:
            lab_data = (lab_data > 0).astype(np.uint8)
        images.append(img.data)
        labels.append(lab_data)
        scales.append(list(img.scale))
    unlabeled = [read_image(f).data for f in (_files(args.unlabeled) if args.unlabeled else [])]
    extra = _options(args.option)
    base = args.base or args.network
    seg = load_model(base, device=args.device)
    if seg.card.spatial_dims == 3:
        extra.setdefault("spacing", scales)
        if args.unlabeled:
            extra.setdefault("unlabeled_spacing", [list(read_image(f).scale) for f in _files(args.unlabeled)])
    opts: dict[str, Any] = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "crop_size": args.crop_size,
            "augment": args.augment,
            "orientation": args.orientation,
            "seed": args.seed,
            "device": args.device,
            "checkpoint": args.output,
            "resume": args.resume,
        }.items()
        if v is not None
    }
    opts.update(extra)
    bar = None
    last = None
    for p in seg.finetune(images, labels, unlabeled=unlabeled or None, steps=args.steps, **opts):
        if bar is None:
            if p.message and rank == 0:  # what the data planner wants the user to know, once
                sys.stderr.write(f"note: {p.message}\n")
            bar = _progress(p.total, f"training {seg.card.name}", enabled=rank == 0)
            bar.n = p.step - 1
        bar.update(1)
        post = {"loss": f"{p.loss:.4f}"}
        if p.metrics:
            post.update({k: f"{v:.3f}" for k, v in p.metrics.items()})
        bar.set_postfix(post, refresh=False)
        last = p
    if bar is not None:
        bar.close()
    if rank == 0:
        seg.save(args.output)
        best = f"{last.best:.3f}" if last is not None else "n/a"
        sys.stdout.write(f"saved {args.output} (best validation Dice {best})\n")
    shutdown()  # under torchrun: every rank leaves the process group together
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Open napari with a sample and the plugin's widgets."""
    from napari_medseg.widgets.demo import run_demo

    return run_demo(sample=args.sample, run=not args.no_run)


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    p = argparse.ArgumentParser(
        prog="napari-medseg",
        description="Medical image segmentation networks for napari, from the command line.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the networks", description="List the registered networks.")
    m.add_argument("name", nargs="?", default="", help="describe this network and its run options")
    m.add_argument("--json", action="store_true", help="print the full model cards as JSON")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser(
        "segment",
        help="segment an image file",
        description="Segment one image (NIfTI, TIFF, PNG, JPEG, .npy) and write the labels.",
    )
    s.add_argument("model", help="network name (see `models`) or a .safetensors checkpoint")
    s.add_argument("input", help="input image file")
    s.add_argument("-o", "--output", required=True, help="output labels file (.nii.gz, .tif, .png, .npy)")
    s.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    s.add_argument(
        "--preset",
        default=None,
        help="intensity preset: auto, ct-soft-tissue, ct-lung, ct-bone, ct-brain, ct:LEVEL,WIDTH, "
        "mr, ultrasound, rgb, uint8, minmax",
    )
    s.add_argument("--channel-axis", type=int, default=None, help="axis of RGB channels, if not last")
    s.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="network option (repeatable)"
    )
    s.add_argument(
        "--recipe",
        default=None,
        help="a named set of run options (see `models NAME`); --option values override it",
    )
    s.set_defaults(func=cmd_segment)

    t = sub.add_parser(
        "train",
        help="train or fine-tune a network on a dataset",
        description="Train a network on image/label pairs matched by file name. Runs under "
        "torchrun for several GPUs or nodes (DistributedDataParallel).",
    )
    t.add_argument("network", help="network name to train")
    t.add_argument("--images", required=True, help="image file or folder")
    t.add_argument("--labels", required=True, help="label file or folder (same file names)")
    t.add_argument("--unlabeled", default=None, help="folder of unlabeled images (efs-medseg)")
    t.add_argument(
        "-o", "--output", required=True, help="checkpoint to write (.safetensors); also the resume point"
    )
    t.add_argument("--base", default=None, help="start from this checkpoint instead of the default weights")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps")
    t.add_argument("--epochs", type=int, default=None, help="passes over the labeled slices (if no --steps)")
    t.add_argument("--lr", type=float, default=None, help="learning rate")
    t.add_argument("--batch-size", type=int, default=None, help="batch size per process")
    t.add_argument("--crop-size", type=int, default=None, help="training crop size")
    t.add_argument("--augment", default=None, choices=AUGMENT_PRESETS)
    t.add_argument(
        "--orientation",
        default=None,
        choices=ORIENTATIONS,
        help="views: any = quarter turns and flips; upright = left-right flips only (ultrasound, "
        "radiology); auto = upright for grayscale, any for colour",
    )
    t.add_argument("--seed", type=int, default=None, help="random seed")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    t.add_argument("--resume", action="store_true", help="continue from --output if it exists")
    t.add_argument("--binarize", action="store_true", help="treat every non-zero label as class 1")
    t.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="network or training option (repeatable)",
    )
    t.set_defaults(func=cmd_train)

    d = sub.add_parser(
        "demo",
        help="open napari with a sample and the widgets",
        description="Open napari with a sample image, the Segment, Prompt and Fine-tune widgets "
        "docked, and HF-SAM (LiteMedSAM weights, offline) selected.",
    )
    d.add_argument(
        "--sample", choices=["2d", "3d"], default="3d", help="which sample to load (default 3d MRI)"
    )
    d.add_argument("--no-run", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-medseg`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (ValueError, KeyError, RuntimeError, FileNotFoundError, TypeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"error: {msg}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
