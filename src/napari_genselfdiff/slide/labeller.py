"""Instance labelling alongside prediction: a second process labels a slide's blocks while the
first one is still predicting the rest (issue 32, item 5).

:func:`~.tiler.predict_slide` used to label instances after the last block was predicted, one
core's work while the other core waited. Now, on slides of :data:`MIN_PIXELS` and more, it starts
``python -m napari_genselfdiff.slide.labeller`` beside itself: the child runs the same
:func:`~.instances.label_store` on the same store, reading the probabilities through a view that
waits until every block a read touches has been predicted (the parent names each block on the
child's stdin as it marks it done), so it labels a block row as soon as the row below it (its
halo) is there. While the child is busy, the parent's predictor gives one of its CPU threads up
(``predictor.share_cpu``, :class:`~napari_genselfdiff.core.inference.TorchPredictor`): on the
2-core machine a 768-px nuclei tile ran at 4.0 tiles/s on two threads and 2.1 on one, and beside a
labelling process at 1.4 on two threads (both fighting for the cores) but 2.3 on one, the
labelling keeping 97 % of its speed (benchmarks/RESULTS.md, session 22).

The result is the same labels, written by the same function: only when they are computed moves.
Anything that goes wrong with the child (it cannot start, it fails, it is killed) costs nothing but
time: the parent labels in-process afterwards, as before. A cancelled prediction kills the child;
its half-written labels are not marked complete, so the next run makes them again.

Child protocol: stdin gets one JSON line (the job), then lines ``"row col"`` (a block predicted) and
``"all"``; stdout carries JSON lines ``{"ready"}``, ``{"busy": bool}``, ``{"step", "total"}`` and at
the end ``{"stats"}``; anything else it prints (warnings) is kept for a failure message.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TextIO

import numpy as np

from napari_genselfdiff.core.errors import GenSelfDiffError

#: Slides (levels predicted) smaller than this label in-process: the child's start (about a second
#: of imports) would cost more than the overlap saves.
MIN_PIXELS = 4096 * 4096
ENV = "GENSELFDIFF_LABEL_ALONGSIDE"


def by_default(pixels: int) -> bool:
    """Whether a slide level of ``pixels`` pixels is labelled alongside its prediction when the
    caller does not say: from :data:`MIN_PIXELS` on; ``GENSELFDIFF_LABEL_ALONGSIDE=0`` never,
    ``=1`` always (to compare, or to rule the child out)."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise GenSelfDiffError(f"{ENV} must be 0 (label after predicting) or 1 (alongside), not {value!r}")
    return value == "1" or (value == "" and pixels >= MIN_PIXELS)


# --------------------------------------------------------------------------------------------
# the child


