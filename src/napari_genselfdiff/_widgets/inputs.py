"""Small input widgets the dock widgets share: a device chooser, path fields, spin boxes, the
training rows and Start/Cancel buttons, layer choosers that follow the viewer, and the checks
that turn a layer into pixels. Also the layout helpers (titled boxes, rows, combo boxes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDockWidget, QDoubleSpinBox, QFileDialog, QFormLayout, QFrame,
                            QGroupBox, QMainWindow,
                            QHBoxLayout, QLabel, QLineEdit, QListWidget, QPushButton, QScrollArea, QSpinBox,
                            QToolTip, QVBoxLayout, QWidget)

from ..core.device import CHOICES, available_devices, pick_device
from ..core.errors import DataError, GenSelfDiffError

#: In-memory layers larger than this many values are not read for training.
MAX_LAYER_VALUES = 100_000_000


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
        self.combo.setToolTip("where the network runs: auto takes a GPU (cuda, then mps) when this machine has "
                              "one, else the CPU")
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


class PrecisionChooser(QWidget):
    """auto / fp32 / bf16, with what ``auto`` means on the chosen device (core/precision.py)."""

    def __init__(self, device: DeviceChooser | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        from ..core.precision import CHOICES as PRECISIONS

        self.devices = device
        self.combo = QComboBox()
        self.combo.addItems(list(PRECISIONS))
        self.combo.setToolTip("the arithmetic the model runs in: auto takes bf16 where the processor computes it "
                              "natively (avx512_bf16 / amx_bf16 / Arm bf16, or a GPU), about twice as fast with "
                              "the same objects; fp32 elsewhere. bf16 on a CPU without it is emulated and slower")
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.combo.currentTextChanged.connect(self._explain)
        if device is not None:
            device.combo.currentTextChanged.connect(self._explain)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.combo)
        lay.addWidget(self.info, 1)
        self._explain()

    @property
    def precision(self) -> str:
        return self.combo.currentText()

    def _explain(self, *_) -> None:
        from ..core.precision import resolve_precision

        try:
            dev = pick_device(self.devices.device if self.devices is not None else "auto")[0]
            sentence = resolve_precision(self.precision, dev).why
        except GenSelfDiffError as e:
            sentence = str(e)
        self.info.setText(f"here: {sentence}")


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
        self.edit.setToolTip(placeholder)
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

    def setText(self, text: str) -> None:  # noqa: N802 (Qt's name)
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


def pixel_size_spin(tip: str) -> QDoubleSpinBox:
    """The Pixel size row Predict and Fine-tune share: µm/px, 0 shown as 'from the image'."""
    spin = QDoubleSpinBox()
    spin.setRange(0.0, 50.0)
    spin.setDecimals(3)
    spin.setSingleStep(0.05)
    spin.setSuffix(" µm/px")
    spin.setSpecialValueText("from the image")
    spin.setToolTip(tip)
    return spin


def int_spin(lo: int, hi: int, value: int, step: int, tip: str) -> QSpinBox:
    s = QSpinBox()
    s.setRange(lo, hi)
    s.setValue(value)
    s.setSingleStep(step)
    s.setToolTip(tip)
    return s


@dataclass
class TrainingRows:
    """The inputs both training widgets share (see :func:`add_training_rows`)."""

    patch: QSpinBox
    steps: QSpinBox
    batch: QSpinBox
    device: DeviceChooser
    out: PathEdit
    resume: QCheckBox


def add_training_rows(form: QFormLayout, *, patch_tip: str, steps: int, steps_step: int, out_tip: str,
                      out_default: Path, resume: bool) -> TrainingRows:
    """Add the rows both training widgets share to ``form``: patch, steps, batch, device, output
    folder, resume."""
    rows = TrainingRows(patch=int_spin(32, 1024, 256, 32, patch_tip),
                        steps=int_spin(1, 1_000_000, steps, steps_step, "how long training runs: each optimisation "
                                       "step learns from one batch of tiles"),
                        batch=int_spin(1, 256, 8, 1, "tiles per step: more gives steadier learning but takes more "
                                       "memory and time per step"),
                        device=DeviceChooser(),
                        out=PathEdit("dir", out_tip),
                        resume=QCheckBox("resume the run in this folder, if there is one"))
    rows.out.setText(str(out_default))
    rows.resume.setChecked(resume)
    for label, w in [("Patch size", rows.patch), ("Steps", rows.steps), ("Batch", rows.batch),
                     ("Device", rows.device), ("Output folder", rows.out), ("", rows.resume)]:
        form.addRow(label, w)
    return rows


def start_cancel_row(start_text: str = "Start") -> tuple[QWidget, QPushButton, QPushButton]:
    start, cancel = QPushButton(start_text), QPushButton("Cancel")
    cancel.setEnabled(False)
    return row(start, cancel), start, cancel


# ---------------------------------------------------------------------------------------------
# layout helpers

def row(*widgets: QWidget) -> QWidget:
    """Widgets side by side, without margins (for one form row)."""
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for child in widgets:
        lay.addWidget(child)
    return w


class VerticalScroll(QScrollArea):
    """A scroll area for a dock widget's content: it scrolls vertically only, so docks stacked in
    one column can shrink to a few lines each, but is never narrower than its content (nothing is
    cut sideways, scroll bar included). Its preferred size is the whole content's."""

    def __init__(self, body: QWidget, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setWidget(body)
        self._shared = False  # the column's height shared out once, at the first show

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        """Shown docked for the first time: the docks stacked with it share the column's height."""
        super().showEvent(event)
        if not self._shared:
            self._shared = True
            QTimer.singleShot(0, self._share)

    def _share(self) -> None:
        try:
            share_dock_height(self)
        except RuntimeError:  # closed before the event loop came back: nothing to share
            pass

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        """The content's hints changed (e.g. napari's style arrived): so did this area's."""
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(watched, event)

    def _width(self, content: QSize) -> int:
        return content.width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        """Asked each time, so it follows the style napari applies."""
        hint = super().minimumSizeHint()
        return QSize(max(hint.width(), self._width(self.widget().minimumSizeHint())), hint.height())

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        content = self.widget().sizeHint()
        return QSize(max(self._width(content), self.minimumSizeHint().width()),
                     content.height() + 2 * self.frameWidth())


def share_dock_height(widget: QWidget) -> list[QDockWidget]:
    """Give the docks stacked in the column of ``widget``'s dock equal heights: Qt gives a newly
    stacked dock what is left (four of ours got 89, 170, 306 and 442 px). Tabbed docks count once
    (the tab shown), floating ones not at all. Returns the docks resized (none when not docked)."""
    dock = widget
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    window = None if dock is None else dock.parentWidget()
    if dock is None or dock.isFloating() or not isinstance(window, QMainWindow):
        return []
    area = window.dockWidgetArea(dock)
    column = [d for d in window.findChildren(QDockWidget)
              if d.isVisible() and not d.isFloating() and window.dockWidgetArea(d) == area
              and abs(d.x() - dock.x()) < 8]
    if len(column) > 1:
        each = sum(d.height() for d in column) // len(column)
        window.resizeDocks(column, [each] * len(column), Qt.Orientation.Vertical)
    return column


def scrolling_column(widget: QWidget) -> QVBoxLayout:
    """Give a dock widget a :class:`VerticalScroll` holding its content; returns the column
    layout to add the content to (every dock widget of this plugin is laid out this way).
    :func:`pinned_footer` gives the layout under the scroll area, for what must stay in sight."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.setSpacing(0)
    body = QWidget()
    column = QVBoxLayout(body)
    outer.addWidget(VerticalScroll(body), 1)
    footer = QVBoxLayout()
    footer.setContentsMargins(column.contentsMargins().left(), 4, column.contentsMargins().right(), 4)
    outer.addLayout(footer)
    widget.setProperty("genselfdiff_footer", True)
    return column


def pinned_footer(widget: QWidget) -> QVBoxLayout:
    """The layout under a :func:`scrolling_column`'s scroll area: what is added there (the action
    buttons and the progress) stays in sight however little height a stacked dock gets."""
    outer = widget.layout()
    if outer is None or not widget.property("genselfdiff_footer"):
        raise ValueError("pinned_footer needs a widget laid out by scrolling_column")
    return outer.itemAt(1).layout()


def form_and_column(box: QGroupBox) -> tuple[QFormLayout, QVBoxLayout]:
    """Lay ``box`` out as a form for the inputs, then a column for wrapped text below it (a
    word-wrapped label spanning a form row can be given too little height)."""
    column = QVBoxLayout(box)
    form = QFormLayout()
    column.addLayout(form)
    return form, column


def narrow_combo() -> QComboBox:
    """A combo box whose width does not grow with long layer names."""
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)
    return combo


def info_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


# ---------------------------------------------------------------------------------------------
# layers

class LayerChoices:
    """Keeps a QComboBox or QListWidget filled with the names of the viewer's layers of one kind,
    following insertions, removals, moves and renames until the widget is destroyed.

    (Hand-written rather than magicgui's layer combo boxes: those fill themselves only once the
    widget is docked in a viewer, and have no multi-selection list.)
    """

    def __init__(self, viewer, accept: Callable[[Any], bool], widget: QComboBox | QListWidget,
                 explain: Callable[[Any], tuple[str, str] | None] | None = None):
        """``explain(layer)``: why a layer of the viewer is not listed, when a user would look for
        it there (a greyscale image in an image chooser), short and in full: the full reason is
        added to the widget's tooltip, the short one is its placeholder while nothing can be chosen."""
        self.viewer, self.accept, self.widget, self.explain = viewer, accept, widget, explain
        self._tooltip = widget.toolTip()
        self._named: set[int] = set()
        self._events = (viewer.layers.events.inserted, viewer.layers.events.removed,
                        viewer.layers.events.moved)
        for ev in self._events:
            ev.connect(self.refresh)
        widget.destroyed.connect(lambda *_: self._disconnect())
        self.refresh()

    def _disconnect(self) -> None:
        """Stop following the viewer (the widget is gone). Qt may say so only after the garbage
        collector cleared this object's attributes (a widget never docked, collected in one
        reference cycle with its choices): then nothing is left to disconnect."""
        state = vars(self)
        for ev in state.get("_events", ()):
            ev.disconnect(self.refresh)
        viewer = state.get("viewer")
        for layer in (viewer.layers if viewer is not None else ()):
            layer.events.name.disconnect(self.refresh)

    def layers(self) -> list:
        return [layer for layer in self.viewer.layers if self.accept(layer)]

    def by_name(self, name: str):
        return next((layer for layer in self.layers() if layer.name == name), None)

    def current(self):
        """The layer chosen in a combo box (None when there is none)."""
        return self.by_name(self.widget.currentText())

    def refresh(self, event=None) -> None:
        for layer in self.viewer.layers:
            if id(layer) not in self._named:
                layer.events.name.connect(self.refresh)
                self._named.add(id(layer))
        names = [layer.name for layer in self.layers()]
        w = self.widget
        self._explain_skipped(bool(names))
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

    def _explain_skipped(self, any_listed: bool) -> None:
        if self.explain is None:
            return
        reasons = [r for r in (self.explain(layer) for layer in self.viewer.layers if not self.accept(layer)) if r]
        self.widget.setToolTip("\n".join([t for t in (self._tooltip, *(full for _, full in reasons)) if t]))
        if isinstance(self.widget, QComboBox):
            self.widget.setPlaceholderText("" if any_listed or not reasons else reasons[0][0])


