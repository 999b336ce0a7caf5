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


def measure_job(labels: np.ndarray, foreground: np.ndarray, mpp: float | None,
                image_of: Callable[[], np.ndarray] | None = None) -> Iterator[str]:
    """The per-object table of a result, in a worker; returns the table. ``image_of()`` reads the
    RGB pixels under the labels (then the table has the haematoxylin and eosin optical densities)."""
    from ..formats.measurements import measure_objects

    yield "measuring objects"
    image = None if image_of is None else np.asarray(image_of())[..., :3]
    return measure_objects(labels, image=image, probability=foreground, mpp=mpp)


class Measurements:
    """The table of the latest result and its Save button; a newer result supersedes a table still
    being made (its table is dropped when it arrives)."""

    def __init__(self, viewer, parent: QWidget, status: Callable[[str], None]):
        self.viewer, self.parent, self.status = viewer, parent, status  # status: where a saved table is said
        self.job = LatestJob("measuring objects", parent, measure_job, self._on_measured)
        self.runner = self.job.runner
        self.button = QPushButton("Save measurements (CSV)…")
        self.button.setToolTip("the objects of the last field-of-view result, one row each: area, perimeter, "
                               "circularity, eccentricity, solidity, mean haematoxylin and eosin optical density, "
                               "mean probability; in µm when the pixel size is known (also shown in the status "
                               "bar over an object)")
        self.button.setEnabled(False)
        self.button.clicked.connect(lambda: self.save())  # not clicked's bool as the path
        self.count_button = QPushButton("Count in drawn regions")
        self.count_button.setToolTip("objects per region drawn on a Shapes layer (rectangle, ellipse, polygon): "
                                     "count, density per mm² and area covered, written on each shape")
        self.count_button.clicked.connect(lambda: self.count())
        self.table_button = QPushButton("Table")
        self.table_button.setToolTip("the objects of the last field-of-view result as a table under the image: "
                                     "click a row to find its object, click an object to find its row")
        self.table_button.setEnabled(False)
        self.table_button.clicked.connect(lambda: self.show_table())
        self.table = None  # the docked ObjectTable, once shown
        self.layer = None  # the result layer the table belongs to
        self._asked_for = None  # the result layer of the newest table asked for

    def measure(self, layer, labels: np.ndarray, foreground: np.ndarray, mpp: float | None,
                image_of: Callable[[], np.ndarray] | None = None) -> None:
        """Measure ``labels`` (with the ``foreground`` probability, at ``mpp`` µm/px, and the image
        ``image_of()`` reads in the worker) for ``layer``."""
        self._asked_for = layer
        self.button.setEnabled(False)
        self.job.ask(labels.copy(), foreground.copy(), mpp, image_of)  # copies: the gathered canvas grows in place

    def _on_measured(self, table: dict) -> None:
        layer = self._asked_for  # only the newest request's table arrives
        if layer in self.viewer.layers:
            layer.features = {"index": table["Object ID"], **table}
            self.layer = layer
            self.button.setEnabled(True)
            self.table_button.setEnabled(True)
            if self._table_shown():
                self.table.show_layer(layer)

    def _table_shown(self) -> bool:
        try:  # a dock the user closed is gone (its widget deleted by Qt, or without a parent)
            return self.table is not None and self.table.parent() is not None
        except RuntimeError:
            return False

    def show_table(self):
        """The last measured result's objects in a table docked under the canvas (:mod:`.table`)."""
        from .table import ObjectTable

        if self.layer is None or self.layer not in self.viewer.layers:
            show_error("no result to show: predict a field of view first")
            return None
        if not self._table_shown():
            self.table = ObjectTable(self.viewer)
            self.viewer.window.add_dock_widget(self.table, name="Objects table", area="bottom")
        n = self.table.show_layer(self.layer)
        self.status(f"{n} objects of '{self.layer.name}' in the table below the image")
        return self.table

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

    def count(self) -> list[dict] | None:
        """Counts per drawn region (:mod:`.regions`) on the shapes and in the status line; the rows."""
        from .regions import count_regions, describe, pick_layers, show_counts

        try:
            shapes, labels = pick_layers(self.viewer, self.layer)
            rows = count_regions(shapes, labels)
        except GenSelfDiffError as e:
            show_error(str(e))
            return None
        show_counts(shapes, rows)
        pixel = " (pixel size unknown)" if "objects per Mpx" in rows[0] else ""
        self.status(f"'{labels.name}' per region of '{shapes.name}'{pixel}: {describe(rows)}")
        return rows
