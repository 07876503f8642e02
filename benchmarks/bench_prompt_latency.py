"""Click-to-preview latency of the Prompt widget in a real napari viewer (CPU, HF-SAM).

Measures, with the real HF-SAM model (LiteMedSAM backbone, shipped weights) unless
``--fake`` is given:

* 2-D: a 512x512 CT-like slice (synthetic phantom in HU): first prompt (encode + decode in a
  worker) and then the time from a Points/Shapes-layer data event to the preview layer's
  refresh (``set_data`` event) for further clicks (one decoder call each);
* 3-D: a volume (a 100-slice synthetic CT-like volume; ``--quick``: 10 slices): precompute of
  every slice (per-slice embedding time), click latency on a precomputed slice, and the time to
  reopen the volume with the disk cache (new session, no encoder call) and get a preview;
* optionally one real 3-D LGE-MRI volume from ../shared/data/la2018 (``MEDSEG_DATA``), read at
  run time and never copied.

Runs under Xvfb (started here when ``DISPLAY`` is unset). Prints a table and writes
benchmarks/results/bench_prompt_latency.json.

    .venv/bin/python benchmarks/bench_prompt_latency.py [--quick] [--fake]
    .venv/bin/python benchmarks/bench_prompt_latency.py --screenshot docs/images/widget-prompt.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ensure_display() -> subprocess.Popen | None:
    if os.environ.get("DISPLAY"):
        return None
    proc = subprocess.Popen(
        ["Xvfb", ":97", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["DISPLAY"] = ":97"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    time.sleep(1.5)
    return proc


def ct_phantom(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """int16 HU-like image: air, a body ellipse, two organs and a small lesion; 2-D or 3-D."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    norm = [(g - s / 2) / (s / 2) for g, s in zip(grids, shape, strict=True)]
    img = np.full(shape, -1000.0)
    r2 = sum(n**2 for n in norm[-2:])
    body = r2 < 0.8 if len(shape) == 2 else (r2 + 0.3 * norm[0] ** 2) < 0.8
    img[body] = 40.0
    liver = ((norm[-2] - 0.1) ** 2 / 0.12 + (norm[-1] + 0.3) ** 2 / 0.08) < 1
    if len(shape) == 3:
        liver = liver & (np.abs(norm[0]) < 0.6)
    img[liver & body] = 60.0
    lesion = (
        (norm[-2] - 0.1) ** 2 + (norm[-1] - 0.35) ** 2 + (0 if len(shape) == 2 else (norm[0] * 0.5) ** 2)
    ) < 0.012
    img[lesion] = 150.0
    img += rng.normal(0, 12, shape)
    return img.astype(np.int16)


