"""The per-object table of a Predict result (formats.measurements): made in a worker thread (about
a second for 800 nuclei: too long for the GUI thread), shown as the result layer's ``features``
(napari's status bar shows an object's row under the cursor), saved as CSV by a button."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QFileDialog, QPushButton, QWidget

from ..core.errors import GenSelfDiffError
from ..core.names import safe_name
from .jobs import LatestJob


def measure_job(labels: np.ndarray, foreground: np.ndarray, mpp: float | None) -> Iterator[str]:
    """The per-object table of a result, in a worker; returns the table."""
    from ..formats.measurements import measure_objects

    yield "measuring objects"
    return measure_objects(labels, probability=foreground, mpp=mpp)


class Measurements:
    """The table of the latest result and its Save button; a newer result supersedes a table still
    being made (its table is dropped when it arrives)."""

    def __init__(self, viewer, parent: QWidget, status: Callable[[str], None]):
        self.viewer, self.parent, self.status = viewer, parent, status  # status: where a saved table is said
        self.job = LatestJob("measuring objects", parent, measure_job, self._on_measured)
        self.runner = self.job.runner
        self.button = QPushButton("Save measurements (CSV)…")
        self.button.setToolTip("the objects of the last field-of-view result, one row each: area, perimeter, "
                               "circularity, eccentricity, solidity, mean probability; in µm when the pixel "
                               "size is known (also shown in the status bar over an object)")
        self.button.setEnabled(False)
        self.button.clicked.connect(lambda: self.save())  # not clicked's bool as the path
        self.layer = None  # the result layer the table belongs to
        self._asked_for = None  # the result layer of the newest table asked for

    def measure(self, layer, labels: np.ndarray, foreground: np.ndarray, mpp: float | None) -> None:
        """Measure ``labels`` (with the ``foreground`` probability, at ``mpp`` µm/px) for ``layer``."""
        self._asked_for = layer
        self.button.setEnabled(False)
        self.job.ask(labels.copy(), foreground.copy(), mpp)  # copies: the gathered canvas grows in place

    def _on_measured(self, table: dict) -> None:
        layer = self._asked_for  # only the newest request's table arrives
        if layer in self.viewer.layers:
            layer.features = {"index": table["Object ID"], **table}
            self.layer = layer
            self.button.setEnabled(True)

    def save(self, path: str | None = None) -> str | None:
        """Write the last measured result's table as CSV (asks where, unless given); the path."""
        from ..formats.measurements import write_csv

        layer = self.layer
        if layer is None or layer not in self.viewer.layers:
            show_error("no result to measure: predict a field of view first")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self.parent, "Save measurements", f"{safe_name(layer.name)}.csv",
                                                  "CSV (*.csv)")
            if not path:
                return None
        table = {k: v.to_numpy() for k, v in layer.features.items() if k != "index"}
        try:  # the dialog asked before replacing a file; a file that is not a table of ours is kept
            n = write_csv(path, table, force=True)
        except (GenSelfDiffError, OSError) as e:
            show_error(str(e))
            return None
        self.status(f"{n} objects measured: {path}")
        return path
