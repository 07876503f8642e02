"""Take the screenshots of docs/widgets/*.md from the real widgets (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/widgets/make_screenshots.py

It opens the 3D sample (MNI152 T1 with tissue labels), keeps the labels of five axial slices as
if a user had painted them, fine-tunes STS-Net on them for a few steps in the Fine-tune widget,
then segments an unpainted slice with the new session model in the Segment widget. Writes
docs/images/widget-finetune.png and docs/images/widget-segment.png. ``--only s3`` instead runs
S³-Net with the "consensus" recipe on the 2D sample and writes docs/images/widget-segment-s3.png
(the recipe list, the run options and the cluster-keeping box). ``--only hf-sam CHECKPOINT``
segments an unpainted slice of the 3D sample with a fine-tuned HF-SAM checkpoint of that sample
(e.g. one saved by the Fine-tune widget, or by ``benchmarks/bench_sample_finetune.py``) and
writes docs/images/widget-segment-hf-sam.png (HF-SAM's prompt-free run options).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp())
os.environ.setdefault("XDG_DATA_HOME", tempfile.mkdtemp())

import napari  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_medseg._sample_data import sample_2d  # noqa: E402
from napari_medseg.widgets.finetune import FinetuneWidget  # noqa: E402
from napari_medseg.widgets.segment import SegmentWidget  # noqa: E402

# The painted sample and the wait loop are shared with the workflow benchmark.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_sample_finetune import PAINTED, open_painted_sample, wait  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "images"
STEPS = int(os.environ.get("SHOT_STEPS", "8"))


def main() -> None:
    """Fine-tune, segment, and save both screenshots."""
    OUT.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    image, _, _ = open_painted_sample(viewer)
    img = image.data

    ft = FinetuneWidget(viewer)
    ft_dock = viewer.window.add_dock_widget(ft, name="Fine-tune (MedSeg)", area="right")
    seg = SegmentWidget(viewer)
    seg_dock = viewer.window.add_dock_widget(seg, name="Segment (MedSeg)", area="right", tabify=True)
    ft.network.setCurrentText("sts-net")
    ft.image.set_layer(image.name)
    ft.labels.set_layer("painted (5 slices)")
    ft.steps.setValue(STEPS)
    ft.batch_size.setValue(2)
    ft.lr.setValue(1e-3)
    ft.checkpoint.setText(str(Path(tempfile.mkdtemp()) / "sts-net-mni.safetensors"))
    ft.start()
    wait(ft)
    ft_dock.raise_()
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "widget-finetune.png"), canvas_only=False)

    # Segmenting all 98 slices with a ResNeXt-50 takes minutes on 2 CPUs; one slice shows it.
    z = PAINTED[2] + 5
    one = viewer.add_image(img[z], name=f"T1 slice {z}", scale=image.scale[1:])
    for layer in viewer.layers:
        layer.visible = layer is one
    name = seg.session.names()[-1]
    seg.select_network(name)
    viewer.layers.selection.active = one
    seg.run()
    wait(seg)
    seg_dock.raise_()
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "widget-segment.png"), canvas_only=False)
    print(ft.status.text())  # noqa: T201 (script output)
    print(seg.status.text())  # noqa: T201
    viewer.close()


def s3_screenshot() -> None:
    """S³-Net with the "consensus" recipe on the 2D sample, one click kept."""
    OUT.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    ((img, img_kw, _),) = sample_2d()
    image = viewer.add_image(img, **img_kw)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment (MedSeg)", area="right")
    seg.select_network("s3-net")
    seg.options.apply_recipe("consensus")
    viewer.layers.selection.active = image
    seg.run()
    wait(seg)
    clicks = seg.clusters_box.add_click_layer()
    h, w = img.shape[:2]
    clicks.add([h * 0.5, w * 0.5])  # one click on the retina's main cluster
    seg.clusters_box.keep_clicked_clusters()
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "widget-segment-s3.png"), canvas_only=False)
    print(seg.status.text())  # noqa: T201 (script output)
    viewer.close()


def hf_sam_screenshot(checkpoint: str) -> None:
    """A fine-tuned HF-SAM checkpoint of the 3D sample on one unpainted slice, default options."""
    OUT.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    image, _, _ = open_painted_sample(viewer)
    z = PAINTED[2] + 5
    one = viewer.add_image(image.data[z], name=f"T1 slice {z}", scale=image.scale[1:])
    for layer in viewer.layers:
        layer.visible = layer is one
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment (MedSeg)", area="right")
    seg.select_network("hf-sam")
    seg.checkpoint.setText(checkpoint)  # the form now shows the checkpoint's run options
    viewer.layers.selection.active = one
    seg.run()
    wait(seg)
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "widget-segment-hf-sam.png"), canvas_only=False)
    print(seg.status.text())  # noqa: T201 (script output)
    viewer.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--only", "s3"]:
        s3_screenshot()
    elif sys.argv[1:3] == ["--only", "hf-sam"] and len(sys.argv) == 4:
        hf_sam_screenshot(sys.argv[3])
    else:
        main()