def is_rgb_image(layer) -> bool:
    from napari.layers import Image
    return isinstance(layer, Image) and bool(layer.rgb)


def why_not_rgb(layer) -> tuple[str, str] | None:
    """Why an image layer is not offered where an H&E image is chosen, short and in full (None: it
    is, or it is not an image at all)."""
    from napari.layers import Image
    if not isinstance(layer, Image) or layer.rgb:
        return None
    kind = "greyscale" if (layer.data[0] if layer.multiscale else layer.data).ndim == 2 else "not RGB"
    return (f"'{layer.name}' is {kind}, not H&E",
            f"'{layer.name}' is {kind}: the models read H&E colour, so it is not listed (open the RGB "
            "original, or add it with rgb=True)")


def is_labels(layer) -> bool:
    from napari.layers import Labels
    return isinstance(layer, Labels)


def layer_to_rgb(data: Any, name: str) -> np.ndarray:
    """An image layer's (single-scale) data as RGB uint8, with a readable error for the rest."""
    from ..core.data import to_rgb_uint8
    arr = np.asarray(data)
    if arr.size > MAX_LAYER_VALUES:
        raise DataError(f"layer {name!r} is too large to train on in memory ({arr.shape}); "
                        "use a folder of tiles or a slide file instead")
    return to_rgb_uint8(arr, f"layer {name!r}")


