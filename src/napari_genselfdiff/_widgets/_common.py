"""Pieces the dock widgets share: a background job runner, a progress panel with a live loss
plot, remembered settings, a device chooser, path fields and layer choosers.

Training and prediction run as generators in napari's thread pool. Cancelling asks the worker
to stop at its next ``yield`` and then *closes the generator in the worker thread*, so the core's
``finally`` (which saves a checkpoint) runs there, off the GUI thread, before ``stopped`` fires.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent, QObject, QPointF, QRectF, QStandardPaths, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit,
                            QListWidget, QProgressBar, QPushButton, QSizePolicy, QSpinBox, QVBoxLayout, QWidget)
from superqt.utils import GeneratorWorker

from ..core.device import CHOICES, available_devices, pick_device
from ..core.errors import DataError, GenSelfDiffError

log = logging.getLogger(__name__)

CONFIG_ENV = "GENSELFDIFF_CONFIG_DIR"
SETTINGS_FILE = "widgets.json"


# ---------------------------------------------------------------------------------------------
# background jobs

class ClosingGeneratorWorker(GeneratorWorker):
    """A generator worker that closes its generator in the worker thread when it stops.

    superqt's worker only stops *iterating* on ``quit()``; the generator would be closed later by
    the garbage collector, in whatever thread that happens. Closing it here runs the job's
    ``finally`` blocks (the core's checkpoint save) in the worker thread and before ``finished``.
    """

    def work(self):
        try:
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

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Callable[..., Any], *args, **kwargs) -> ClosingGeneratorWorker:
        """Start ``job(*args, **kwargs)`` (a generator function) in a worker thread."""
        if self.worker is not None:
            raise GenSelfDiffError(f"{self.what} is already running")
        self._cancelled = False
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
        show_warning(f"{self.what}: {args[0]}")

    def _on_finished(self) -> None:
        self.worker = None
        self.stopped.emit(self._cancelled)


# ---------------------------------------------------------------------------------------------
# progress display

def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; unknown -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LossPlot(QWidget):
    """A tiny live line plot of the training loss (QPainter only, no plotting library)."""

    MAX_POINTS = 2000

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("training loss per step")

    def clear(self) -> None:
        self.values = []
        self.update()

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(float(value))
            if len(self.values) > self.MAX_POINTS:  # keep every other point: the shape survives
                self.values = self.values[::2]
            self.update()

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        r = QRectF(self.rect()).adjusted(1, 1, -1, -1)
        p.setPen(QPen(QColor(128, 128, 128, 160), 1))
        p.drawRect(r)
        text_color = self.palette().text().color()
        if len(self.values) < 2:
            p.setPen(text_color)
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, "loss will appear here")
            return
        lo, hi = min(self.values), max(self.values)
        span = (hi - lo) or 1.0
        plot = r.adjusted(4, 14, -4, -4)
        n = len(self.values) - 1
        poly = QPolygonF([QPointF(plot.left() + plot.width() * i / n,
                                  plot.bottom() - plot.height() * (v - lo) / span)
                          for i, v in enumerate(self.values)])
        p.setPen(QPen(QColor(255, 140, 0), 1.5))
        p.drawPolyline(poly)
        p.setPen(text_color)
        p.drawText(r.adjusted(4, 0, -4, 0), Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft,
                   f"loss {self.values[-1]:.4f}")
        p.drawText(r.adjusted(4, 0, -4, 0), Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignRight,
                   f"min {lo:.4f}  max {hi:.4f}")


class ProgressPanel(QWidget):
    """Progress bar, one-line status (step, loss, speed, ETA, validation) and an optional loss plot."""

    def __init__(self, with_plot: bool = True, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setFormat("%v / %m")
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        self.plot = LossPlot() if with_plot else None
        if self.plot is not None:
            lay.addWidget(self.plot)

    def follow(self, runner: JobRunner) -> None:
        """Show ``runner``'s failure, and leave no busy bar behind when it stops."""
        runner.failed.connect(lambda exc: self.set_status(f"failed: {readable_error(exc)}"))
        runner.stopped.connect(self._on_stopped)

    def _on_stopped(self, cancelled: bool) -> None:
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1)

    def reset(self, text: str = "starting…") -> None:
        self.bar.setRange(0, 0)  # busy until the first event says how many steps
        self.status.setText(text)
        if self.plot is not None:
            self.plot.clear()

    def set_status(self, text: str) -> None:
        self.status.setText(text)

    def show_progress(self, ev: Any) -> None:
        """Show a core ``Progress``; a plain string is a phase without steps (busy bar)."""
        if isinstance(ev, str):
            self.bar.setRange(0, 0)
            self.status.setText(ev)
            return
        total = max(int(getattr(ev, "total", 0) or 0), 1)
        self.bar.setRange(0, total)
        self.bar.setValue(min(int(getattr(ev, "step", 0) or 0), total))
        parts = [f"{getattr(ev, 'stage', '')} step {ev.step}/{ev.total}".strip()]
        loss = getattr(ev, "loss", float("nan"))
        if loss is not None and math.isfinite(loss):
            parts.append(f"loss {loss:.4f}")
            if self.plot is not None:
                self.plot.add(loss)
        ips = getattr(ev, "images_per_s", 0.0)
        if ips:
            parts.append(f"{ips:.1f} img/s")
        eta = getattr(ev, "eta_s", float("nan"))
        if eta is not None and math.isfinite(eta):
            parts.append(f"ETA {format_duration(eta)}")
        for k, v in (getattr(ev, "metrics", None) or {}).items():
            if isinstance(v, float):
                parts.append(f"{k.replace('_', ' ')} {v:.3f}")
        text = " · ".join(parts)
        if getattr(ev, "message", ""):
            text = f"{ev.message}\n{text}" if not getattr(ev, "done", False) else ev.message
        self.status.setText(text)