def lesion_box(shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """A box around the phantom's lesion (small: HF-SAM zooms into an ROI)."""
    h, w = shape[-2:]
    cy, cx, r = h / 2 * 1.1, w / 2 * 1.35, 0.11 * h / 2 + 6
    return (cy - r, cx - r, cy + r, cx + r)


def liver_box(shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """A box around the phantom's "liver" (large: the full-slice embedding is used)."""
    h, w = shape[-2:]
    return (h / 2 * 0.72, w / 2 * 0.4, h / 2 * 1.48, w / 2 * 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10-slice volume, fewer clicks")
    ap.add_argument("--fake", action="store_true", help="fake model (tests/fake_prompt.py): UI overhead only")
    ap.add_argument("--clicks", type=int, default=0)
    ap.add_argument("--screenshot", metavar="PNG", help="only save the docs screenshot there")
    args = ap.parse_args()
    xvfb = ensure_display()
    tmp = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    os.environ.setdefault("XDG_CONFIG_HOME", str(tmp / "xdg"))
    os.environ.setdefault("XDG_CACHE_HOME", str(tmp / "xdg"))
    try:
        if args.screenshot:
            screenshot(Path(args.screenshot))
            return
        results = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if xvfb is not None:
            xvfb.terminate()
    out = ROOT / "benchmarks" / "results" / "bench_prompt_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out.relative_to(ROOT)}")


def screenshot(path: Path) -> None:
    """docs/images/widget-prompt.png: phantom liver committed, lesion box + point previewed."""
    import napari
    from PIL import Image as PILImage
    from qtpy.QtWidgets import QApplication

    from napari_medseg import load_model
    from napari_medseg.widgets.prompt import PromptWidget  # the widgets package guards Triton

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window.resize(1400, 900)
    img = ct_phantom((512, 512))
    viewer.add_image(img, name="CT phantom (synthetic)", contrast_limits=(-160, 240))
    model = load_model("hf-sam", device="cpu")
    w = PromptWidget(viewer, model_factory=lambda: model)
    viewer.window.add_dock_widget(w, name="Prompt (HF-SAM)", area="right")
    w.preset_combo.setCurrentText("ct-soft-tissue")

    def settle() -> None:
        while w.busy:
            app.processEvents()
            time.sleep(0.01)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)

    y0, x0, y1, x1 = liver_box(img.shape)
    w.shapes_layer.add(np.array([[y0, x0], [y1, x1]]), shape_type="rectangle")
    settle()
    w.commit()
    y0, x0, y1, x1 = lesion_box(img.shape)
    w.shapes_layer.add(np.array([[y0, x0], [y1, x1]]), shape_type="rectangle")
    settle()
    w.points_layer.add([[(y0 + y1) / 2, (x0 + x1) / 2]])
    viewer.layers.selection.active = w.points_layer
    settle()
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(path, optimize=True)
    viewer.close()


def run(args: argparse.Namespace, tmp: Path) -> dict:
    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_medseg.widgets.prompt import PromptWidget  # the widgets package guards Triton

    torch.manual_seed(0)
    clicks = args.clicks or (5 if args.quick else 15)
    nz = 10 if args.quick else 100

    if args.fake:
        sys.path.insert(0, str(ROOT / "tests"))
        from fake_prompt import FakePromptSegmenter

        model = FakePromptSegmenter()
        model_name, load_s = "fake", 0.0
    else:
        from napari_medseg import load_model

        t0 = time.perf_counter()
        model = load_model("hf-sam", device="cpu")
        model_name, load_s = "hf-sam (litemedsam)", time.perf_counter() - t0

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()

    def wait(widget: PromptWidget, timeout: float = 900.0) -> None:
        end = time.perf_counter() + timeout
        while widget.busy and time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.002)
        app.processEvents()

    def timed_prompt(widget: PromptWidget, add) -> float:
        """Seconds from the prompt layer's data event to the preview layer's refresh."""
        stamp: dict[str, float] = {}

        def on_data(event=None) -> None:
            # the first data event of the edit ("adding"): the widget reacts to the later
            # "added" one, and a main-thread decode refreshes the preview before this
            # handler would see "added"
            stamp.setdefault("event", time.perf_counter())

        def on_refresh(event=None) -> None:
            stamp["refresh"] = time.perf_counter()

        widget.points_layer.events.data.connect(on_data)
        widget.shapes_layer.events.data.connect(on_data)
        widget.preview_layer.events.set_data.connect(on_refresh)
        try:
            add()
            wait(widget)
            end = time.perf_counter() + 5
            while "refresh" not in stamp and time.perf_counter() < end:
                app.processEvents()
        finally:
            widget.points_layer.events.data.disconnect(on_data)
            widget.shapes_layer.events.data.disconnect(on_data)
            widget.preview_layer.events.set_data.disconnect(on_refresh)
        return stamp.get("refresh", float("nan")) - stamp.get("event", float("nan"))

    def box_then_clicks(
        widget: PromptWidget, z: int | None, box: tuple[float, float, float, float], n: int
    ) -> tuple[float, list[float]]:
        """Draw ``box`` (first prompt), then add ``n`` positive points inside it one by one.

        Returns (seconds to the first preview, [seconds per point click]).
        """
        rng = np.random.default_rng(1)
        widget.clear()
        y0, x0, y1, x1 = box
        rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
        if z is not None:
            rect = np.concatenate([np.full((4, 1), z), rect], 1)
        first = timed_prompt(widget, lambda: widget.shapes_layer.add(rect, shape_type="rectangle"))
        times = []
        for _ in range(n):
            cy = rng.uniform(0.4, 0.6) * (y1 - y0) + y0
            cx = rng.uniform(0.4, 0.6) * (x1 - x0) + x0
            pt = [cy, cx] if z is None else [z, cy, cx]
            times.append(timed_prompt(widget, lambda p=pt: widget.points_layer.add([p])))
        return first, times

    res: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} vCPU, no GPU",
        "torch_threads": torch.get_num_threads(),
        "model": model_name,
        "model_load_s": round(load_s, 2),
        "quick": bool(args.quick),
        "load_avg_at_start": os.getloadavg()[0],
    }

    # ---------------------------------------------------------------- 2-D 512x512 CT-like
    img2 = ct_phantom((512, 512))
    viewer.add_image(img2, name="ct2d")
    w = PromptWidget(viewer, model_factory=lambda: model)
    viewer.window.add_dock_widget(w, name="Prompt")
    w.preset_combo.setCurrentText("ct-soft-tissue")
    first_lesion, times = box_then_clicks(w, None, lesion_box(img2.shape), clicks)
    enc_after_lesion = w.session.encode_calls
    first_liver, _ = box_then_clicks(w, None, liver_box(img2.shape), 0)
    res["2d_512"] = {
        "first_prompt_s, small lesion box (ROI zoom encode + decode)": round(first_lesion, 3),
        "first_prompt_s, liver box (full-slice encode + decode)": round(first_liver, 3),
        "point_click_to_preview_ms_median": round(1000 * float(np.median(times)), 1),
        "point_click_to_preview_ms_p90": round(1000 * float(np.percentile(times, 90)), 1),
        "encoder_calls_during_clicks": enc_after_lesion - 1,
        "decode_ms_last": round(w.last_decode_ms or float("nan"), 1),
        "decoded_on_main_thread": bool((w.last_decode_ms or 1e9) <= 50),
        "clicks": clicks,
    }
    viewer.layers.clear()
    w.close_session()
    w.close()

    # ---------------------------------------------------------------- 3-D volume
    vol = ct_phantom((nz, 256, 256), seed=1)
    cache = tmp / "emb-cache"
    viewer.add_image(vol, name="ct3d", scale=(2.5, 0.8, 0.8))
    w = PromptWidget(viewer, model_factory=lambda: model)
    w.preset_combo.setCurrentText("ct-soft-tissue")
    w.cache_dir.setText(str(cache))
    t0 = time.perf_counter()
    w.precompute()
    wait(w, 3600)
    pre_s = time.perf_counter() - t0
    zc = nz // 2
    viewer.dims.set_point(0, zc * 2.5)
    first3, times = box_then_clicks(w, zc, liver_box(vol.shape), clicks)
    size_mb = sum(f.stat().st_size for f in cache.glob("*.safetensors")) / 2**20
    w.close_session()
    # reopen: a fresh session on the same volume reads the disk cache (no encoder call)
    w.clear()
    t0 = time.perf_counter()
    reopen, _ = box_then_clicks(w, zc, liver_box(vol.shape), 0)
    res["3d"] = {
        "shape": list(vol.shape),
        "precompute_s": round(pre_s, 1),
        "embedding_s_per_slice": round(pre_s / nz, 3),
        "first_prompt_s, liver box on a precomputed slice": round(first3, 3),
        "point_click_to_preview_ms_median": round(1000 * float(np.median(times)), 1),
        "disk_cache_mb": round(size_mb, 1),
        "reopen_first_preview_s (disk cache)": round(reopen, 2),
        "reopen_encoder_calls": w.session.encode_calls if w.session else None,
    }
    viewer.close()
    print_table(res)
    return res


def print_table(res: dict) -> None:
    load = res["load_avg_at_start"]
    print(f"\nPrompt widget latency — {res['model']} — {res['machine']} (load avg {load:.1f})")
    print(f"model load: {res['model_load_s']} s")
    for section in ("2d_512", "3d"):
        print(f"\n[{section}]")
        for k, v in res[section].items():
            print(f"  {k:42s} {v}")


if __name__ == "__main__":
    main()
