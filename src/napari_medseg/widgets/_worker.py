"""Run an engine progress generator off the main thread, with Cancel and one-line errors.

The engine's long work (segmentation, self-supervised optimisation, training) is a plain
generator whose every yield is a cancel point. :class:`EngineJob` runs it in a napari
``GeneratorWorker``; its callbacks (progress, result, error, end) are called on the main
thread, which is the only place layers may be written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

import torch
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info

log = logging.getLogger(__name__)


class _Cancelled:
    """Marker returned when the user cancelled."""


class _Failed:
    """Marker carrying an exception raised by the job.

    superqt's GeneratorWorker *returns* RuntimeErrors instead of emitting ``errored``, and
    torch raises RuntimeError for most failures, so errors are caught here and passed on as
    a value to handle them all in one place.
    """

    def __init__(self, error: BaseException) -> None:
        self.error = error


CANCELLED = _Cancelled()


def error_message(error: BaseException) -> str:
    """One clear line for a user: the message, prefixed by the error kind only when unclear."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    if not text:
        return type(error).__name__
    if isinstance(error, MemoryError):
        return f"out of memory: {text}; try a smaller batch size or image"
    return text


class EngineJob:
    """One engine generator running in a worker thread.

    Args:
        job: Called in the worker thread; returns the generator to run (build models inside
            it so loading weights does not block the UI). Its return value is the result.
        on_progress: Main thread; called with each yielded record.
        on_result: Main thread; called with the generator's return value on success.
        on_error: Main thread; called with (one-line message, exception). A napari error
            notification is shown as well.
        on_end: Main thread; called last, with ``"done"``, ``"cancelled"`` or ``"failed"``.
        title: Prefix of the error notification (e.g. ``"Segment"``).

    """

    def __init__(
        self,
        job: Callable[[], Generator[Any, None, Any]],
        on_progress: Callable[[Any], None] | None = None,
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        on_end: Callable[[str], None] | None = None,
        title: str = "napari-medseg",
    ) -> None:
        self._job = job
        self._on_progress = on_progress
        self._on_result = on_result
        self._on_error = on_error
        self._on_end = on_end
        self._title = title
        self._gen: Generator[Any, None, Any] | None = None
        self._outcome: str | None = None
        # Set in _finished: the outcome is known earlier (on return), but the job is not over
        # until its end handler has run and registered its results.
        self._ended = False
        self.cancel_requested = False
        self.worker: GeneratorWorker = create_worker(self._run, _start_thread=False, _ignore_errors=True)
        self.worker.yielded.connect(self._yielded)
        self.worker.returned.connect(self._returned)
        self.worker.errored.connect(self._errored)
        self.worker.finished.connect(self._finished)

    def _run(self) -> Generator[Any, None, Any]:
        # Grad mode is per thread and pool threads are reused: a generator abandoned inside
        # ``torch.no_grad()`` elsewhere would leave it off here and break training.
        torch.set_grad_enabled(True)
        try:
            gen = self._gen = self._job()
            while True:
                if self.cancel_requested:
                    # Closed here, in the worker thread, so the engine's clean-up (restoring the
                    # best weights, leaving no_grad/inference_mode blocks) runs where it began.
                    gen.close()
                    return CANCELLED
                try:
                    record = next(gen)
                except StopIteration as stop:
                    return stop.value
                yield record
        except Exception as err:  # every failure becomes one message on the main thread
            log.debug("engine job failed", exc_info=True)
            return _Failed(err)

    # ----------------------------------------------------------------- control
    def start(self) -> EngineJob:
        """Start the worker thread; returns self."""
        self.worker.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next yield (the current slice or step finishes first).

        Not ``worker.quit()``: that would leave the generator suspended, and closing it later
        from the main thread runs its clean-up in the wrong thread (torch's grad mode is per
        thread). The flag is read in the worker right after the next yield instead.
        """
        self.cancel_requested = True

    @property
    def running(self) -> bool:
        """True until the job has finished and its end callback runs."""
        return not self._ended

    # ----------------------------------------------------------------- main-thread handlers
    def _yielded(self, record: Any) -> None:
        if self._on_progress is not None and not self.cancel_requested:
            self._on_progress(record)

    def _returned(self, value: Any) -> None:
        if isinstance(value, _Failed):
            self._fail(value.error)
        elif isinstance(value, BaseException):  # a RuntimeError raised outside the generator
            self._fail(value)
        elif value is CANCELLED or self.cancel_requested:
            self._outcome = "cancelled"
        else:
            self._outcome = "done"
            if self._on_result is not None:
                try:
                    self._on_result(value)
                except Exception as err:  # a failure while writing layers is reported too
                    self._fail(err)

    def _errored(self, err: BaseException) -> None:
        self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self._outcome = "failed"
        message = error_message(err)
        log.info("%s failed: %s", self._title, message, exc_info=err)
        show_error(f"{self._title}: {message}")
        if self._on_error is not None:
            self._on_error(message, err)

    def _finished(self) -> None:
        if self._outcome is None:
            self._outcome = "cancelled" if self.cancel_requested else "done"
        if self._outcome == "cancelled":
            show_info(f"{self._title}: cancelled")
        # Ended before the handler runs (it re-enables buttons by asking ``running``); both
        # happen in this one main-thread call, so nobody sees an ended job without its results.
        self._ended = True
        if self._on_end is not None:
            self._on_end(self._outcome)
