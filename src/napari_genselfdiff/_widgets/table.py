"""The per-object table of a result, as QuPath shows one (issue 35 item 5): one row per object of the
result layer's ``features`` (area, perimeter, circularity, optical densities, mean probability, in µm
where the pixel size is known), docked under the canvas. Clicking a row selects that object in the
Labels layer and centres the view on it; clicking an object in the viewer selects its row."""
from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from .geometry import camera_of

#: The column holding the object id (the first one of formats.measurements' tables).
ID_COLUMN = "Object ID"


def cell_text(value) -> str:
    """A table value as shown: whole numbers as they are, others to four significant digits."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    return str(int(v)) if v.is_integer() and abs(v) < 1e12 else f"{v:.4g}"


class ObjectTable(QTableWidget):
    """The table of one result layer (:meth:`show_layer`), linked to it both ways."""

    def __init__(self, viewer):
        super().__init__()
        self.viewer, self.layer = viewer, None
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.verticalHeader().setVisible(False)  # the Object ID column numbers the rows
        self.itemSelectionChanged.connect(self._on_row)
        self._ids: list[int] = []  # the object id of each row
        self._rows: dict[int, int] = {}  # object id -> row

    def show_layer(self, layer) -> int:
        """Fill the table from ``layer.features`` (the objects measured); the number of rows."""
        if self.layer is not None and self._on_click in self.layer.mouse_drag_callbacks:
            self.layer.mouse_drag_callbacks.remove(self._on_click)
        self.layer = layer
        features = layer.features
        columns = [c for c in features.columns if c != "index"]
        self.blockSignals(True)
        self.clearContents()
        self.setColumnCount(len(columns))
        self.setRowCount(len(features))
        self.setHorizontalHeaderLabels(columns)
        for r, values in enumerate(features[columns].itertuples(index=False)):
            for c, v in enumerate(values):
                self.setItem(r, c, QTableWidgetItem(cell_text(v)))
        self.blockSignals(False)
        self.resizeColumnsToContents()
        self._ids = [int(i) for i in features[ID_COLUMN]] if ID_COLUMN in features else []
        self._rows = {i: r for r, i in enumerate(self._ids)}
        layer.mouse_drag_callbacks.append(self._on_click)
        return len(features)

    def select_object(self, object_id: int) -> bool:
        """Select the row of ``object_id`` (and scroll to it); False when the table has none."""
        r = self._rows.get(int(object_id))
        if r is None:
            return False
        self.selectRow(r)
        self.scrollToItem(self.item(r, 0))
        return True

    def _on_row(self) -> None:
        rows = {i.row() for i in self.selectedIndexes()}
        if self.layer is None or len(rows) != 1 or self.layer not in self.viewer.layers:
            return
        oid = self._ids[rows.pop()]
        self.layer.selected_label = oid
        data = self.layer.data[0] if self.layer.multiscale else self.layer.data
        where = np.argwhere(np.asarray(data) == oid)
        if where.size:
            camera_of(self.viewer).center = tuple(self.layer.data_to_world(where.mean(axis=0)))[-2:]

    def _on_click(self, layer, event) -> None:
        value = layer.get_value(event.position, world=True)
        if value:
            self.select_object(int(value))
