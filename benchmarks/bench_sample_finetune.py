"""The few-shot workflow in the real widgets: paint 5 slices of the 3D sample, fine-tune HF-SAM.

Run under Xvfb (napari needs an X display with OpenGL)::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_sample_finetune.py \\
        [--network hf-sam] [--steps 0] [--screenshot docs/images/hf-sam-sample-finetune.png]

What it does, as a user would: opens the bundled MNI152 T1 volume (94 × 116 × 98, 2 mm), keeps
the tissue labels (1, 2) of five axial slices as the "painted" Labels layer, chooses the network
in the Fine-tune widget with the widget's own defaults (``--steps 0``), presses *Start*, and
when training ends presses *Apply to all slices*. While both jobs run, a 20 ms Qt timer
measures how long the event loop is away (the UI's worst stall) and moves napari's slice
slider every half second, as a user scrolling through the volume would.

Scored against the sample's full tissue labels on the slices that were **not** painted: Dice
per class over those slices together, and the mean over classes; also the slices within 5 of a
painted slice and those farther away. Writes ``benchmarks/results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp())
os.environ.setdefault("XDG_DATA_HOME", tempfile.mkdtemp())

import napari  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from qtpy.QtCore import QTimer  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mb, save, table  # noqa: E402

from napari_medseg._sample_data import sample_3d  # noqa: E402
from napari_medseg.engine.metrics import dice  # noqa: E402
from napari_medseg.widgets.finetune import FinetuneWidget  # noqa: E402

PAINTED = (30, 40, 50, 60, 70)


class StallProbe:
    """Records the gaps between ticks of a 20 ms timer, and scrolls the viewer now and then."""

    def __init__(self, viewer: napari.Viewer, period_ms: int = 20) -> None:
        self.viewer = viewer
        self.gaps: list[float] = []
        self.scrolls = 0
        self._last = time.perf_counter()
        self._timer = QTimer()
        self._timer.setInterval(period_ms)
        self._timer.timeout.connect(self._tick)

    def start(self) -> None:
        self.gaps.clear()
        self._last = time.perf_counter()
        self._timer.start()

    def stop(self) -> dict[str, float]:
        self._timer.stop()
        gaps = np.asarray(self.gaps) * 1000 if self.gaps else np.zeros(1)
        return {
            "ticks": len(self.gaps),
            "max stall (ms)": float(gaps.max()),
            "p99 gap (ms)": float(np.percentile(gaps, 99)),
            "median gap (ms)": float(np.median(gaps)),
            "scrolls": self.scrolls,
        }

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now
        if len(self.gaps) % 25 == 0:  # every ~0.5 s the "user" moves one slice
            z = int(self.viewer.dims.current_step[0])
            self.viewer.dims.set_current_step(0, 20 + (z - 19) % 60)
            self.scrolls += 1


def wait(widget: Any, timeout: float = 3600) -> float:
    """Process Qt events until a widget's ``job`` has ended; return the seconds it took."""
    t0 = time.time()
    while widget.job is not None and widget.job.running:
        QApplication.processEvents()
        time.sleep(0.005)
        if time.time() - t0 > timeout:
            sys.exit("timed out")
    QApplication.processEvents()
    return time.time() - t0


def open_painted_sample(viewer: napari.Viewer) -> tuple[napari.layers.Image, np.ndarray, np.ndarray]:
    """Add the 3-D sample and a Labels layer "painted (5 slices)" holding its tissue labels on
    ``PAINTED`` only, as a user who painted five slices would have.

    Returns:
        (the Image layer, the painted (Z, Y, X) labels, the sample's full tissue labels).
    """
    (img, img_kw, _), (lab, lab_kw, _) = sample_3d()
    image = viewer.add_image(img, **img_kw)
    painted = np.zeros_like(lab)
    for z in PAINTED:
        painted[z] = lab[z]
    # The sample's geometry and class names, shown, under the name a user would give it.
    viewer.add_labels(painted, **{**lab_kw, "name": "painted (5 slices)", "visible": True})
    viewer.dims.set_current_step(0, PAINTED[2])
    return image, painted, lab


