"""The "Annotate" box: open the region in view as an editable Labels layer at full resolution,
prefilled with what is known there, and accept it into the project.

*Edit region* opens the part of the image in view (at most ``MAX_EDIT`` x ``MAX_EDIT`` level-0
pixels around the camera centre) as an ordinary Labels layer -- painting on multiscale labels
does not work in napari, which is why this exists -- prefilled with the Predict widget's result
layer ("glands" / "nuclei") and, over it, the corrections already accepted into the project's
label store. A *suggested* region that no prediction layer covers is first predicted with the
project's model, in a worker thread (``runner``); the layer opens when that is done (``opened``).
*Accept region* stores the layer's labels (and the image under them, read at level 0) through
:meth:`Project.accept_region`, which is atomic; the layer stays, renamed with a check mark, so
nothing drawn is ever thrown away, and an error leaves it untouched. Accepting a region with no
object over tissue (``slide.tissue.is_background`` says it is not glass) asks first: a warning,
and the next press stores it. Accepting the same region again replaces the stored one.
"""
from __future__ import annotations

import getpass
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QGroupBox, QPushButton

from ...core.errors import DataError, GenSelfDiffError
from ...project import Project
from ...slide.tissue import is_background
from ..canvas import FOV_KEY
from ..geometry import (Bounds, Grid, box_overlap, covers, grid_of, placement, sample_labels, view_bounds,
                        view_of)
from ..inputs import form_and_column, is_labels, level0_data, level0_shape, row
from ..jobs import JobRunner, readable_error
from ..fov_job import FovResult, fov_job
from ..slide_layer import layer_slide
from .context import RefineContext, read_pixels, segmentation_model

#: Largest side, in level-0 pixels, of a region opened for editing.
MAX_EDIT = 2048
#: Layer metadata key marking an editable region (image layer name, bounds, source, model, ...).
EDIT_KEY = "genselfdiff_edit"
ACCEPTED = "✓"
#: Tiling of the prediction that prefills a suggested region (the Predict widget's defaults).
PREFILL_TILE, PREFILL_OVERLAP = 512, 64


@dataclass
class EditRequest:
    """A region to open for editing: its project, slide id, image layer, bounds and layer name."""

    project: Project
    sid: str
    image: Any
    bounds: Bounds
    name: str


def user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a container
        return ""


