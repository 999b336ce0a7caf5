"""The "GeoJSON (QuPath)" box: import QuPath objects as a Labels or Shapes layer over the image,
export the project's label store of the image or any Labels layer.

An import reads and draws in the background (:func:`import_job` in napari's thread pool, with a
progress bar and Cancel: a 50 000-object file takes seconds), and the layer is added in the GUI
thread when it is ready. Exports replace an existing file (the save dialog asked) only when it is
a GeoJSON export of ours (:func:`~...formats.geojson.is_our_geojson`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QGroupBox, QPushButton

from ...core.errors import DataError, GenSelfDiffError
from ...core.names import safe_name
from ...core.progress import Progress
from ...formats import qupath
from ...formats.qupath import OBJECT_KINDS
from ..geometry import grid_of, label_grid_over, placement
from ..inputs import LayerChoices, form_and_column, is_labels, level0_data, level0_shape, narrow_combo, row
from ..jobs import JobRunner, readable_error
from ..progress import ProgressPanel
from .annotate import EDIT_KEY, MAX_EDIT
from .context import RefineContext

PROJECT_LABELS = "project labels of the image"
#: The largest Labels layer an import draws (the objects' bounding box), in pixels.
MAX_IMPORT_PIXELS = 100_000_000


@dataclass
class Imported:
    """What :func:`import_job` hands the GUI thread: the read result, and either Shapes data or
    a label raster of the objects' bounding box at ``(y0, x0)`` (level-0 pixels)."""

    result: Any
    shapes: tuple[list, dict] | None = None
    labels: np.ndarray | None = None
    classes: dict | None = None
    origin: tuple[int, int] = (0, 0)


def import_job(path: str, image_shape: tuple[int, int] | None, as_shapes: bool
               ) -> Generator[Progress, None, Imported]:
    """Read a GeoJSON file and make a layer's data (no Qt: it runs in a worker thread). Labels
    are drawn on the objects' bounding box (clipped to the image), so a few objects on a large
    slide stay small; a box over MAX_IMPORT_PIXELS is refused (import as Shapes)."""
    import shapely

    from ...formats.geojson import features_to_shapes, iter_features_to_labels, iter_read_geojson, raster_window

    result = yield from iter_read_geojson(path, image_shape=image_shape)
    if not result.features:
        why = f" ({result.warnings[0]})" if result.warnings else ""
        raise DataError(f"{path}: no polygon objects to import{why}")
    if as_shapes:
        return Imported(result, shapes=features_to_shapes(result))
    y0, x0, h, w = raster_window(result.features, image_shape, MAX_IMPORT_PIXELS)
    shifted = [dataclasses.replace(f, geometry=shapely.transform(f.geometry, lambda c: c - (x0, y0)))
               for f in result.features]
    labels, classes = yield from iter_features_to_labels(shifted, (h, w))
    return Imported(result, labels=labels, classes=classes, origin=(y0, x0))


class ExportChoices(LayerChoices):
    """The Labels layers, after a first entry for the project's label store (kept selected
    while the layer list changes)."""

    def refresh(self, event=None) -> None:
        current = self.widget.currentText()
        super().refresh(event)
        self.widget.blockSignals(True)
        self.widget.insertItem(0, PROJECT_LABELS)
        self.widget.setCurrentIndex(max(0, self.widget.findText(current)))
        self.widget.blockSignals(False)

    def by_name(self, name: str):
        return None if name == PROJECT_LABELS else super().by_name(name)


def label_grid_of(layer, image_layer=None) -> tuple[tuple[float, float], float]:
    """(offset, downsample) of a Labels layer's pixel grid in level-0 pixels of the image: from
    the metadata layers of this plugin carry, else from both layers' scale and translate, else
    world units taken as pixels."""
    from ..._writer import label_grid

    if "downsample" in layer.metadata.get("genselfdiff", {}) or image_layer is None:
        return label_grid({"metadata": layer.metadata, "scale": layer.scale, "translate": layer.translate})
    return label_grid_over(grid_of(layer), grid_of(image_layer))