def score(pred: np.ndarray, truth: np.ndarray, slices: list[int]) -> dict[str, float]:
    """Dice per class over the given slices together, and their mean."""
    p, t = pred[slices], truth[slices]
    out = {f"class {c}": dice(p == c, t == c) for c in (1, 2)}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--network", default="hf-sam")
    ap.add_argument("--steps", type=int, default=0, help="0: the widget's default for the network")
    ap.add_argument("--screenshot", default="", help="save a screenshot of the result here")
    ap.add_argument("--name", default="sample_finetune_hf_sam")
    args = ap.parse_args()

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    image, painted, lab = open_painted_sample(viewer)

    ft = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(ft, name="Fine-tune (MedSeg)", area="right")
    ft.network.setCurrentText(args.network)
    ft._network_changed()
    ft.image.set_layer(image.name)
    ft.labels.set_layer("painted (5 slices)")
    if args.steps:
        ft.steps.setValue(args.steps)
    ft.checkpoint.setText(str(Path(tempfile.mkdtemp()) / f"{args.network}-mni.safetensors"))
    options = ft.options()

    probe = StallProbe(viewer)
    probe.start()
    if ft.start() is None:
        sys.exit(f"did not start: {ft.status.text()}")
    train_s = wait(ft)
    train_ui = probe.stop()
    if ft.result is None:
        sys.exit(f"no model: {ft.status.text()}")

    probe.start()
    ft.apply_to_all()
    apply_s = wait(ft)
    apply_ui = probe.stop()
    out = viewer.layers[-1]
    pred = np.asarray(out.data)

    unpainted = [z for z in range(lab.shape[0]) if z not in PAINTED and lab[z].any()]
    near = [z for z in unpainted if min(abs(z - p) for p in PAINTED) <= 5]
    far = [z for z in unpainted if z not in near]
    unchanged = bool(np.array_equal(viewer.layers["painted (5 slices)"].data, painted))
    rows = [
        {"slices": f"unpainted, all ({len(unpainted)})", **score(pred, lab, unpainted)},
        {"slices": f"within 5 of a painted one ({len(near)})", **score(pred, lab, near)},
        {"slices": f"farther ({len(far)})", **score(pred, lab, far)},
        {"slices": "painted (5, for reference)", **score(pred, lab, list(PAINTED))},
    ]
    timing = {
        "network": args.network,
        "steps": options["steps"],
        "orientation": options.get("orientation"),
        "train (s)": train_s,
        "apply to all slices (s)": apply_s,
        "train: max UI stall (ms)": train_ui["max stall (ms)"],
        "train: p99 timer gap (ms)": train_ui["p99 gap (ms)"],
        "apply: max UI stall (ms)": apply_ui["max stall (ms)"],
        "slider moves during the jobs": train_ui["scrolls"] + apply_ui["scrolls"],
        "painted layer unchanged": unchanged,
        "peak RSS (MB)": peak_rss_mb(),
    }
    print(table(rows, ["slices", "class 1", "class 2", "mean"]))  # noqa: T201 (script output)
    print(table([timing], list(timing)))  # noqa: T201
    print(ft.status.text())  # noqa: T201
    if args.screenshot:
        for layer in viewer.layers:
            layer.visible = layer is image or layer is out
        viewer.dims.set_current_step(0, 45)  # an unpainted slice between two painted ones
        QApplication.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False)
    path = save(
        args.name,
        {
            "dice": rows,
            "timing": timing,
            "ui_train": train_ui,
            "ui_apply": apply_ui,
            "options": options,
            "painted": list(PAINTED),
            "status": ft.status.text(),
            "threads": torch.get_num_threads(),
        },
    )
    print(f"wrote {path}")  # noqa: T201
    viewer.close()


if __name__ == "__main__":
    main()
