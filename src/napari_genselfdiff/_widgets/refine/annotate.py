"""The "Annotate" box: open the region in view as an editable Labels layer at full resolution,
prefilled with what is known there, and accept it into the project.

*Edit region* opens the part of the image in view (at most ``MAX_EDIT`` x ``MAX_EDIT`` level-0
pixels around the camera centre) as an ordinary Labels layer -- painting on multiscale labels
does not work in napari, which is why this exists -- prefilled with the Predict widget's result
layer ("glands" / "nuclei") and, over it, the corrections already accepted into the project's
label store. *Accept region* stores the layer's labels (and the image under them, read at level
0) through :meth:`Project.accept_region`, which is atomic; the layer stays, renamed with a check
mark, so nothing drawn is ever thrown away, and an error leaves it untouched.
"""
from __future__ import annotations

import getpass
import warnings
from typing import Callable

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QGroupBox, QPushButton

from ...core.errors import DataError, GenSelfDiffError
from ...project import Project
from ..geometry import Bounds, box_overlap, grid_of, placement, sample_labels, view_bounds, view_of
from ..inputs import form_and_column, is_labels, level0_data, level0_shape, row
from ..jobs import readable_error
from .context import RefineContext, read_pixels

#: Largest side, in level-0 pixels, of a region opened for editing.
MAX_EDIT = 2048
#: Layer metadata key marking an editable region (image layer name, bounds, source, model, ...).
EDIT_KEY = "genselfdiff_edit"
ACCEPTED = "✓"


def user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a container
        return ""