class GeoJsonBox(QGroupBox):
    """Import as Labels / Shapes (in the background), and export a label source as annotations or
    detections. ``imported(layer)`` is emitted when an import's layer has been added."""

    imported = Signal(object)

    def __init__(self, ctx: RefineContext):
        super().__init__("GeoJSON (QuPath)")
        self.ctx = ctx
        self.runner = JobRunner("GeoJSON import", self)
        self.last_imported = None
        self._pending: tuple[str, Any, str] | None = None
        form, column = form_and_column(self)
        self.import_as = QComboBox()
        self.import_as.addItems(["Labels", "Shapes"])
        self.import_as.setToolTip("Labels: filled objects (holes kept); Shapes: editable polygons (holes dropped)")
        self.import_btn = QPushButton("Import GeoJSON…")
        self.import_btn.clicked.connect(lambda: self.import_geojson())
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.runner.cancel)
        form.addRow("Import as", row(self.import_as, self.import_btn, self.cancel_btn))
        self.export_source = narrow_combo()
        self.export_source.setToolTip("what to export: the project's accepted labels of the image, or a Labels layer")
        self.export_choices = ExportChoices(ctx.viewer, is_labels, self.export_source)
        form.addRow("Export", self.export_source)
        self.object_type = QComboBox()
        self.object_type.addItems(OBJECT_KINDS)
        self.object_type.setToolTip("QuPath object type: annotations (editable, e.g. glands) or detections "
                                    "(many small objects, e.g. nuclei)")
        self.export_btn = QPushButton("Export GeoJSON…")
        self.export_btn.clicked.connect(lambda: self.export_geojson())
        form.addRow("As", row(self.object_type, self.export_btn))
        self.progress = ProgressPanel(with_plot=False)
        column.addWidget(self.progress)
        self.progress.follow(self.runner)
        self.runner.event.connect(self.progress.show_progress)
        self.runner.result.connect(self._on_imported)
        self.runner.stopped.connect(self._on_stopped)
        ctx.project_opened.connect(lambda p: self.object_type.setCurrentText(qupath.object_type(p.spec.task)))

    @property
    def viewer(self):
        return self.ctx.viewer

    # -- import ------------------------------------------------------------------------------

    def import_geojson(self, path: str | None = None) -> bool:
        """Start importing QuPath objects as a Labels layer (rasterised over their bounding box)
        or a Shapes layer, placed over the chosen image; returns whether the import started. The
        layer arrives in the GUI thread when the background job is done (``imported``,
        ``last_imported``). A Labels import of at most MAX_EDIT x MAX_EDIT pixels can be accepted
        into the project like an edit (source 'import')."""
        if self.runner.running:
            show_error("a GeoJSON import is already running")
            return False
        if path is None:
            path = QFileDialog.getOpenFileName(self, "Import GeoJSON", str(Path.home()),
                                               "GeoJSON (*.geojson *.json)")[0]
            if not path:
                return False
        image = self.ctx.image()
        kind = self.import_as.currentText()
        self._pending = (str(path), image, kind)
        self.progress.reset(f"importing {Path(path).name}…")
        self._set_running(True)
        self.runner.start(import_job, str(path), None if image is None else level0_shape(image), kind == "Shapes")
        return True

    def _set_running(self, running: bool) -> None:
        self.import_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    def _on_stopped(self, cancelled: bool) -> None:
        self._set_running(False)
        if cancelled:
            self.progress.set_status("import cancelled: no layer added")
        self._pending = None

    def _on_imported(self, imported: Imported) -> None:
        path, image, kind = self._pending
        if image is not None and image not in self.viewer.layers:
            image = None  # removed meanwhile: place the layer in world pixels
        name = Path(path).name.split(".")[0] or "imported"
        try:
            layer = (self._add_shapes(imported, name, image) if imported.shapes is not None
                     else self._add_labels(imported, name, image))
        except (GenSelfDiffError, ValueError) as e:
            show_error(f"GeoJSON import failed: {readable_error(e)}")
            return
        result = imported.result
        if result.warnings:
            more = f" (and {len(result.warnings) - 3} more)" if len(result.warnings) > 3 else ""
            show_warning(f"{Path(path).name}: {len(result.warnings)} warning(s): "
                         + "; ".join(result.warnings[:3]) + more)
        text = f"imported {len(result.features)} object(s) from {Path(path).name} as layer {layer.name!r}"
        self.progress.set_status(text)
        show_info(text)
        self.last_imported = layer
        self.imported.emit(layer)

    def _add_labels(self, imported: Imported, name: str, image):
        labels, (y0, x0) = imported.labels, imported.origin
        h, w = labels.shape
        meta: dict[str, Any] = {"genselfdiff": {"downsample": 1.0, "offset": [y0, x0]},
                                "classes": {int(k): v for k, v in imported.classes.items()}}
        place = {"translate": (y0, x0)}
        if image is not None:
            meta["genselfdiff"]["image"] = image.name
            place = placement(grid_of(image), 1.0, y0, x0)
            if max(h, w) <= MAX_EDIT:
                meta[EDIT_KEY] = {"image": image.name, "bounds": [y0, x0, h, w], "source": "import", "model": None}
        return self.viewer.add_labels(labels, name=name, opacity=0.6, metadata=meta, **place)

    def _add_shapes(self, imported: Imported, name: str, image):
        data, props = imported.shapes
        # GeoJSON coordinates are pixel edges; napari puts pixel j's centre at data coordinate j
        place = {"translate": (-0.5, -0.5)}
        if image is not None:
            place = placement(grid_of(image), 1.0, -0.5, -0.5)
        return self.viewer.add_shapes(data, shape_type="polygon", name=name, features=props, face_color="transparent",
                                      edge_color="yellow", edge_width=2, **place)

    # -- export ------------------------------------------------------------------------------

    def export_geojson(self, path: str | None = None) -> int | None:
        """Write the project's labels of the image, or the chosen Labels layer, as GeoJSON in
        level-0 pixel coordinates; returns the number of objects written."""
        from ...formats.geojson import export_label_array_chunked

        source = self.export_source.currentText()
        if path is None:
            start = str(Path.home() / f"{safe_name(source, 'image')}.geojson")
            path = QFileDialog.getSaveFileName(self, "Export GeoJSON", start, "GeoJSON (*.geojson)")[0]
            if not path:
                return None
        object_type = self.object_type.currentText()
        try:
            if source == PROJECT_LABELS:
                project, image = self.ctx.need_project(), self.ctx.need_image()
                n = project.export_geojson(self.ctx.slide_id(image), path, object_type=object_type,
                                           class_name=self._class_name(project.spec.task), force=True)
            else:
                layer = self.export_choices.by_name(source)
                if layer is None:
                    raise DataError("choose what to export")
                offset, d = label_grid_of(layer, self.ctx.image())
                n = export_label_array_chunked(level0_data(layer), path, offset=offset, downsample=d, force=True,
                                               object_type=object_type, class_name=self._class_name(layer.name))
        except (GenSelfDiffError, ValueError, OSError) as e:
            show_error(f"GeoJSON export failed: {readable_error(e)}")
            return None
        show_info(f"wrote {n} {object_type}(s) to {path}")
        return n

    def _class_name(self, task_or_name: str) -> str:
        """The QuPath class of a task or layer name; other names take the open project's task."""
        if task_or_name in qupath.CLASS_NAMES:
            return qupath.CLASS_NAMES[task_or_name]
        project = self.ctx.project
        if project is not None and project.spec.task in qupath.CLASS_NAMES:
            return qupath.CLASS_NAMES[project.spec.task]
        return task_or_name or "Object"
