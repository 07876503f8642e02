"""The Prompt dock widget: click points and draw boxes, see HF-SAM's mask at once, commit it.

Threading (DESIGN.md): a slice is encoded once, in a thread worker, the first time it is
prompted; after that each prompt change costs one decoder call, run on the main thread
(tens of ms). Precompute and propagation are generator workers with Cancel. One lock guards
the :class:`PromptSession`: the main thread only decodes when it gets the lock at once,
otherwise the decode goes to a worker too, so a running precompute never freezes a click.
Layers are written on the main thread only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from napari_medseg.engine.prompt import Prompts, PromptSession
from napari_medseg.widgets import prompt_layers as pl
from napari_medseg.widgets._layers import spatial_shape
from napari_medseg.widgets._worker import error_message
from napari_medseg.widgets.prompt_jobs import PromptJobsMixin
from napari_medseg.widgets.prompt_ui import KEY_BINDINGS, bind_keys, build_ui

log = logging.getLogger(__name__)

NEW_TARGET = "<new layer: medseg objects>"
#: Decodes slower than this (ms) move off the main thread (DESIGN.md: ~50 ms keeps the UI fluid).
MAIN_THREAD_DECODE_MS = 50.0


def _default_model() -> Any:
    from napari_medseg import load_model

    return load_model("hf-sam")


class PromptWidget(PromptJobsMixin, QWidget):
    """Interactive HF-SAM segmentation of the chosen Image layer.

    Args:
        napari_viewer: The viewer.
        model_factory: Builds the promptable segmenter (default ``load_model("hf-sam")``);
            called once, in a worker, the first time it is needed.

    """

    def __init__(self, napari_viewer: Any, model_factory: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model_factory = model_factory or _default_model
        self.model: Any = None
        self.session: PromptSession | None = None
        self._session_key: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        self._image: Any = None
        self._image_name = ""
        self._image_token = 0  # layers may come wrapped in per-access proxies: no id()/is checks
        self.points_layer: Any = None
        self.shapes_layer: Any = None
        self.preview_layer: Any = None
        self.masks: dict[int | None, np.ndarray] = {}
        self._propagated: set[int] = set()
        self._generation = 0
        self._suppress = False
        self._building = False
        self._long_worker: Any = None
        self._workers: set[Any] = set()
        self._last_flush = 0.0
        self.last_decode_ms: float | None = None
        build_ui(self)
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)
        self._refresh_combos()

    # ------------------------------------------------------------------ UI
    def _on_layers_changed(self, event: Any = None) -> None:
        # Adding/removing layers from inside the layer list's own event breaks napari's list
        # view (a nested removal during clear() never returns): do it after the event.
        QTimer.singleShot(0, self._refresh_combos)

    def _refresh_combos(self) -> None:
        from napari.layers import Image, Labels

        ours = {pl.PREVIEW_NAME}
        images = [ly.name for ly in self.viewer.layers if isinstance(ly, Image)]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(images)
        if current in images:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        helpers = (self.points_layer, self.shapes_layer, self.preview_layer)
        lost = self._image is not None and any(h is None or h.name not in self.viewer.layers for h in helpers)
        if self._building:
            return
        if self.image_combo.currentText() != self._image_name or lost:
            self._image_name = ""  # a helper layer was deleted: rebuild them all
            self._on_image_changed(self.image_combo.currentText())
        shape = spatial_shape(self._image) if self._image is not None else None
        targets = [
            ly.name
            for ly in self.viewer.layers
            if isinstance(ly, Labels) and ly.name not in ours and tuple(ly.data.shape) == shape
        ]
        current = self.target_combo.currentText()
        self.target_combo.clear()
        self.target_combo.addItems([NEW_TARGET, *targets])
        if current in targets:
            self.target_combo.setCurrentText(current)
        elif pl.OBJECTS_NAME in targets:
            self.target_combo.setCurrentText(pl.OBJECTS_NAME)

    # ------------------------------------------------------------------ layers
    @property
    def image_layer(self) -> Any:
        """The Image layer being prompted (``None`` if there is none)."""
        return self._image

    def _on_image_changed(self, name: str) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is not None and name == self._image_name:
            return
        self._building = True  # our own layer edits below re-enter _refresh_combos
        try:
            self._switch_image(name, layer)
        finally:
            self._building = False
        self._refresh_combos()  # target layers of the new shape

    def _switch_image(self, name: str, layer: Any) -> None:
        self._reset_session()
        old = (self.points_layer, self.shapes_layer, self.preview_layer)
        self.points_layer = self.shapes_layer = self.preview_layer = None
        self.masks.clear()
        self._image = layer  # before removing layers: their events re-enter _refresh_combos
        self._image_name = name if layer is not None else ""
        self._image_token += 1
        for helper in old:
            if helper is not None and helper.name in self.viewer.layers:
                self.viewer.layers.remove(helper.name)
        if layer is None:
            return
        layer.events.data.connect(self._on_image_data)
        self.preview_layer = pl.add_preview_layer(self.viewer, layer)
        self.shapes_layer = pl.add_shapes_layer(self.viewer, layer)
        self.points_layer = pl.add_points_layer(self.viewer, layer)
        pl.set_polarity(self.points_layer, self.positive_check.isChecked())
        self.points_layer.events.data.connect(self._on_prompts_changed)
        self.shapes_layer.events.data.connect(self._on_prompts_changed)
        bind_keys(self)
        self.viewer.layers.selection.active = self.points_layer

    def _on_image_data(self, event: Any = None) -> None:
        source = getattr(event, "source", None)
        if source is not None and getattr(source, "name", None) == self._image_name:
            self._reset_session()  # new pixels: the embeddings no longer match

    def _on_polarity(self, positive: bool) -> None:
        if self.points_layer is not None:
            pl.set_polarity(self.points_layer, positive)

    def toggle_polarity(self) -> None:
        """Switch new points between positive and negative."""
        self.positive_check.setChecked(not self.positive_check.isChecked())

    # ------------------------------------------------------------------ session
    def _settings_key(self) -> tuple[Any, ...]:
        return (self._image_token, self.preset_combo.currentText(), self.cache_dir.text().strip())

    # ------------------------------------------------------------------ prompts → preview
    def current_slice(self) -> int | None:
        """Index of the image slice the viewer shows (``None`` for 2-D images)."""
        image = self._image
        if image is None or len(spatial_shape(image)) == 2:
            return None
        coord = image.world_to_data(self.viewer.dims.point)
        nz = spatial_shape(image)[0]
        return int(np.clip(np.rint(coord[-image.ndim]), 0, nz - 1))

    def _on_prompts_changed(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "") or "")
        if self._suppress or action in ("adding", "removing", "changing"):
            return
        if self.points_layer is not None:
            pl.recolor_points(self.points_layer)
        self.update_preview()

    def _on_slice_changed(self, event: Any = None) -> None:
        z = self.current_slice()
        if z is not None and z not in self.masks and self._prompts(z) is not None:
            self.update_preview()

    def _prompts(self, z: int | None) -> Prompts | None:
        try:
            return pl.slice_prompts(self.points_layer, self.shapes_layer, self._image, z)
        except ValueError:
            return None

    def update_preview(self) -> None:
        """Decode the current slice's prompts into the preview (encoding in a worker if needed)."""
        if self._image is None:
            return
        z = self.current_slice()
        prompts = self._prompts(z)
        self._generation += 1
        gen = self._generation
        for done in self._propagated:
            self.masks.pop(done, None)
        self._propagated.clear()
        if prompts is None:
            self.masks.pop(z, None)
            self._refresh_preview()
            return
        session = self.session if self._session_key == self._settings_key() else None
        # The main thread decodes only while decodes stay fast (a loaded CPU can make them slow).
        fast = self.last_decode_ms is None or self.last_decode_ms <= MAIN_THREAD_DECODE_MS
        if session is not None and fast and self._lock.acquire(blocking=False):
            try:
                roi = session.seg.plan_roi(prompts, session.slice_shape)
                if session.is_cached(z or 0, roi):
                    t0 = time.perf_counter()
                    result = session.predict_result(prompts, z or 0)
                    self.last_decode_ms = 1000 * (time.perf_counter() - t0)
                    self._show(z, result.mask, gen)
                    return
            finally:
                self._lock.release()
        self._start_decode_worker(prompts, z, gen)

    def _start_decode_worker(self, prompts: Prompts, z: int | None, gen: int) -> None:
        args = self._session_args()

        def work() -> Any:
            try:
                with self._lock:
                    if gen != self._generation:
                        return None  # superseded by a newer prompt before it started
                    session = self._open_session(args)
                    roi = session.seg.plan_roi(prompts, session.slice_shape)
                    encoded = not session.is_cached(z or 0, roi)
                    session.embedding(z or 0, roi)  # encodes once; cached afterwards
                    t0 = time.perf_counter()  # the decode alone decides the next click's thread
                    result = session.predict_result(prompts, z or 0)
                    self.last_decode_ms = 1000 * (time.perf_counter() - t0)
                    if encoded:
                        self._maybe_flush(session)
                    return result
            except Exception as err:  # reported on the main thread, one line
                log.debug("prompt failed", exc_info=True)
                return err

        def done(res: Any) -> None:
            if isinstance(res, BaseException):
                self.status.setText(f"Prompt failed: {error_message(res)}")
                show_error(f"Prompt: {error_message(res)}")
            elif res is not None:
                self._show(z, res.mask, gen)

        cached = self.session is not None and self.session.is_cached(z or 0)
        self._set_busy(
            "Decoding…" if cached else f"Encoding slice {1 if z is None else z + 1} (first prompt)…"
        )
        worker = create_worker(work)
        worker.returned.connect(done)
        self._run(worker)

    def _show(self, z: int | None, mask: np.ndarray, gen: int) -> None:
        if gen != self._generation:
            return  # the prompts changed while this was computed
        self.masks[z] = mask
        self._refresh_preview()
        self.status.setText(
            f"Preview: {int(mask.sum())} pixels"
            + ("" if z is None else f" on slice {z + 1}")
            + ("" if self.last_decode_ms is None else f" (decode {self.last_decode_ms:.0f} ms)")
        )

    def _refresh_preview(self) -> None:
        layer = self.preview_layer
        if layer is None:
            return
        data = layer.data
        data[...] = 0
        for z, mask in self.masks.items():
            if z is None:
                data[mask] = 1
            else:
                data[z][mask] = 1
        layer.refresh()

    # ------------------------------------------------------------------ commit / clear
    def _target(self) -> Any:
        name = self.target_combo.currentText()
        if name and name != NEW_TARGET and name in self.viewer.layers:
            return self.viewer.layers[name]
        layer = pl.add_labels_layer(self.viewer, self._image, pl.OBJECTS_NAME, opacity=0.7)
        self._refresh_combos()
        self.target_combo.setCurrentText(layer.name)
        return layer

    def commit(self) -> int:
        """Write the preview into the target layer (one undo step) and clear the prompts.

        Returns:
            The label id written (0 when there was nothing to commit).

        """
        masks = {z: m for z, m in self.masks.items() if m.any()}
        if self._image is None or not masks:
            self.status.setText("Nothing to commit: prompt an object first.")
            return 0
        target = self._target()
        value = int(self.class_spin.value()) or int(np.max(target.data)) + 1
        n = pl.write_object(target, masks, value, bool(target.preserve_labels))
        self.status.setText(f"Committed {n} pixels as label {value} to {target.name!r} (Ctrl+Z undoes it).")
        self.clear()
        return value

    def clear(self) -> None:
        """Drop every prompt and the preview."""
        self._generation += 1
        self._suppress = True
        try:
            if self.points_layer is not None:
                self.points_layer.data = np.empty((0, self.points_layer.ndim))
            if self.shapes_layer is not None:
                self.shapes_layer.data = []
        finally:
            self._suppress = False
        self.masks.clear()
        self._propagated.clear()
        self._refresh_preview()

    # ------------------------------------------------------------------ long work
    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        """Stop following the viewer and save the embedding cache when the widget closes."""
        self.close_session()
        for emitter, slot in (
            (self.viewer.layers.events.inserted, self._on_layers_changed),
            (self.viewer.layers.events.removed, self._on_layers_changed),
            (self.viewer.dims.events.current_step, self._on_slice_changed),
        ):
            emitter.disconnect(slot)
        super().closeEvent(event)

    def report(self) -> str:
        """One line for notifications and logs."""
        s = self.session
        return "no session" if s is None else f"{s.num_slices} slice(s), {s.encode_calls} encoded"


__all__ = ["KEY_BINDINGS", "PromptWidget"]
