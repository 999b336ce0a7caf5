"""Progress display for the dock widgets: a progress bar with a one-line status and a live loss
plot, and the Start/Cancel + progress block both training widgets end with."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QCheckBox, QLabel, QProgressBar, QSizePolicy, QVBoxLayout, QWidget

from ..core.errors import DataError
from ..core.progress import Progress
from .inputs import PathEdit, start_cancel_row
from .jobs import JobRunner, readable_error


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

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
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
    """Progress bar, one-line status (step, loss, speed, ETA, validation) and an optional loss plot.

    An idle bar (nothing run yet, or a run that stopped before its first step) is empty and shows
    no text: "0 / 1" would read as a job of one step."""

    def __init__(self, with_plot: bool = True, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar()
        self.bar.setFormat("%v / %m")
        self.idle()
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        self._runner: JobRunner | None = None  # the job followed (:meth:`follow`)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        self.plot = LossPlot() if with_plot else None
        if self.plot is not None:
            lay.addWidget(self.plot)
            self.plot.setVisible(False)  # from a run's first loss on: idle, its height goes to the form

    def follow(self, runner: JobRunner) -> None:
        """Show ``runner``'s failure, and leave no busy bar behind when it stops; while it is
        cancelling, its late events leave the "cancelling…" line as it is."""
        self._runner = runner
        runner.failed.connect(lambda exc: self.set_status(f"failed: {readable_error(exc)}"))
        runner.stopped.connect(self._on_stopped)

    def _on_stopped(self, cancelled: bool) -> None:
        if self.bar.maximum() == 0:  # still busy: it never got a step
            self.idle()

    def idle(self) -> None:
        """An empty bar without text (no steps to count)."""
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setTextVisible(False)

    def reset(self, text: str = "starting…") -> None:
        self.bar.setRange(0, 0)  # busy until the first event says how many steps
        self.status.setText(text)
        if self.plot is not None:
            self.plot.clear()

    def set_status(self, text: str) -> None:
        self.status.setText(text)

    def set_step(self, step: int, total: int) -> None:
        """Show ``step`` of ``total`` on the bar (a total below 1 counts as 1)."""
        total = max(int(total or 0), 1)
        self.bar.setRange(0, total)
        self.bar.setValue(min(int(step or 0), total))
        self.bar.setTextVisible(True)

    def show_progress(self, ev: Progress | str) -> None:
        """Show a core ``Progress``; a plain string is a phase without steps (busy bar)."""
        if self._runner is not None and self._runner.cancelling:
            return
        if isinstance(ev, str):
            self.bar.setRange(0, 0)
            self.status.setText(ev)
            return
        self.set_step(ev.step, ev.total)
        parts = [f"{ev.stage} step {ev.step}/{ev.total}".strip()]
        if ev.activity:
            parts.append(ev.activity)
        if ev.loss is not None and math.isfinite(ev.loss):
            parts.append(f"loss {ev.loss:.4f}")
            if self.plot is not None:
                self.plot.add(ev.loss)
                self.plot.setVisible(True)
        if ev.images_per_s:
            parts.append(f"{ev.images_per_s:.1f} img/s")
        if ev.eta_s is not None and math.isfinite(ev.eta_s):
            parts.append(f"ETA {format_duration(ev.eta_s)}")
        for k, v in (ev.metrics or {}).items():
            if isinstance(v, float):
                parts.append(f"{k.replace('_', ' ')} {v:.3f}")
        text = " · ".join(parts)
        if ev.message:
            text = f"{ev.message}\n{text}" if not ev.done else ev.message
        self.status.setText(text)


class TrainingControls:
    """The block both training widgets end with: Start/Cancel buttons, a progress panel
    following ``runner``, and what the widget needs to know about the run afterwards (the
    last :class:`Progress` and the last validation metrics).

    The widget owns one (``self.controls = TrainingControls(...)``) and hands it everything it
    uses: the layout to add to, the runner, the Start callback and the output-folder inputs, and
    the footer pinned under its scroll area where the buttons and progress go.
    """

    def __init__(self, layout: QVBoxLayout, runner: JobRunner, start_text: str, start: Callable[[], None],
                 out: PathEdit, resume: QCheckBox, footer: QVBoxLayout | None = None):
        self.runner, self.out, self.resume = runner, out, resume
        self.last: Progress | None = None
        self.metrics: dict = {}
        row, self.start_btn, self.cancel_btn = start_cancel_row(start_text)
        self.start_btn.clicked.connect(start)
        self.cancel_btn.clicked.connect(self.cancel)
        footer = layout if footer is None else footer  # the widget's pinned footer: always in sight
        footer.addWidget(row)
        self.progress = ProgressPanel()
        footer.addWidget(self.progress)
        layout.addStretch(1)
        self.progress.follow(runner)
        runner.event.connect(self.progress.show_progress)
        runner.event.connect(self._remember)
        runner.stopped.connect(self._on_stopped)

    def checked_output_folder(self, what: str) -> str:
        """The output folder, or a DataError when it is unset, or holds a run and resume is off."""
        out = self.out.text()
        if not out:
            raise DataError(f"choose an output folder for the {what}")
        if Path(out).exists() and any(Path(out).iterdir()) and not self.resume.isChecked():
            raise DataError(f"{out}: already exists; tick 'resume' or choose another output folder")
        return out

    def begin(self, text: str) -> None:
        """A run starts: forget the last one, show ``text`` and a busy bar, disable Start."""
        self.last, self.metrics = None, {}
        self.progress.reset(text)
        self.set_running(True)

    def cancel(self) -> None:
        """Ask the run to stop; it saves its checkpoint in the worker before ``stopped`` comes."""
        if self.runner.running:
            self.runner.cancel()
            self.cancel_btn.setEnabled(False)
            self.progress.set_status("cancelling: saving the checkpoint…")

    def set_running(self, running: bool) -> None:
        self.start_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    def show_last_step(self) -> None:
        """Put the bar back on the last training step (after a phase without steps)."""
        if self.last is not None:
            self.progress.set_step(self.last.step, self.last.total)

    def _remember(self, ev: Any) -> None:
        if isinstance(ev, Progress):
            self.last = ev
            self.metrics = ev.metrics or self.metrics

    def _on_stopped(self, cancelled: bool) -> None:
        self.set_running(False)
        if cancelled:
            last = self.last
            at = f" at step {last.step}/{last.total}" if last else ""
            self.progress.set_status(f"cancelled{at}; the checkpoint in {self.out.text()} keeps what was learned "
                                     "(tick 'resume' to continue it)")
