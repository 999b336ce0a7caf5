"""The one progress event, and the helpers that drive the generators yielding it.

Every long job of the package (pretraining, fine-tuning, refining a project, suggesting regions,
whole-slide prediction) is a generator of :class:`Progress` events, so the CLI's progress bar,
the widgets' progress panel and the tests all read the same fields: ``stage``, ``step`` (units of
work done) of ``total``, ``message``, and ``done`` on the last event. Training adds ``loss``,
``lr``, ``images_per_s``, ``metrics`` and ``checkpoint``; slide prediction adds the tile and
block counters, ``megapixels_per_s`` and ``out_path`` (its stages are 'predict', 'postprocess'
and 'done'; ``phase`` is another name for ``stage``).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, TypeVar

from .errors import GenSelfDiffError

T = TypeVar("T")
U = TypeVar("U")
R = TypeVar("R")

_stopping = threading.local()


class StopRequested(Exception):
    """A job's stop was asked for in the middle of a step (see :func:`stoppable`)."""


@contextlib.contextmanager
def stoppable(event: threading.Event) -> Iterator[None]:
    """Inside, the work this thread starts can be stopped in the middle of a step by setting
    ``event``: a training built here (:func:`stop_event` at its start) checks it between the
    layers of every forward and backward pass, so Cancel need not wait for a whole step."""
    before = getattr(_stopping, "event", None)
    _stopping.event = event
    try:
        yield
    finally:
        _stopping.event = before


def stop_event() -> threading.Event | None:
    """The event of the innermost :func:`stoppable` around this thread, or None."""
    return getattr(_stopping, "event", None)


@dataclass
class Progress:
    """One progress event. ``done`` marks the last one; ``step``/``total`` count the work (training
    steps, scored regions, tiles during 'predict', block passes during 'postprocess').

    ``eta_s`` is the predicted seconds left (NaN, or None for slide prediction, when unknown).
    ``checkpoint`` is set when a checkpoint was written; ``metrics`` when validation ran.
    ``tiles_computed`` / ``tiles_skipped`` count a slide prediction's predictor tiles and
    tissue-free tiles; ``megapixels_per_s`` is level pixels whose tiles were predicted (or found
    tissue-free) in this run per second of this run; ``out_path`` the prediction store.
    ``activity`` says what a long step is doing right now ("validating 3/8"): unlike ``message``
    it is a passing status, shown in the widgets' status line and on the CLI's bar, not logged.
    """

    stage: str
    step: int
    total: int
    loss: float = float("nan")
    lr: float = 0.0
    images_per_s: float = 0.0
    eta_s: float | None = float("nan")
    metrics: dict | None = None
    checkpoint: str | None = None
    message: str = ""
    done: bool = False
    blocks_done: int = 0
    blocks_total: int = 0
    tiles_computed: int = 0
    tiles_skipped: int = 0
    megapixels_per_s: float = 0.0
    out_path: str = ""
    activity: str = ""

    @property
    def phase(self) -> str:
        """The stage (the name slide prediction has always used for it)."""
        return self.stage


def drain(events: Iterable[T], on_event: Callable[[T], Any] | None = None) -> T:
    """Run a generator of events to the end (calling ``on_event`` on each); returns the last one."""
    last = sentinel = object()
    for last in events:
        if on_event:
            on_event(last)
    if last is sentinel:
        raise GenSelfDiffError("the job produced no events")
    return last  # type: ignore[return-value]


def run_to_end(gen: Generator[Any, Any, R], on_event: Callable[[Any], Any] | None = None) -> R:
    """Run a generator to the end, ignoring (or passing to ``on_event``) what it yields; returns
    its *return* value (the blocking form of ``result = yield from gen``)."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_event:
            on_event(event)


def relay(gen: Generator[T, Any, R], transform: Callable[[T], U] | None = None) -> Generator[U, None, R]:
    """Yield what ``gen`` yields (through ``transform`` when given) and return its return value:
    ``result = yield from relay(gen, fmt)``. Closing the relay (a cancel) closes ``gen``."""
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            yield transform(event) if transform is not None else event  # type: ignore[misc]
    finally:
        gen.close()



def relay_last(events: Iterator[T]) -> Generator[T, None, T | None]:
    """Yield every event of ``events`` and return the last one (None when there was none):
    ``last = yield from relay_last(job)``. Closing the relay (a cancel) closes ``events``."""
    last = None
    try:
        for last in events:
            yield last
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    return last


def in_background(fn: Callable[..., R], *args: Any, status: Any = None,
                  every_s: float = 0.2) -> Generator[Any, None, R]:
    """Run ``fn(*args)`` in a helper thread, yielding ``status`` every ``every_s`` seconds until it
    finishes; returns its result or raises its exception (``result = yield from in_background(...)``).
    A job stays cancellable during one long call: closing the generator stops waiting at once,
    the call finishes on its own and its result is dropped. Only for calls that change nothing
    shared (a pure function of its arguments, such as post-processing one image)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the generator's caller below
            box["error"] = e

    thread = threading.Thread(target=work, name=f"genselfdiff-{getattr(fn, '__name__', 'job')}", daemon=True)
    thread.start()
    while True:
        thread.join(every_s)
        if not thread.is_alive():
            break
        yield status
    if "error" in box:
        raise box["error"]
    return box["result"]