# ---------------------------------------------------------------------------------------------
# settings remembered between sessions

def config_dir() -> Path:
    """Where the widgets keep their settings: ``$GENSELFDIFF_CONFIG_DIR`` or the user's config dir."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericConfigLocation)
    return Path(base or Path.home() / ".config") / "napari-genselfdiff"


class Settings:
    """One widget's section of a small JSON file; every change is written at once (atomically)."""

    def __init__(self, section: str, path: Path | None = None):
        self.section = section
        self.path = path or config_dir() / SETTINGS_FILE

    def _read_all(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # missing or damaged settings are not worth an error: defaults apply

    def get(self, key: str, default: Any = None) -> Any:
        return self._read_all().get(self.section, {}).get(key, default)

    def set(self, key: str, value: Any) -> None:
        from ..core.atomic import write_json_atomic
        data = self._read_all()
        data.setdefault(self.section, {})[key] = value
        try:
            write_json_atomic(self.path, data)
        except OSError as e:  # a read-only home must not break the widget
            log.warning("could not save settings to %s: %s", self.path, e)

    def bind(self, key: str, widget: QWidget) -> None:
        """Restore ``widget``'s value from the settings, then save it on every change."""
        value = self.get(key)
        if isinstance(widget, QSpinBox):
            if isinstance(value, int):
                widget.setValue(value)
            widget.valueChanged.connect(lambda v: self.set(key, int(v)))
        elif isinstance(widget, QDoubleSpinBox):
            if isinstance(value, (int, float)):
                widget.setValue(float(value))
            widget.valueChanged.connect(lambda v: self.set(key, float(v)))
        elif isinstance(widget, QCheckBox):
            if isinstance(value, bool):
                widget.setChecked(value)
            widget.toggled.connect(lambda v: self.set(key, bool(v)))
        elif isinstance(widget, QComboBox):
            if isinstance(value, str):
                i = widget.findText(value)
                enabled = i >= 0 and bool(widget.model().flags(widget.model().index(i, 0)) & Qt.ItemFlag.ItemIsEnabled)
                if enabled:  # e.g. a remembered "cuda" on a machine without a GPU stays "auto"
                    widget.setCurrentIndex(i)
                elif widget.isEditable():
                    widget.setEditText(value)
            widget.currentTextChanged.connect(lambda v: self.set(key, v))
        elif isinstance(widget, (QLineEdit, PathEdit)):
            edit = widget if isinstance(widget, QLineEdit) else widget.edit
            if isinstance(value, str):
                edit.setText(value)
            edit.textChanged.connect(lambda v: self.set(key, v))
        else:
            raise TypeError(f"cannot remember the value of a {type(widget).__name__}")


# ---------------------------------------------------------------------------------------------
# small input widgets

class DeviceChooser(QWidget):
    """auto / cuda / mps / cpu, with what this machine has and the sentence the core would log."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.found = available_devices()
        self.combo = QComboBox()
        for name in CHOICES:
            self.combo.addItem(name)
            if name != "auto" and name not in self.found:
                item = self.combo.model().item(self.combo.count() - 1)
                item.setEnabled(False)
                item.setToolTip(f"{name} is not available on this machine")
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.combo.currentTextChanged.connect(self._explain)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.combo)
        lay.addWidget(self.info)
        self._explain(self.combo.currentText())

    @property
    def device(self) -> str:
        return self.combo.currentText()

    def _explain(self, name: str) -> None:
        try:
            sentence = pick_device(name)[1]
        except GenSelfDiffError as e:
            sentence = str(e)
        self.info.setText(f"found: {', '.join(self.found)} — {sentence}")


class PathEdit(QWidget):
    """A line edit with a "…" button opening a file or folder dialog."""

    def __init__(self, mode: str = "dir", placeholder: str = "", file_filter: str = "",
                 parent: QWidget | None = None):
        super().__init__(parent)
        if mode not in ("dir", "file", "save"):
            raise ValueError(f"unknown path mode {mode!r}")
        self.mode, self.file_filter = mode, file_filter
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        self.button = QPushButton("…")
        self.button.setFixedWidth(30)
        self.button.setToolTip("browse")
        self.button.clicked.connect(self._browse)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit)
        lay.addWidget(self.button)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:
        self.edit.setText(text)

    def _browse(self) -> None:
        start = self.text() or str(Path.home())
        if self.mode == "dir":
            chosen = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        elif self.mode == "file":
            chosen = QFileDialog.getOpenFileName(self, "Choose a file", start, self.file_filter)[0]
        else:
            chosen = QFileDialog.getSaveFileName(self, "Choose where to save", start, self.file_filter)[0]
        if chosen:
            self.edit.setText(chosen)


def int_spin(lo: int, hi: int, value: int, step: int, tip: str) -> QSpinBox:
    s = QSpinBox()
    s.setRange(lo, hi)
    s.setValue(value)
    s.setSingleStep(step)
    s.setToolTip(tip)
    return s


def add_training_rows(widget, form, *, patch_tip: str, steps: int, steps_step: int, out_tip: str,
                      out_default: Path, resume: bool) -> None:
    """The rows both training widgets share: patch, steps, batch, device, output folder, resume.
    Sets ``widget.patch/steps/batch/device/out/resume``."""
    widget.patch = int_spin(32, 1024, 256, 32, patch_tip)
    form.addRow("Patch size", widget.patch)
    widget.steps = int_spin(1, 1_000_000, steps, steps_step, "optimisation steps")
    form.addRow("Steps", widget.steps)
    widget.batch = int_spin(1, 256, 8, 1, "tiles per step")
    form.addRow("Batch", widget.batch)
    widget.device = DeviceChooser()
    form.addRow("Device", widget.device)
    widget.out = PathEdit("dir", out_tip)
    widget.out.setText(str(out_default))
    form.addRow("Output folder", widget.out)
    widget.resume = QCheckBox("resume the run in this folder, if there is one")
    widget.resume.setChecked(resume)
    form.addRow("", widget.resume)


class TrainingControls:
    """What the Pretrain and Fine-tune widgets share below their options: Start/Cancel buttons
    wired to ``self.start`` and ``self.runner``, a progress panel following the runner (each event
    also goes to ``self._remember``), the output-folder check and the status line of a cancelled
    run (``self._last`` is the last Progress seen, ``self.out`` and ``self.resume`` come from
    :func:`add_training_rows`)."""

    def add_run_controls(self, layout: QVBoxLayout, start_text: str) -> None:
        row, self.start_btn, self.cancel_btn = start_cancel_row(start_text)
        self.start_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.runner.cancel)
        layout.addWidget(row)
        self.progress = ProgressPanel()
        layout.addWidget(self.progress)
        layout.addStretch(1)
        self.progress.follow(self.runner)
        self.runner.event.connect(self.progress.show_progress)
        self.runner.event.connect(self._remember)
        self.runner.stopped.connect(self._on_stopped)

    def checked_output_folder(self, what: str) -> str:
        """The output folder, or a DataError when it is unset, or holds a run and resume is off."""
        out = self.out.text()
        if not out:
            raise DataError(f"choose an output folder for the {what}")
        if Path(out).exists() and any(Path(out).iterdir()) and not self.resume.isChecked():
            raise DataError(f"{out}: already exists; tick 'resume' or choose another output folder")
        return out

    def _set_running(self, running: bool) -> None:
        self.start_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    def _on_stopped(self, cancelled: bool) -> None:
        self._set_running(False)
        if cancelled:
            last = self._last
            at = f" at step {last.step}/{last.total}" if last else ""
            self.progress.set_status(f"cancelled{at}; the checkpoint in {self.out.text()} keeps what was learned "
                                     "(tick 'resume' to continue it)")


def start_cancel_row(start_text: str = "Start") -> tuple[QWidget, QPushButton, QPushButton]:
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    start, cancel = QPushButton(start_text), QPushButton("Cancel")
    cancel.setEnabled(False)
    lay.addWidget(start)
    lay.addWidget(cancel)
    return row, start, cancel


# ---------------------------------------------------------------------------------------------
# layer choosers that follow the viewer's layer list

class LayerChoices:
    """Keeps a QComboBox or QListWidget filled with the names of the viewer's layers of one kind,
    following insertions, removals, moves and renames until the widget is destroyed."""

    def __init__(self, viewer, accept: Callable[[Any], bool], widget: QComboBox | QListWidget):
        self.viewer, self.accept, self.widget = viewer, accept, widget
        self._named: set[int] = set()
        self._events = (viewer.layers.events.inserted, viewer.layers.events.removed,
                        viewer.layers.events.moved)
        for ev in self._events:
            ev.connect(self.refresh)
        widget.destroyed.connect(lambda *_: self._disconnect())
        self.refresh()

    def _disconnect(self) -> None:
        for ev in self._events:
            ev.disconnect(self.refresh)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self.refresh)

    def layers(self) -> list:
        return [layer for layer in self.viewer.layers if self.accept(layer)]

    def by_name(self, name: str):
        return next((layer for layer in self.layers() if layer.name == name), None)

    def refresh(self, event=None) -> None:
        for layer in self.viewer.layers:
            if id(layer) not in self._named:
                layer.events.name.connect(self.refresh)
                self._named.add(id(layer))
        names = [layer.name for layer in self.layers()]
        w = self.widget
        if isinstance(w, QComboBox):
            current = w.currentText()
            w.blockSignals(True)
            w.clear()
            w.addItems(names)
            if current in names:
                w.setCurrentIndex(names.index(current))
            w.blockSignals(False)
            w.currentTextChanged.emit(w.currentText())
        else:
            selected = {i.text() for i in w.selectedItems()}
            w.clear()
            w.addItems(names)
            for i in range(w.count()):
                w.item(i).setSelected(w.item(i).text() in selected)


def is_rgb_image(layer) -> bool:
    from napari.layers import Image
    return isinstance(layer, Image) and bool(layer.rgb)


def is_labels(layer) -> bool:
    from napari.layers import Labels
    return isinstance(layer, Labels)


# ---------------------------------------------------------------------------------------------
# stopping jobs when the widget goes away

class StopsJobsOnClose:
    """Mixin for the dock widgets: closing the widget, removing its dock or closing the viewer
    cancels a running job (which still saves its checkpoint, in the worker thread).

    napari's ``create_worker`` also lists each worker in the window's tasks, so closing the window
    asks the user to confirm first and then quits the worker. The ``hideEvent`` check is the safety
    net that needs no napari internals: when this widget hides because its top-level window is no
    longer visible (the viewer closed), its jobs are cancelled. Removing the dock (its close
    button) takes this widget out of it (a ParentChange to no parent), which cancels too. A dock
    merely tabbed behind another, or toggled off from the Window menu, keeps its job running.
    """

    runners: Iterable[JobRunner] = ()

    def cancel_jobs(self) -> None:
        for runner in self.runners:
            runner.cancel()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.cancel_jobs()
        super().closeEvent(event)

    def hideEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().hideEvent(event)
        if not self.window().isVisible():
            self.cancel_jobs()

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ParentChange and self.parent() is None:
            self.cancel_jobs()
        return super().event(event)


def layer_to_rgb(data: Any, name: str) -> np.ndarray:
    """An image layer's (single-scale) data as RGB uint8, with a readable error for the rest."""
    from ..core.data import to_rgb_uint8
    arr = np.asarray(data)
    if arr.size > 100_000_000:
        raise DataError(f"layer {name!r} is too large to train on in memory ({arr.shape}); "
                        "use a folder of tiles or a slide file instead")
    return to_rgb_uint8(arr, f"layer {name!r}")
