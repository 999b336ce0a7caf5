"""The "GeoJSON (QuPath)" box: import QuPath objects as a Labels or Shapes layer over the image,
export the project's label store of the image or any Labels layer."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QComboBox, QFileDialog, QGroupBox, QPushButton

from ...core.errors import DataError, GenSelfDiffError
from ...core.names import safe_name
from ...formats import qupath
from ...formats.qupath import OBJECT_KINDS
from ..geometry import grid_of, label_grid_over, placement
from ..inputs import LayerChoices, form_and_column, is_labels, level0_data, level0_shape, narrow_combo, row
from ..jobs import readable_error
from .annotate import EDIT_KEY, MAX_EDIT
from .context import RefineContext

PROJECT_LABELS = "project labels of the image"
#: QuPath's two object kinds: annotations (editable, e.g. glands), detections (many small objects).
MAX_IMPORT_PIXELS = 100_000_000


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
    """Import as Labels / Shapes, and export a label source as annotations or detections."""

    def __init__(self, ctx: RefineContext):
        super().__init__("GeoJSON (QuPath)")
        self.ctx = ctx
        form, _ = form_and_column(self)
        self.import_as = QComboBox()
        self.import_as.addItems(["Labels", "Shapes"])
        self.import_as.setToolTip("Labels: filled objects (holes kept); Shapes: editable polygons (holes dropped)")
        self.import_btn = QPushButton("Import GeoJSON…")
        self.import_btn.clicked.connect(lambda: self.import_geojson())
        form.addRow("Import as", row(self.import_as, self.import_btn))
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
        ctx.project_opened.connect(lambda p: self.object_type.setCurrentText(qupath.object_type(p.spec.task)))

    @property
    def viewer(self):
        return self.ctx.viewer

    # -- import ------------------------------------------------------------------------------

    def import_geojson(self, path: str | None = None):
        """QuPath objects as a Labels layer (rasterised over their bounding box, so a few objects
        on a large slide stay small) or a Shapes layer, placed over the chosen image. A Labels
        import of at most MAX_EDIT x MAX_EDIT pixels can be accepted into the project like an
        edit (source 'import')."""
        from ...formats.geojson import read_geojson

        if path is None:
            path = QFileDialog.getOpenFileName(self, "Import GeoJSON", str(Path.home()),
                                               "GeoJSON (*.geojson *.json)")[0]
            if not path:
                return None
        image = self.ctx.image()
        try:
            result = read_geojson(path, image_shape=None if image is None else level0_shape(image))
            if not result.features:
                raise DataError(f"{path}: no polygon objects to import")
            name = Path(path).name.split(".")[0] or "imported"
            layer = (self._import_shapes(result, name, image) if self.import_as.currentText() == "Shapes"
                     else self._import_labels(result, name, image))
        except (GenSelfDiffError, ValueError) as e:
            show_error(f"GeoJSON import failed: {readable_error(e)}")
            return None
        if result.warnings:
            more = f" (and {len(result.warnings) - 3} more)" if len(result.warnings) > 3 else ""
            show_warning(f"{Path(path).name}: {len(result.warnings)} warning(s): "
                         + "; ".join(result.warnings[:3]) + more)
        show_info(f"imported {len(result.features)} object(s) from {Path(path).name} as layer {layer.name!r}")
        return layer

    def _import_labels(self, result, name: str, image):
        import shapely

        from ...formats.geojson import features_to_labels

        minx, miny, maxx, maxy = shapely.total_bounds([f.geometry for f in result.features])
        y0, x0 = max(0, math.floor(miny)), max(0, math.floor(minx))
        y1, x1 = math.ceil(maxy), math.ceil(maxx)
        if image is not None:
            y1, x1 = min(y1, level0_shape(image)[0]), min(x1, level0_shape(image)[1])
        h, w = y1 - y0, x1 - x0
        if h * w > MAX_IMPORT_PIXELS:
            raise DataError(f"the objects span {w}x{h} pixels, too large for a Labels layer; import as Shapes")
        shifted = [dataclasses.replace(f, geometry=shapely.transform(f.geometry, lambda c: c - (x0, y0)))
                   for f in result.features]
        labels, classes = features_to_labels(shifted, (h, w))
        meta: dict[str, Any] = {"genselfdiff": {"downsample": 1.0, "offset": [y0, x0]},
                                "classes": {int(k): v for k, v in classes.items()}}
        place = {"translate": (y0, x0)}
        if image is not None:
            meta["genselfdiff"]["image"] = image.name
            place = placement(grid_of(image), 1.0, y0, x0)
            if max(h, w) <= MAX_EDIT:
                meta[EDIT_KEY] = {"image": image.name, "bounds": [y0, x0, h, w], "source": "import", "model": None}
        return self.viewer.add_labels(labels, name=name, opacity=0.6, metadata=meta, **place)

    def _import_shapes(self, result, name: str, image):
        from ...formats.geojson import features_to_shapes

        data, props = features_to_shapes(result)
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
                                           class_name=self._class_name(project.spec.task))
            else:
                layer = self.export_choices.by_name(source)
                if layer is None:
                    raise DataError("choose what to export")
                offset, d = label_grid_of(layer, self.ctx.image())
                n = export_label_array_chunked(level0_data(layer), path, offset=offset, downsample=d,
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
