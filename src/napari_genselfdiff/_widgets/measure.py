"""The per-object table of a Predict result (formats.measurements): made in a worker thread (about
a second for 800 nuclei: too long for the GUI thread), shown as the result layer's ``features``
(napari's status bar shows an object's row under the cursor), saved as CSV by a button. A whole
slide's objects are measured from its store, part by part (:func:`measure_store_job`), the status
line counting the parts."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QFileDialog, QPushButton, QWidget

from ..core.errors import GenSelfDiffError
from ..core.names import safe_name
from .jobs import LatestJob


def measure_job(layer, labels: np.ndarray, foreground: np.ndarray, mpp: float | None,
                image_of: Callable[[], np.ndarray] | None = None) -> Iterator[str]:
    """The per-object table of a result, in a worker; returns (``layer``, the table). ``image_of()``
    reads the RGB pixels under the labels (then the table has the haematoxylin and eosin optical
    densities). ``layer`` is only handed back (the worker never touches it)."""
    from ..formats.measurements import measure_objects

    yield "measuring objects"
    image = None if image_of is None else np.asarray(image_of())[..., :3]
    return layer, measure_objects(labels, image=image, probability=foreground, mpp=mpp)


def measure_store_job(layer, out: str, kind: str, levels: list, said: str) -> Iterator[str]:
    """The per-object table of the whole slide in the store ``out`` (its label set ``kind``), in a
    worker, with the optical densities when ``levels`` (the image's pyramid) has the level the model
    ran on; yields status lines (``said`` and the parts measured); returns (``layer``, the table)."""
    from ..core.progress import relay
    from ..formats.measurements import iter_measure_label_array
    from ..slide.store import PredictionStore

    store = PredictionStore.open(out)
    labels = store.labels(kind)
    image = levels[store.level] if store.level < len(levels) else None
    image = image if image is not None and tuple(image.shape[:2]) == tuple(labels.shape) else None
    gen = iter_measure_label_array(labels, image=image, probability=store.foreground(), mpp=store.mpp)
    table = yield from relay(gen, lambda step: f"{said} · measuring the {kind}: {step[0]}/{step[1]} parts")
    return layer, table


class Measurements:
    """The table of the latest result and its Save button; a newer result supersedes a table still
    being made (its table is dropped when it arrives)."""

    def __init__(self, viewer, parent: QWidget, status: Callable[[str], None]):
        self.viewer, self.parent, self.status = viewer, parent, status  # status: where a saved table is said
        self.job = LatestJob("measuring objects", parent, measure_job, self._on_measured)
        self.store_job = LatestJob("measuring a whole slide's objects", parent, measure_store_job, self._on_measured)
        self.store_job.runner.event.connect(lambda line: isinstance(line, str) and self.status(line))
        self.runner = self.job.runner
        self.runners = [self.job.runner, self.store_job.runner]
        self._said = ""  # the status line a whole slide's measuring adds to
        self.button = QPushButton("Save measurements (CSV)…")
        self.button.setToolTip("the objects of the last result (field of view or whole slide), one row each: area, "
                               "perimeter, "
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
        self.table_button.setToolTip("the objects of the last result as a table under the image: "
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
        self._asked_for, self._said = layer, ""
        self.button.setEnabled(False)
        self.job.ask(layer, labels.copy(), foreground.copy(), mpp, image_of)  # copies: the canvas grows in place

    def measure_store(self, layer, out: str, kind: str, levels: list, said: str) -> None:
        """Measure the whole slide's objects (the store ``out``, label set ``kind``) for ``layer``;
        ``levels``: the image's pyramid (for the optical densities); ``said``: the status line the
        progress and the count are added to."""
        self._asked_for, self._said = layer, said
        self.button.setEnabled(False)
        self.store_job.ask(layer, out, kind, levels, said)

    def stop_store(self) -> None:
        """Stop measuring a whole slide (its labels are about to be replaced: the table would be
        of the old objects, read while they go)."""
        self._asked_for = None
        if self.store_job.runner.running:
            self.store_job.runner.cancel()

    def _on_measured(self, result: tuple) -> None:
        layer, table = result
        if layer is not self._asked_for:  # a newer result was asked for meanwhile
            return
        if self._said:
            self.status(f"{self._said} · {len(table['Object ID'])} {layer.name} measured (Table, Save measurements)")
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
