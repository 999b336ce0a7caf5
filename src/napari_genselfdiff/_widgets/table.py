"""The per-object table of a result, as QuPath shows one (issue 35 item 5): one row per object of the
result layer's ``features`` (area, perimeter, circularity, optical densities, mean probability, in µm
where the pixel size is known), docked under the canvas. Clicking a row selects that object in the
Labels layer and centres the view on it; clicking an object in the viewer selects its row.

A Qt model over the feature columns (:class:`FeaturesModel`) feeds the view: only the rows in sight
are drawn, so a whole slide's hundred thousand nuclei show as fast as a field of view's hundred. A
row's object is found by its centroid (the table's own columns), not by searching the labels."""
from __future__ import annotations

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt
from qtpy.QtWidgets import QAbstractItemView, QTableView

from .geometry import camera_of

#: The column holding the object id (the first one of formats.measurements' tables).
ID_COLUMN = "Object ID"


def cell_text(value) -> str:
    """A table value as shown: whole numbers as they are, others to four significant digits."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    return str(int(v)) if v.is_integer() and abs(v) < 1e12 else f"{v:.4g}"


class FeaturesModel(QAbstractTableModel):
    """A layer's ``features`` (pandas) as a read-only Qt table model, cells made as they are drawn."""

    def __init__(self, features) -> None:
        super().__init__()
        self.names = [c for c in features.columns if c != "index"]
        self.columns = [features[c].to_numpy() for c in self.names]
        self.rows = len(features)

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802  (Qt's name)
        return 0 if parent.isValid() else self.rows

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.names)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if role != Qt.ItemDataRole.DisplayRole or not index.isValid():
            return None
        return cell_text(self.columns[index.column()][index.row()])

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        return self.names[section] if orientation == Qt.Orientation.Horizontal else str(section + 1)


def _data_scale(layer, unit: str) -> float | None:
    """Microns (or pixels) per pixel of the layer's data grid, as its centroid columns count them."""
    if unit == "px":
        return 1.0
    meta = layer.metadata.get("genselfdiff", {})
    mpp = meta.get("mpp")
    return mpp * meta.get("downsample", 1.0) if mpp else None


class ObjectTable(QTableView):
    """The table of one result layer (:meth:`show_layer`), linked to it both ways."""

    def __init__(self, viewer):
        super().__init__()
        self.viewer, self.layer = viewer, None
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.verticalHeader().setVisible(False)  # the Object ID column numbers the rows
        self._ids: np.ndarray = np.zeros(0, np.int64)  # the object id of each row
        self._rows: dict[int, int] = {}  # object id -> row

    def show_layer(self, layer) -> int:
        """Fill the table from ``layer.features`` (the objects measured); the number of rows."""
        if self.layer is not None and self._on_click in self.layer.mouse_drag_callbacks:
            self.layer.mouse_drag_callbacks.remove(self._on_click)
        self.layer = layer
        features = layer.features
        self.setModel(FeaturesModel(features))  # the view owns no model of its own: a new one each time
        self.selectionModel().selectionChanged.connect(self._on_row)
        self.resizeColumnsToContents()
        self._ids = features[ID_COLUMN].to_numpy().astype(np.int64) if ID_COLUMN in features else np.zeros(0, np.int64)
        self._rows = {int(i): r for r, i in enumerate(self._ids)}
        layer.mouse_drag_callbacks.append(self._on_click)
        return len(features)

    def select_object(self, object_id: int) -> bool:
        """Select the row of ``object_id`` (and scroll to it); False when the table has none."""
        r = self._rows.get(int(object_id))
        if r is None:
            return False
        self.selectRow(r)
        self.scrollTo(self.model().index(r, 0))
        return True

    def _centre(self, row: int, oid: int) -> np.ndarray | None:
        """The object's centre in the layer's data pixels: its centroid in the table, or where it is."""
        features = self.layer.features
        for unit in ("µm", "px"):
            x, y, s = f"Centroid X {unit}", f"Centroid Y {unit}", _data_scale(self.layer, unit)
            if x in features and s:
                return np.array([features[y].iloc[row], features[x].iloc[row]]) / s
        data = self.layer.data[0] if self.layer.multiscale else self.layer.data
        where = np.argwhere(np.asarray(data) == oid)
        return where.mean(axis=0) if where.size else None

    def _on_row(self, *_) -> None:
        rows = {i.row() for i in self.selectionModel().selectedRows()}
        if self.layer is None or len(rows) != 1 or self.layer not in self.viewer.layers:
            return
        row = rows.pop()
        oid = int(self._ids[row])
        self.layer.selected_label = oid
        centre = self._centre(row, oid)
        if centre is not None:
            camera_of(self.viewer).center = tuple(self.layer.data_to_world(centre))[-2:]

    def _on_click(self, layer, event) -> None:
        value = layer.get_value(event.position, world=True)
        if isinstance(value, tuple):  # a multiscale layer says (level, value)
            value = value[-1]
        if value:
            self.select_object(int(value))
