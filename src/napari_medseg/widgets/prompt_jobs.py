"""Session and long work of the Prompt widget: open/save sessions, precompute, propagate.

A mixin of :class:`napari_medseg.widgets.prompt.PromptWidget`; every generator step takes the
widget's session lock, so a click between two steps can still decode (see prompt.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error

from napari_medseg.engine.image import prepare_image
from napari_medseg.engine.prompt import PromptSession, image_hash
from napari_medseg.widgets._layers import image_array
from napari_medseg.widgets._worker import EngineJob

_DISK_FLUSH_S = 10.0  # volumes: rewrite the disk cache at most this often while clicking


class PromptJobsMixin:
    """Sessions, precompute, propagate, cancel and worker bookkeeping (state on the widget)."""

    # attributes provided by PromptWidget
    _image: Any
    _lock: Any
    _long_worker: Any
    _workers: set[Any]
    _generation: int
    _propagated: set[int]
    masks: dict[int | None, np.ndarray]
    session: Any
    status: Any
    progress: Any
    cancel_btn: Any
    min_score: Any
    min_area: Any
    autocommit_check: Any
    _session_key: tuple[Any, ...] | None
    _last_flush: float
    model: Any
    model_factory: Callable[[], Any]
    preset_combo: Any
    cache_dir: Any
    cache_mb: Any
    _settings_key: Callable[[], tuple[Any, ...]]
    _refresh_preview: Callable[[], None]
    current_slice: Callable[[], int | None]
    commit: Callable[[], int]

    def precompute(self) -> None:
        """Encode every slice in the background (progress, Cancel), then save the disk cache."""
        if self._image is None or self._long_worker is not None:
            return
        args = self._session_args()

        def work() -> Generator[Any, None, int]:
            with self._lock:
                session = self._open_session(args)
            gen = session.iter_precompute()  # saves the disk cache when it completes
            while True:
                with self._lock:
                    try:
                        p = next(gen)
                    except StopIteration as stop:
                        return int(stop.value)
                yield p

        self._start_long(work, lambda n: self.status.setText(f"Precomputed {n} slice embedding(s)."))

    def propagate(self) -> None:
        """Follow the previewed object up and down the volume (progress, Cancel)."""
        z = self.current_slice()
        if z is None or self.masks.get(z) is None or not self.masks[z].any() or self.session is None:
            self.status.setText("Propagation needs a 3D image and a preview on the current slice.")
            return
        if self._long_worker is not None:
            return
        session, start = self.session, self.masks[z].copy()
        min_score, min_area = self.min_score.value(), self.min_area.value()
        gen_id = self._generation

        def work() -> Generator[Any, None, dict[int, np.ndarray]]:
            gen = session.iter_propagate(start, z, min_score=min_score, min_area_ratio=min_area)
            while True:
                with self._lock:
                    try:
                        p = next(gen)
                    except StopIteration as stop:
                        return stop.value
                yield p

        def done(out: dict[int, np.ndarray]) -> None:
            if gen_id != self._generation:
                return
            self.masks.update(out)
            self._propagated.update(out)
            self._refresh_preview()
            reached = sorted([z, *out])
            self.status.setText(f"Propagated to slices {reached[0] + 1}–{reached[-1] + 1}.")
            if self.autocommit_check.isChecked():
                self.commit()

        self._start_long(work, done)

    def _start_long(
        self, func: Callable[[], Generator[Any, None, Any]], on_done: Callable[[Any], None]
    ) -> None:
        def ended(outcome: str) -> None:
            if outcome == "cancelled":
                self._on_aborted()
            elif outcome == "failed":
                self.status.setText("Failed (see the notification).")

        job = EngineJob(func, on_progress=self._on_progress, on_result=on_done, on_end=ended, title="Prompt")
        self._long_worker = job
        self.cancel_btn.setEnabled(True)
        self._set_busy("Working…")
        self._run(job.worker, job)

    def _on_aborted(self) -> None:
        self.status.setText("Cancelled.")
        session = self.session
        if session is not None and session.cache_file is not None:
            # keep what was encoded before Cancel; writing may take a moment, so not here
            def save() -> None:
                with self._lock:
                    session.flush()

            self._run(create_worker(save))

    def _on_progress(self, p: Any) -> None:
        self.progress.setRange(0, max(1, p.total))
        self.progress.setValue(p.done)
        self.status.setText(p.message)

    def cancel(self) -> None:
        """Stop the running precompute or propagation at its next slice."""
        if self._long_worker is not None:
            self._long_worker.cancel()

    def _set_busy(self, text: str) -> None:
        self.progress.setRange(0, 0)  # indeterminate until the first progress record
        self.status.setText(text)

    def _run(self, worker: Any, job: Any = None) -> None:
        self._workers.add(worker)

        def finished() -> None:
            self._workers.discard(worker)
            if job is not None and job is self._long_worker:
                self._long_worker = None
                self.cancel_btn.setEnabled(False)
            if not self._workers:
                self.progress.setRange(0, 1)
                self.progress.setValue(1)

        worker.finished.connect(finished)
        worker.start()

    @property
    def busy(self) -> bool:
        """Whether any worker (encode, precompute, propagation) is still running."""
        return bool(self._workers)

    # ------------------------------------------------------------------ session
    def _reset_session(self, wait: bool = False) -> None:
        """Drop the session, saving its embeddings to the disk cache (if any).

        The save runs in a worker unless ``wait``: it waits for a running encode and may
        write hundreds of MB. A new session never reads the old file (its key differs).
        """
        session, self.session, self._session_key = self.session, None, None
        if session is not None and session.cache_file is not None:

            def save() -> str:
                with self._lock:
                    try:
                        session.flush()
                    except OSError as err:
                        return f"could not write the embedding cache: {err}"
                return ""

            if wait:
                message = save()
                if message:
                    show_error(message)
            else:
                worker = create_worker(save)
                worker.returned.connect(lambda m: show_error(m) if m else None)
                self._run(worker)
        if session is not None:
            self.masks.clear()
            self._refresh_preview()

    def _on_cache_mb(self, value: float) -> None:
        if self.session is not None:
            self.session.cache_mb = float(value)

    def _session_args(self) -> dict[str, Any]:
        """Everything the worker needs to open a session, read on the main thread."""
        raw, channel_axis = image_array(self._image)
        return {
            "raw": raw,
            "channel_axis": channel_axis,
            "preset": self.preset_combo.currentText(),
            "cache_dir": self.cache_dir.text().strip() or None,
            "cache_mb": float(self.cache_mb.value()),
            "key": self._settings_key(),
        }

    def _open_session(self, args: dict[str, Any]) -> PromptSession:
        """Load the model and open a session (worker thread; call with the lock held)."""
        if self.session is not None and self._session_key == args["key"]:
            return self.session
        if self.model is None:
            self.model = self.model_factory()
        if args["preset"] == "auto" and hasattr(self.model, "prepare"):
            prepared = self.model.prepare(args["raw"], args["channel_axis"])  # model's own preset
        else:
            prepared = prepare_image(args["raw"], args["channel_axis"], args["preset"])
        session = PromptSession(
            self.model,
            prepared,
            image_hash(args["raw"]),
            cache_mb=args["cache_mb"],
            cache_dir=args["cache_dir"],
        )
        self.session, self._session_key = session, args["key"]
        return session

    def _maybe_flush(self, session: PromptSession) -> None:
        if session.cache_file is None:
            return
        now = time.monotonic()
        if session.num_slices == 1 or now - self._last_flush > _DISK_FLUSH_S:
            session.flush()
            self._last_flush = now

    def close_session(self) -> None:
        """Cancel running work and save the embedding cache (call before closing the widget)."""
        self.cancel()
        self._reset_session(wait=True)
