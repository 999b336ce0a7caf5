"""Background jobs for the dock widgets: a runner for generator jobs, readable errors, and the
guard that cancels a widget's jobs when it goes away.

Training and prediction run as generators in napari's thread pool. Cancelling asks the worker
to stop at its next ``yield`` and then *closes the generator in the worker thread*, so the core's
``finally`` (which saves a checkpoint) runs there, off the GUI thread, before ``stopped`` fires.

While a job runs, superqt's worker catches *every* warning of the process (any thread, any
library, each occurrence). Only this package's own warnings (:func:`is_our_warning`) become a
notification, each message once per job; the others go to the log.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import QWidget
from superqt.utils import GeneratorWorker

from ..core.errors import GenSelfDiffError, GenSelfDiffWarning
from ..core.progress import stoppable

log = logging.getLogger(__name__)

#: The installed package's folder: a warning raised from a file in it is ours.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def is_our_warning(category: Any, filename: Any) -> bool:
    """Whether a warning (its category and the file it is attributed to) comes from this
    package: a :class:`GenSelfDiffWarning`, or raised from a file under :data:`PACKAGE_DIR`."""
    if isinstance(category, type) and issubclass(category, GenSelfDiffWarning):
        return True
    try:
        return Path(str(filename)).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False


class ClosingGeneratorWorker(GeneratorWorker):
    """A generator worker that closes its generator in the worker thread when it stops.

    superqt's worker only stops *iterating* on ``quit()``; the generator would be closed later by
    the garbage collector, in whatever thread that happens. Closing it here runs the job's
    ``finally`` blocks (the core's checkpoint save) in the worker thread and before ``finished``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_event = threading.Event()  # set by Cancel: a training stops inside its step

    def work(self):
        try:
            with stoppable(self.stop_event):
                return super().work()
        finally:
            self._gen.close()


def readable_error(exc: BaseException) -> str:
    """A one-line message for a notification: our own errors as they are, others with their type."""
    if isinstance(exc, GenSelfDiffError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class JobRunner(QObject):
    """Runs one generator job at a time in napari's thread pool.

    Signals (all delivered in the GUI thread): ``event`` for each yielded value, ``result`` with the
    generator's return value (only when it ran to the end), ``failed`` with the exception (after it
    was shown as a napari notification), and ``stopped`` last, in every case, with True when the
    job was cancelled.
    """

    event = Signal(object)
    result = Signal(object)
    failed = Signal(object)
    stopped = Signal(bool)

    def __init__(self, what: str, parent: QObject | None = None):
        super().__init__(parent)
        self.what = what
        self.worker: ClosingGeneratorWorker | None = None
        self._cancelled = False
        self._warned: set[tuple[Any, str]] = set()  # our warnings shown during this job

    @property
    def running(self) -> bool:
        return self.worker is not None

    @property
    def cancelling(self) -> bool:
        """Cancel was asked and the job has not stopped yet: events still in flight are no news to
        show (the panels keep saying "cancelling…")."""
        return self._cancelled and self.worker is not None

    def start(self, job: Callable[..., Any], *args, **kwargs) -> ClosingGeneratorWorker:
        """Start ``job(*args, **kwargs)`` (a generator function) in a worker thread."""
        if self.worker is not None:
            raise GenSelfDiffError(f"{self.what} is already running")
        self._cancelled, self._warned = False, set()
        worker = create_worker(job, *args, _worker_class=ClosingGeneratorWorker, _ignore_errors=True,
                               _start_thread=False, **kwargs)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.warned.connect(self._on_warned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the job to stop at its next step; ``stopped(True)`` follows once it has."""
        if self.worker is not None:
            self._cancelled = True
            self.worker.stop_event.set()  # a training step in progress stops between layers
            self.worker.quit()

    def _on_yielded(self, value: Any) -> None:
        self.event.emit(value)

    def _on_returned(self, value: Any) -> None:
        if not self._cancelled:
            self.result.emit(value)

    def _on_errored(self, exc: BaseException) -> None:
        if not isinstance(exc, GenSelfDiffError):
            log.error("%s failed", self.what, exc_info=(type(exc), exc, exc.__traceback__))
        show_error(f"{self.what} failed: {readable_error(exc)}")
        self.failed.emit(exc)

    def _on_warned(self, args: tuple) -> None:
        """``args`` are ``warnings.showwarning``'s: (message, category, filename, lineno, ...)."""
        message, category, filename, lineno = (tuple(args) + (None,) * 4)[:4]
        if not is_our_warning(category, filename):
            log.warning("during %s: %s:%s: %s: %s", self.what, filename, lineno,
                        getattr(category, "__name__", category), message)
            return
        key = (category, str(message))
        if key not in self._warned:
            self._warned.add(key)
            show_warning(f"{self.what}: {message}")

    def _on_finished(self) -> None:
        self.worker = None
        self.stopped.emit(self._cancelled)


def _tagged(job: Callable[..., Any], token: object, *args: Any) -> Any:
    """``job(*args)``'s events, then (``token``, its return value)."""
    value = yield from job(*args)
    return token, value


class LatestJob:
    """A background job where only the newest request counts (the table of the last result, the
    objects at the controls' last values): a request made while one runs waits, a newer one
    replacing it, and a result that is not the newest request's is dropped. ``job(*args)`` is a
    generator function; ``deliver(value)`` receives what the newest request's job returned, in the
    GUI thread. ``runner`` is the :class:`JobRunner` it runs on."""

    def __init__(self, what: str, parent: QObject, job: Callable[..., Any], deliver: Callable[[Any], None]):
        self.runner = JobRunner(what, parent)
        self._job, self._deliver = job, deliver
        self._latest: object | None = None  # the token of the newest request
        self._waiting: tuple | None = None  # (token, *args) of a request made while another ran
        self.runner.result.connect(self._on_result)
        self.runner.stopped.connect(lambda _cancelled: self._start())

    def ask(self, *args: Any) -> None:
        """Run ``job(*args)`` now, or once the running one ends; supersedes every earlier request."""
        token = object()
        self._latest, self._waiting = token, (token, *args)
        self._start()

    def _start(self) -> None:
        if self._waiting is not None and not self.runner.running:
            args, self._waiting = self._waiting, None
            self.runner.start(_tagged, self._job, *args)

    def _on_result(self, result: tuple) -> None:
        token, value = result
        if token is self._latest:
            self._deliver(value)


class StopsJobsOnClose(QObject):
    """Cancels ``runners`` when ``widget`` goes away: the widget closes, its dock is removed, or
    the viewer closes. A running job still saves its checkpoint (in the worker thread).

    An event filter the widget owns (``StopsJobsOnClose(self, [self.runner])``), so the widget
    needs no base class and no attributes for it. napari's ``create_worker`` also lists each
    worker in the window's tasks, so closing the window asks the user to confirm first and then
    quits the worker. The hide check is the safety net that needs no napari internals: when the
    widget hides because its top-level window is no longer visible (the viewer closed), its jobs
    are cancelled. Removing the dock (its close button) takes the widget out of it (a
    ParentChange to no parent), which cancels too. A dock merely tabbed behind another, or
    toggled off from the Window menu, keeps its job running.
    """

    def __init__(self, widget: QWidget, runners: Iterable[JobRunner]):
        super().__init__(widget)
        self.widget = widget
        self.runners = tuple(runners)
        widget.installEventFilter(self)

    def cancel_jobs(self) -> None:
        for runner in self.runners:
            runner.cancel()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if watched is self.widget:
            kind = event.type()
            if kind == QEvent.Type.Close:
                self.cancel_jobs()
            elif kind == QEvent.Type.Hide and not self.widget.window().isVisible():
                self.cancel_jobs()
            elif kind == QEvent.Type.ParentChange and self.widget.parent() is None:
                self.cancel_jobs()
        return False  # the widget handles the event as usual