class AnnotateBox(QGroupBox):
    """Image layer, *Edit region* and *Accept region*.

    ``suggested_bounds(image)`` gives the suggested region while it is on screen (then *Edit
    region* opens exactly it); ``device()`` names the device a suggested region is predicted on.
    ``accepted(image layer, bounds)`` is emitted after each accept, ``opened(layer)`` when an
    edit layer opens (at once, or once the prediction of a suggested region is done).
    """

    accepted = Signal(object, object)
    opened = Signal(object)

    def __init__(self, ctx: RefineContext, suggested_bounds: Callable[[object], Bounds | None],
                 device: Callable[[], str] = lambda: "auto"):
        super().__init__("Annotate")
        self.ctx, self.suggested_bounds, self.device = ctx, suggested_bounds, device
        self.last_edit = None
        self.runner = JobRunner("region prediction", self)
        self._predictor = None  # the predictor cache, kept between predictions
        self._pending: EditRequest | None = None
        form, _ = form_and_column(self)
        self.image_layer = ctx.images.widget
        form.addRow("Image layer", self.image_layer)
        self.edit_btn, self.accept_btn = QPushButton("Edit region"), QPushButton("Accept region")
        self.edit_btn.setToolTip(f"open the region in view (at most {MAX_EDIT} x {MAX_EDIT} pixels) at full "
                                 "resolution as a Labels layer to paint on")
        self.accept_btn.setToolTip("store the selected (or last) edit layer as a correction in the project")
        self.clear_btn = QPushButton("Clear region")
        self.clear_btn.setToolTip("remove every object from the edit layer (a region with none, e.g. a prefilled "
                                  "prediction on keratin or stroma); paint what is there, or accept it empty")
        self.edit_btn.clicked.connect(lambda: self.edit_region())
        self.accept_btn.clicked.connect(lambda: self.accept_region())
        self.clear_btn.clicked.connect(lambda: self.clear_region())
        form.addRow(row(self.edit_btn, self.clear_btn, self.accept_btn))
        self.runner.result.connect(self._on_predicted)
        self.runner.failed.connect(self._on_prediction_failed)
        self.runner.stopped.connect(self._on_prediction_stopped)

    @property
    def viewer(self):
        return self.ctx.viewer

    # -- editing -----------------------------------------------------------------------------

    def edit_region(self):
        """Open the region in view (or the suggested region, while the camera centre is in it) as
        an editable Labels layer at full resolution, prefilled, with the paint tool selected.

        Returns the layer, or None when nothing opened yet: on an error (shown), or while a
        suggested region no prediction covers is predicted first (``opened`` follows)."""
        if self.runner.running:
            show_info("the region is still being predicted; its edit layer opens when that is done")
            return None
        try:
            project = self.ctx.need_project()
            image = self.ctx.need_image()
            suggested = self.suggested_bounds(image)
            bounds = suggested or view_bounds(view_of(self.viewer), grid_of(image), level0_shape(image),
                                              MAX_EDIT, image.name)
            sid = self.ctx.slide_id(image)
        except GenSelfDiffError as e:
            show_error(str(e))
            return None
        y, x, h, w = bounds
        request = EditRequest(project, sid, image, tuple(bounds), f"edit: {sid} {y},{x},{h},{w}")
        if request.name in self.viewer.layers:  # the same region again: keep what was painted there
            return self._show(self.viewer.layers[request.name])
        pred = self._prediction_layer(project, image)
        regions = None if pred is None else pred.metadata.get(FOV_KEY, {}).get("regions")  # gathered views
        if suggested is not None and not (pred is not None and covers(level0_data(pred).shape, grid_of(pred),
                                                                       grid_of(image), bounds, regions)):
            model = segmentation_model(project)
            if model is not None and self._predict(request, model):
                return None
        sampled = None if pred is None else sample_labels(level0_data(pred), grid_of(pred), grid_of(image), bounds)
        return self._open(request, sampled)

    def _open(self, request: EditRequest, predicted: np.ndarray | None):
        """Add the edit layer of ``request``, prefilled with ``predicted`` (labels over its bounds,
        or None) and the accepted corrections, and start painting on it."""
        project, image, (y, x, h, w) = request.project, request.image, request.bounds
        labels, prefill = self._prefill(project, request.sid, request.bounds, predicted)
        meta = {EDIT_KEY: {"image": image.name, "bounds": [y, x, h, w], "source": "correction",
                           "prefill": prefill,
                           "model": str(project.current_model) if "prediction" in prefill else None},
                "genselfdiff": {"downsample": 1.0, "offset": [y, x], "image": image.name}}
        layer = self.viewer.add_labels(labels, name=request.name, opacity=0.6, metadata=meta,
                                       **placement(grid_of(image), 1.0, y, x))
        if not prefill and segmentation_model(project) is None:  # the few-label start (a backbone)
            one = {"glands": "gland", "nuclei": "nucleus"}.get(project.spec.task, "object")
            show_info(f"the project's model segments nothing yet: paint every {one} in this region (what is left "
                      "unpainted is background), accept it, and Refine after a few regions")
        return self._show(layer)

    def _show(self, layer):
        self._start_painting(layer)
        self.ctx.changed.emit()
        self.opened.emit(layer)
        return layer

    # -- predicting a suggested region ---------------------------------------------------------

    def _predict(self, request: EditRequest, model: str) -> bool:
        """Predict ``request``'s region with ``model`` in a worker thread (the layer opens after);
        False when that cannot start (said so; the region opens without a prediction)."""
        try:
            slide = layer_slide(request.image)
        except GenSelfDiffError as e:
            show_warning(f"the region opens without a prediction: {e}")
            return False
        y, x, h, w = request.bounds
        self._pending = request
        self.edit_btn.setEnabled(False)
        show_info(f"predicting the suggested {h}x{w} region with the project's model; "
                  "its edit layer opens prefilled when that is done")
        self.runner.start(fov_job, model, self.device(), self._predictor, slide, id(level0_data(request.image)),
                          (0, y, x, h, w), PREFILL_TILE, PREFILL_OVERLAP, None)
        return True

    def _on_predicted(self, result: FovResult) -> None:
        self._predictor = result.predictor
        request, self._pending = self._pending, None
        if request is None or request.image not in self.viewer.layers or request.name in self.viewer.layers:
            return
        _, ry, rx, _, _ = result.region
        grid = Grid(**placement(grid_of(request.image), result.downsample, ry, rx))
        self._open(request, sample_labels(result.instances, grid, grid_of(request.image), request.bounds))

    def _on_prediction_failed(self, exc: BaseException) -> None:
        """The failure was shown already; open the region with what is known without it."""
        request, self._pending = self._pending, None
        if request is not None and request.image in self.viewer.layers and request.name not in self.viewer.layers:
            show_warning(f"the region opens without a prediction ({readable_error(exc)})")
            self._open(request, None)

    def _on_prediction_stopped(self, cancelled: bool) -> None:
        self.edit_btn.setEnabled(True)
        if cancelled:
            self._pending = None

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

    @staticmethod
    def _prefill(project: Project, sid: str, bounds, predicted: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
        """The prediction in ``bounds`` (``predicted``, if it has any object), overwritten inside
        the accepted regions that overlap it by their corrections (read from the label store,
        renumbered 1.. past the prediction's ids)."""
        y, x, h, w = bounds
        labels = np.zeros((h, w), np.int32)
        prefill = []
        if predicted is not None and predicted.any():
            labels, prefill = np.asarray(predicted, np.int32), ["prediction"]
        store = project.labels_store(sid)
        regions = [r["bounds"] for r in project.regions(sid) if box_overlap(r["bounds"], bounds)]
        if store is not None and regions:
            prefill.append("accepted")
            part = np.zeros((h, w), np.int64)
            y1, x1 = min(y + h, store.shape[0]), min(x + w, store.shape[1])
            part[:y1 - y, :x1 - x] = np.asarray(store[y:y1, x:x1])
            inside = np.zeros((h, w), bool)
            for ry, rx, rh, rw in regions:
                inside[max(ry - y, 0):max(ry + rh - y, 0), max(rx - x, 0):max(rx + rw - x, 0)] = True
            ids = np.unique(part[inside & (part > 0)])
            renumbered = np.where(part > 0, np.searchsorted(ids, part) + 1 + int(labels.max()), 0)
            labels = np.where(inside, renumbered, labels).astype(np.int32)
        return labels, prefill

    def clear_region(self, layer=None):
        """Empty the selected (or last) edit layer: its prefilled objects were wrong. Accepting it
        as it is then stores a region with no objects without asking again; returns the layer."""
        try:
            layer = layer or self._edit_layer()
        except GenSelfDiffError as e:
            show_error(str(e))
            return None
        n = np.count_nonzero(np.unique(layer.data))  # object ids
        layer.data = np.zeros_like(layer.data)
        layer.metadata = {**layer.metadata, EDIT_KEY: {**layer.metadata[EDIT_KEY], "empty_ok": True}}
        self._start_painting(layer)
        show_info(f"cleared {n} object(s) from {layer.name!r}: paint what is there, or accept it as a region with none")
        return layer

    # -- accepting ---------------------------------------------------------------------------

    def _edit_layer(self):
        """The edit layer to accept: the selected one, else the last one opened."""
        active = self.viewer.layers.selection.active
        if active is not None and is_labels(active) and EDIT_KEY in active.metadata:
            return active
        if self.last_edit is not None and self.last_edit in self.viewer.layers:
            return self.last_edit
        raise DataError("no region to accept: press 'Edit region' and paint first (or select an edit layer)")

    def accept_region(self, layer=None, *, empty_ok: bool = False) -> str | None:
        """Store ``layer`` (default: the selected or last edit layer) as a correction. The layer
        is kept (renamed ``✓ <region id> …``); on any error it is left as it was.

        A layer with no object over tissue is not stored at the first press: a warning asks to
        paint the objects or press again (the layer remembers it was asked), unless ``empty_ok``.
        Returns the new region's id, or None when nothing was stored."""
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
            if not labels.any() and not (empty_ok or info.get("empty_ok")) and not is_background(pixels):
                layer.metadata = {**layer.metadata, EDIT_KEY: {**info, "empty_ok": True}}
                show_warning(f"{layer.name!r} has no objects, but the region shows tissue: paint its objects, "
                             "or press 'Accept region' again to store it as a region with none")
                return None
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
        record = next(r for r in project.regions(sid) if r["id"] == rid)
        replaced = f"; it replaces {', '.join(record['replaces'])}" if record.get("replaces") else ""
        show_info(f"accepted region {rid} of {sid} ({h}x{w} pixels at {y},{x}; {record['n_objects']} objects"
                  f"{replaced})")
        self.accepted.emit(image, bounds)
        self.ctx.changed.emit()
        return rid