class AnnotateBox(QGroupBox):
    """Image layer, *Edit region* and *Accept region*.

    ``suggested_bounds(image)`` gives the suggested region while it is on screen (then *Edit
    region* opens exactly it); ``accepted(image layer, bounds)`` is emitted after each accept.
    """

    accepted = Signal(object, object)

    def __init__(self, ctx: RefineContext, suggested_bounds: Callable[[object], Bounds | None]):
        super().__init__("Annotate")
        self.ctx, self.suggested_bounds = ctx, suggested_bounds
        self.last_edit = None
        form, _ = form_and_column(self)
        self.image_layer = ctx.images.widget
        form.addRow("Image layer", self.image_layer)
        self.edit_btn, self.accept_btn = QPushButton("Edit region"), QPushButton("Accept region")
        self.edit_btn.setToolTip(f"open the region in view (at most {MAX_EDIT} x {MAX_EDIT} pixels) at full "
                                 "resolution as a Labels layer to paint on")
        self.accept_btn.setToolTip("store the selected (or last) edit layer as a correction in the project")
        self.edit_btn.clicked.connect(lambda: self.edit_region())
        self.accept_btn.clicked.connect(lambda: self.accept_region())
        form.addRow(row(self.edit_btn, self.accept_btn))

    @property
    def viewer(self):
        return self.ctx.viewer

    # -- editing -----------------------------------------------------------------------------

    def edit_region(self):
        """Open the region in view (or the suggested region, while the camera centre is in it) as
        an editable Labels layer at full resolution, prefilled, with the paint tool selected."""
        try:
            project = self.ctx.need_project()
            image = self.ctx.need_image()
            bounds = self.suggested_bounds(image) or view_bounds(view_of(self.viewer), grid_of(image),
                                                                 level0_shape(image), MAX_EDIT, image.name)
            sid = self.ctx.slide_id(image)
        except GenSelfDiffError as e:
            show_error(str(e))
            return None
        y, x, h, w = bounds
        name = f"edit: {sid} {y},{x},{h},{w}"
        if name in self.viewer.layers:  # the same region again: keep what was painted there
            layer = self.viewer.layers[name]
        else:
            labels, prefill = self._prefill(project, sid, image, bounds)
            meta = {EDIT_KEY: {"image": image.name, "bounds": list(bounds), "source": "correction",
                               "prefill": prefill,
                               "model": str(project.current_model) if "prediction" in prefill else None},
                    "genselfdiff": {"downsample": 1.0, "offset": [y, x], "image": image.name}}
            layer = self.viewer.add_labels(labels, name=name, opacity=0.6, metadata=meta,
                                           **placement(grid_of(image), 1.0, y, x))
        self._start_painting(layer)
        self.ctx.changed.emit()
        return layer

    def _start_painting(self, layer) -> None:
        self.last_edit = layer
        self.viewer.layers.selection.active = layer
        layer.selected_label = int(np.max(layer.data)) + 1  # a new object
        layer.brush_size = max(5, min(layer.data.shape) // 50)
        layer.mode = "paint"

    def _prediction_layer(self, project: Project, image):
        """The Predict widget's result layer for ``image`` (named after the project's task)."""
        task = project.spec.task
        names = [task] if task in ("glands", "nuclei") else project.class_names[1:2]
        for name in names:
            layer = self.viewer.layers[name] if name in self.viewer.layers else None
            if layer is not None and is_labels(layer) and \
                    layer.metadata.get("genselfdiff", {}).get("image", image.name) == image.name:
                return layer
        return None

    def _prefill(self, project: Project, sid: str, image, bounds) -> tuple[np.ndarray, list[str]]:
        """The prediction in ``bounds`` (if any), overwritten by the accepted corrections that
        overlap it (read from the label store; their ids shifted past the prediction's)."""
        y, x, h, w = bounds
        labels = np.zeros((h, w), np.int32)
        prefill = []
        pred = self._prediction_layer(project, image)
        sampled = None if pred is None else sample_labels(level0_data(pred), grid_of(pred), grid_of(image), bounds)
        if sampled is not None and sampled.any():
            labels, prefill = sampled, ["prediction"]
        store = project.labels_store(sid)
        regions = [r["bounds"] for r in project.regions(sid) if box_overlap(r["bounds"], bounds)]
        if store is not None and regions:
            prefill.append("accepted")
            for ry, rx, rh, rw in regions:
                y0, x0 = max(y, ry), max(x, rx)
                y1, x1 = min(y + h, ry + rh, store.shape[0]), min(x + w, rx + rw, store.shape[1])
                if y1 > y0 and x1 > x0:
                    part = np.asarray(store[y0:y1, x0:x1])
                    offset = int(labels.max())
                    labels[y0 - y:y1 - y, x0 - x:x1 - x] = np.where(part > 0, part + offset, 0)
        return labels, prefill

    # -- accepting ---------------------------------------------------------------------------

    def _edit_layer(self):
        """The edit layer to accept: the selected one, else the last one opened."""
        active = self.viewer.layers.selection.active
        if active is not None and is_labels(active) and EDIT_KEY in active.metadata:
            return active
        if self.last_edit is not None and self.last_edit in self.viewer.layers:
            return self.last_edit
        raise DataError("no region to accept: press 'Edit region' and paint first (or select an edit layer)")

    def accept_region(self, layer=None) -> str | None:
        """Store ``layer`` (default: the selected or last edit layer) as a correction. The layer
        is kept (renamed ``✓ <region id> …``); on any error it is left as it was."""
        try:
            project = self.ctx.need_project()
            layer = layer or self._edit_layer()
            info = layer.metadata[EDIT_KEY]
            if info["image"] not in self.viewer.layers:
                raise DataError(f"the image layer {info['image']!r} of {layer.name!r} is gone; add it again")
            image = self.viewer.layers[info["image"]]
            bounds = tuple(info["bounds"])
            labels = np.array(layer.data, copy=True)
            if labels.shape != tuple(bounds[2:]):
                raise DataError(f"layer {layer.name!r} is {labels.shape}, not the {bounds[2]}x{bounds[3]} region "
                                "it was opened for")
            sid = self.ctx.slide_id(image)
            pixels = read_pixels(image, bounds)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rid = project.accept_region(sid, pixels, labels, bounds, level=0, author=user_name(),
                                            model=info.get("model"), source=info.get("source", "correction"))
        except Exception as e:  # noqa: BLE001 -- whatever failed, say so and keep the layer
            where = f" {layer.name!r}" if layer is not None else ""
            show_error(f"could not accept{where}: {readable_error(e)} (the layer is kept; nothing was lost)")
            return None
        for w in caught:
            show_warning(str(w.message))
        y, x, h, w = bounds
        layer.metadata = {**layer.metadata, EDIT_KEY: {**info, "accepted": rid}}
        layer.name = f"{ACCEPTED} {rid} {sid} {y},{x},{h},{w}"
        n = next(r["n_objects"] for r in project.regions(sid) if r["id"] == rid)
        show_info(f"accepted region {rid} of {sid} ({h}x{w} pixels at {y},{x}; {n} objects)")
        self.accepted.emit(image, bounds)
        self.ctx.changed.emit()
        return rid