def level0_data(layer):
    """A layer's full-resolution array (level 0 of a pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


def level0_shape(layer) -> tuple[int, int]:
    data = level0_data(layer)
    return int(data.shape[0]), int(data.shape[1])


def layer_file(layer) -> Path | None:
    """The file a layer was read from, when it still exists."""
    path = layer.source.path or layer.metadata.get("path")
    return Path(path) if path and Path(path).exists() else None


class _FieldTips(QObject):
    """Hovering a form row's label shows its field's tooltip (the field's own, or the first one of
    its parts: a path's line edit, a chooser's combo box), read when shown, so it stays current."""

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip and isinstance(obj, QLabel) and obj.buddy() is not None:
            text = field_tip(obj.buddy())
            if text:
                QToolTip.showText(event.globalPos(), text, obj)
                return True
        return False


def field_tip(field: QWidget) -> str:
    """The tooltip that explains ``field``: its own, else the first of its parts' (not 'browse')."""
    return field.toolTip() or next((c.toolTip() for c in field.findChildren(QWidget)
                                    if c.toolTip() and c.toolTip() != "browse"), "")


def explain_labels(root: QWidget) -> None:
    """Every form row label under ``root`` explains its field on hover (:class:`_FieldTips`)."""
    tips = _FieldTips(root)
    for form in root.findChildren(QFormLayout):
        for i in range(form.rowCount()):
            item = form.itemAt(i, QFormLayout.ItemRole.LabelRole)
            if item is not None and isinstance(item.widget(), QLabel):
                item.widget().installEventFilter(tips)