class _Gate:
    """Which blocks the parent has predicted, learnt from ``stream`` (the child's stdin) as
    needed: :meth:`wait` returns once every block under a region is there."""

    def __init__(self, grid: tuple[int, int], block: int, stream: TextIO, emit: Callable[[dict], None]) -> None:
        self.ready = np.zeros(grid, bool)
        self.block, self.stream, self.emit = block, stream, emit

    def _read(self) -> None:
        line = self.stream.readline()
        if not line:  # the parent is gone: nobody will read what we write
            raise SystemExit(3)
        if line.strip() == "all":
            self.ready[...] = True
        else:
            r, c = (int(v) for v in line.split())
            self.ready[r, c] = True

    def wait(self, y0: int, y1: int, x0: int, x1: int) -> None:
        b = self.block
        need = (slice(y0 // b, (max(y1, y0 + 1) - 1) // b + 1), slice(x0 // b, (max(x1, x0 + 1) - 1) // b + 1))
        if self.ready[need].all():
            return
        self.emit({"busy": False})
        while not self.ready[need].all():
            self._read()
        self.emit({"busy": True})


class _GatedProbabilities:
    """The store's (C, H, W) probabilities, each read waiting for the blocks it touches."""

    def __init__(self, arr: Any, gate: _Gate) -> None:
        self.arr, self.gate = arr, gate
        self.shape, self.dtype = tuple(arr.shape), arr.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        spatial = list(key[1:]) + [slice(None)] * (3 - len(key))
        (y0, y1, _), (x0, x1, _) = (s.indices(n) for s, n in zip(spatial[:2], self.shape[1:]))
        self.gate.wait(y0, y1, x0, x1)
        return np.asarray(self.arr[key])


def _emit_to(out: TextIO) -> Callable[[dict], None]:
    def emit(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()
    return emit


def main(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The child: label the store the first stdin line names, block by block as they come."""
    from napari_genselfdiff.core.allocator import KEEP_MB, tune_allocator
    from napari_genselfdiff.core.progress import run_to_end
    from napari_genselfdiff.slide.instances import label_store
    from napari_genselfdiff.slide.store import PredictionStore

    job = json.loads(stdin.readline())
    emit = _emit_to(stdout)
    tune_allocator(KEEP_MB["predict"])  # the parent's allocator, so large_arrays_mapped works the same
    store = PredictionStore.open(job["store"], mode="r+")
    block = int(store.meta["settings"]["block"])  # the blocks the parent predicts and releases
    gate = _Gate(tuple(store.done.shape), block, stdin, emit)
    emit({"ready": True, "busy": True})
    gen = label_store(store, job["kind"], min_size=job.get("min_size"),
                      options=job.get("options") or {}, probabilities=_GatedProbabilities(store.probabilities, gate))
    stats = run_to_end(gen, lambda step: emit({"step": step[0], "total": step[1]}))
    emit({"busy": False, "stats": None if stats is None else
          {"count": stats.count, "truncated": stats.truncated, "conflicts": stats.conflicts}})
    return 0


# --------------------------------------------------------------------------------------------
# the parent


class ChildFailed(Exception):
    """The labelling child stopped without finishing (the parent labels in-process instead)."""


class LabellingAlongside:
    """The parent's handle on a labelling child (see the module docstring). ``release`` each
    block as it is stored, ``pace`` the predictor after each call, ``finish`` (a generator of
    (step, total), returning the stats or raising :class:`ChildFailed`) once all is predicted, and
    always ``close``."""

    def __init__(self, store_path: str | Path, kind: str, *, min_size: int | None, options: Mapping[str, Any], done: np.ndarray,
                 command: list[str] | None = None) -> None:
        self.busy, self.failed, self._shared, self._predictor = False, False, 0, None
        self._messages: queue.Queue = queue.Queue()
        self._log: list[str] = []
        # the child imports this very package, wherever it was imported from here
        here = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(command or [sys.executable, "-m", "napari_genselfdiff.slide.labeller"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env=env)
        self._reader = threading.Thread(target=self._read, name="labelling-alongside", daemon=True)
        self._reader.start()
        self._send(json.dumps({"store": str(store_path), "kind": kind, "min_size": min_size,
                               "options": dict(options)}))
        for r, c in zip(*np.nonzero(done)):
            self.release((int(r), int(c)))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                self._log = (self._log + [line.rstrip()])[-5:]
                continue
            if "busy" in message:
                self.busy = bool(message["busy"])
            self._messages.put(message)
        self.busy = False
        self._messages.put(None)  # the child's output ended

    def _send(self, line: str) -> None:
        if self.failed or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):  # the child is gone: finish() says so
            self.failed = True

    def release(self, block: tuple[int, int]) -> None:
        """Block ``block`` of the store is predicted and stored."""
        self._send(f"{block[0]} {block[1]}")

    def pace(self, predictor: Any) -> None:
        """Give the predictor's CPU threads to the child while it labels, back when it waits."""
        share = getattr(predictor, "share_cpu", None)
        want = 1 if self.busy else 0
        if share is not None and want != self._shared:
            share(want)
            self._shared = want
        self._predictor = predictor

    def finish(self) -> Iterator[tuple[int, int]]:
        """After the last block: (step, total) as the child reports them; returns its stats dict
        (None when the labels were already complete). Raises :class:`ChildFailed`."""
        self._send("all")
        self._unpace()
        step, total = 0, 1
        while True:
            try:
                message = self._messages.get(timeout=0.5)
            except queue.Empty:  # the child is on a block: an event anyway, so a Cancel is heard
                yield step, total
                continue
            if message is None:
                code = self.proc.wait()
                raise ChildFailed(f"the labelling process stopped (exit code {code})"
                                  + (": " + " / ".join(self._log) if self._log else ""))
            if "stats" in message:
                self.proc.wait()
                return message["stats"]
            if "step" in message:
                step, total = int(message["step"]), int(message["total"])
                yield step, total

    def _unpace(self) -> None:
        if self._predictor is not None and self._shared:
            self._predictor.share_cpu(0)
            self._shared = 0

    def close(self) -> None:
        """Stop the child if it still runs (a cancel, an error) and give the threads back."""
        self._unpace()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)  # the child's output has ended
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # a write still buffered for a child that is gone
                    pass



def start_alongside(store: Any, kind: str, *, min_size: int | None, options: Mapping[str, Any],
                    wanted: bool | None = None) -> LabellingAlongside | None:
    """A labelling child for ``store`` (a :class:`~.store.PredictionStore` being predicted), or
    None where the labels are made afterwards: not ``wanted`` (None: :func:`by_default` for the
    store's size), already complete, or no Python to start (a frozen app)."""
    if wanted is None:
        wanted = by_default(int(np.prod(store.probabilities.shape[1:])))
    if not wanted or store.labels_complete(kind):
        return None
    try:
        return LabellingAlongside(store.path, kind, min_size=min_size,
                                  options=options, done=np.asarray(store.done[...]).astype(bool))
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
