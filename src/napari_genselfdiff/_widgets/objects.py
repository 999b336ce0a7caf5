"""Live object controls on a field-of-view result (as cellpose- and stardist-napari have): the
probability threshold and the smallest object, applied again to the kept probabilities in a
worker thread as the controls move; the network does not run again.

The controls start at the model's own values (those it was tuned with, :mod:`core.eval.postprocess`)
whenever a result of another model arrives; what differs from them is used for the next
fields of view too (:meth:`ObjectControls.overrides`). A whole-slide run predicts with the model's
values; "Apply to whole slide" then finds the last whole slide's objects again with the controls'
values, block by block from its stored probabilities (:mod:`napari_genselfdiff.slide.relabel`, a
job of the Predict widget with its progress and Cancel): minutes for a large slide, so it waits
for the click instead of following every move.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QFormLayout, QGroupBox, QLabel, QPushButton, QSlider, QSpinBox, QWidget

from .inputs import row
from .jobs import LatestJob

#: Wait this long after the last move of a control before finding the objects again.
SETTLE_MS = 250


def relabel_job(probs: np.ndarray, task: str, options: dict, view=None) -> Iterator[str]:
    """The objects of kept probabilities with other options, in a worker; returns the labels
    (those with a pixel in ``view``, y, x, h, w, where the probabilities have a margin around it)."""
    from ..core.eval.postprocess import postprocess
    from ..slide.fov import objects_in_view

    yield "finding objects…"
    _, instances = postprocess(probs, task, options)
    instances = instances.astype(np.int32, copy=False)
    return instances if view is None else objects_in_view(instances, view)


class ObjectControls:
    """The "Objects" box of the Predict widget: a threshold slider and a minimum-size field.
    ``relabelled(labels, options)`` receives the new objects of the last result (GUI thread)."""

    def __init__(self, parent: QWidget, relabelled: Callable[[np.ndarray, dict], None],
                 apply_to_slide: Callable[[dict], None] | None = None):
        self.relabelled = relabelled
        self.box = QGroupBox("Objects (live)")
        self.box.setToolTip("change what counts as an object in the last field-of-view result without "
                            "running the model again; 'Apply to whole slide' does it for the last whole slide")
        form = QFormLayout(self.box)
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(5, 95)
        self.threshold.setSingleStep(1)
        self.threshold.setPageStep(5)
        self.threshold.setToolTip("probability above which a pixel belongs to an object: lower finds more "
                                  "and larger objects, higher fewer and smaller ones")
        self.threshold_text = QLabel()
        self.threshold_text.setMinimumWidth(32)
        form.addRow("Threshold", row(self.threshold, self.threshold_text))
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 1_000_000)
        self.min_size.setSuffix(" px")
        self.min_size.setToolTip("objects smaller than this many pixels (at the model's resolution) are dropped")
        self.min_size_text = QLabel()
        self.reset = QPushButton("Model's values")
        self.reset.setToolTip("the threshold and minimum size the model was tuned with")
        self.reset.clicked.connect(self.use_model_values)
        form.addRow("Smallest", row(self.min_size, self.min_size_text))
        self.slide_btn = QPushButton("Apply to whole slide")
        self.slide_btn.setToolTip("find the objects of the last whole-slide result again with these values, from "
                                  "its stored probabilities (the model does not run again); its store keeps them")
        self.slide_btn.setEnabled(False)
        self.slide_btn.clicked.connect(lambda: apply_to_slide and apply_to_slide({**self.model_values, **self.values()}))
        form.addRow("", row(self.reset, self.slide_btn))
        self.timer = QTimer(parent)
        self.timer.setSingleShot(True)
        self.timer.setInterval(SETTLE_MS)
        self.timer.timeout.connect(self._apply)
        # a newer move of a control supersedes the objects still being found
        self.job = LatestJob("finding objects", parent, relabel_job,
                             lambda labels: self.relabelled(labels, self.values()))
        self.runner = self.job.runner
        self.model_key: Any = None
        self.model_values: dict = {}  # the model's full post-processing options
        self.task = "glands"
        self.mpp: float | None = None
        self._probs: np.ndarray | None = None
        self._view = None  # the view inside the probabilities (they have a margin around it)
        self.slide: tuple[str, str] | None = None  # (store, label set) of the last whole-slide result
        self.threshold.valueChanged.connect(self._changed)
        self.min_size.valueChanged.connect(self._changed)
        self.box.setEnabled(False)
        self._show_values()

    # -- values ------------------------------------------------------------------------------

    def values(self) -> dict:
        return {"threshold": self.threshold.value() / 100.0, "min_size": self.min_size.value()}

    def overrides(self) -> dict:
        """The values that differ from the model's (what the next field of view uses)."""
        if not self.model_values:
            return {}
        return {k: v for k, v in self.values().items() if abs(v - self.model_values.get(k, v)) > 1e-9}

    def use_model_values(self) -> None:
        self._set(self.model_values)
        self._changed()

    def _set(self, values: dict) -> None:
        for w, v in ((self.threshold, round(values.get("threshold", 0.5) * 100)),
                     (self.min_size, int(values.get("min_size", 0)))):
            w.blockSignals(True)
            w.setValue(int(v))
            w.blockSignals(False)
        self._show_values()

    def _show_values(self) -> None:
        self.threshold_text.setText(f"{self.threshold.value() / 100:.2f}")
        a = self.min_size.value() * self.mpp ** 2 if self.mpp else None
        area = "" if a is None else f"≈ {a:.1f} µm²" if a < 10 else f"≈ {a:.0f} µm²"
        self.min_size_text.setText(area)

    # -- results -----------------------------------------------------------------------------

    def result(self, model_key: Any, task: str, model_values: dict, probs: np.ndarray, mpp: float | None,
               view=None) -> None:
        """A new field-of-view result: its probabilities (and the view in them) are kept; a result
        of another model puts the controls at that model's values."""
        self._probs, self.task, self.mpp, self._view = probs, task, mpp, view
        if model_key != self.model_key:
            self.model_key, self.model_values = model_key, dict(model_values)
            self._set(self.model_values)
        self._show_values()
        self.box.setEnabled(True)

    def slide_result(self, model_key: Any, task: str, model_values: dict, values: dict, out: str,
                     mpp: float | None) -> None:
        """A whole-slide result (its store ``out``): the controls show the ``values`` its objects
        were found with, and "Apply to whole slide" acts on it. The field of view of another model
        is no longer what the controls act on."""
        if model_key != self.model_key:
            self._probs = None
            self.model_key, self.model_values = model_key, dict(model_values)
        self.slide, self.task, self.mpp = (out, task), task, mpp
        self._set(values)
        self.box.setEnabled(True)
        self.slide_btn.setEnabled(True)

    def _changed(self, *_: Any) -> None:
        self._show_values()
        if self._probs is not None:
            self.timer.start()

    def _apply(self) -> None:
        self.job.ask(self._probs, self.task, {**self.model_values, **self.values()}, self._view)
