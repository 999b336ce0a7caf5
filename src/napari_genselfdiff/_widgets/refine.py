"""Dock widget: the annotate-and-refine loop on a project folder (see :mod:`..project`).

The loop, one button each: *Edit region* opens the part of the image in view (at most
``MAX_EDIT`` x ``MAX_EDIT`` level-0 pixels around the camera centre) as an ordinary, editable
Labels layer at full resolution -- painting on multiscale labels does not work in napari, which
is why this exists -- prefilled with what is known there: the Predict widget's result layer
("glands" / "nuclei") and, over it, the corrections already accepted into the project's label
store. *Accept region* stores the layer's labels (and the image under them, read at level 0)
through :meth:`Project.accept_region`, which is atomic; the layer stays, renamed with a check
mark, so nothing drawn is ever thrown away, and an error leaves it untouched. *Refine model*
fine-tunes the project's model on every accepted region in the background and shows the Dice
before -> after; the new model is handed to the Predict widget (remembered as its model and
selected in a docked one, which re-predicts the view when asked). *Suggest next region* ranks
tissue regions by the model's uncertainty and flies the camera to the most uncertain one; while
the camera centre stays inside it, *Edit region* opens exactly that region, and accepting or
skipping it marks it reviewed so it is not offered again. GeoJSON import turns QuPath objects
into a Labels or Shapes layer; export writes the project's label store or any Labels layer.

Images without a file (an array added from the console or a plugin) are saved once into the
project as ``images/<layer name>.tif`` and registered as a slide from there, because a project
slide is a file (so the project can be reopened, refined from the CLI and exported later).
"""
from __future__ import annotations

import dataclasses
import getpass
import html
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QPushButton, QScrollArea, QVBoxLayout, QWidget)

from ..core.errors import DataError, GenSelfDiffError
from ..project import Project
from ._common import (DeviceChooser, JobRunner, LayerChoices, PathEdit, ProgressPanel, Settings, StopsJobsOnClose,
                      int_spin, is_labels, is_rgb_image, layer_to_rgb, readable_error)
from .finetune import RECENT_MODELS
from .predict import PredictWidget, layer_slide, load_predictor, placement

#: Largest side, in level-0 pixels, of a region opened for editing.
MAX_EDIT = 2048
#: Layer metadata key marking an editable region (image layer name, bounds, source, model, ...).
EDIT_KEY = "genselfdiff_edit"
ACCEPTED = "✓"
TASKS = ("glands", "nuclei")
#: QuPath class name per task; nuclei are many small detections, glands annotations.
CLASS_NAMES = {"glands": "Gland", "nuclei": "Nucleus"}
OBJECT_TYPES = ("annotation", "detection")
PROJECT_LABELS = "project labels of the image"
MAX_IMPORT_PIXELS = 100_000_000
SUGGESTION_LAYER = "suggested region"


# ---------------------------------------------------------------------------------------------
# geometry: what is on screen, and where a level-0 region of the image lies

def camera_of(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def level0_shape(layer) -> tuple[int, int]:
    data = layer.data[0] if layer.multiscale else layer.data
    return int(data.shape[0]), int(data.shape[1])


def level0_data(layer):
    return layer.data[0] if layer.multiscale else layer.data


def view_bounds(viewer, layer, cap: int = MAX_EDIT) -> tuple[int, int, int, int]:
    """(y, x, h, w) in level-0 pixels of ``layer``: the pixels on screen, clamped to the image;
    a side longer than ``cap`` is cut to ``cap`` pixels centred on the camera.

    Pixel j covers data coordinates [j - 0.5, j + 0.5], so it is on screen when that interval
    meets the visible interval [lo, hi]: j from floor(lo + 0.5) to ceil(hi + 0.5) - 1.
    """
    camera = camera_of(viewer)
    half = np.asarray(viewer.canvas.size, float) / (2 * camera.zoom)
    cy, cx = camera.center[-2:]
    corners = [layer.world_to_data((cy + sy * half[0], cx + sx * half[1]))[-2:] for sy in (-1, 1) for sx in (-1, 1)]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    centre = layer.world_to_data((cy, cx))[-2:]
    sides = []
    for a_world, b_world, c, size in zip(lo, hi, centre, level0_shape(layer), strict=True):
        a, b = max(0, math.floor(a_world + 0.5)), min(size, math.ceil(b_world + 0.5))
        if b - a > cap:
            a = min(max(int(round(c - cap / 2)), 0), size - cap)
            b = a + cap
        sides.append((a, b))
    (y0, y1), (x0, x1) = sides
    if y1 <= y0 or x1 <= x0:
        raise DataError(f"layer {layer.name!r} is not in view: pan to the region to edit")
    return y0, x0, y1 - y0, x1 - x0


def bounds_centre_world(layer, bounds) -> tuple[float, float]:
    """World coordinates of the centre of a level-0 region of ``layer``."""
    y, x, h, w = bounds
    return tuple(float(v) for v in layer.data_to_world((y + (h - 1) / 2, x + (w - 1) / 2))[-2:])


def world_in_bounds(layer, point, bounds) -> bool:
    """Whether the world ``point`` lies on a pixel of the level-0 region ``bounds``."""
    py, px = layer.world_to_data(tuple(point)[-2:])[-2:]
    y, x, h, w = bounds
    return y - 0.5 <= py < y + h - 0.5 and x - 0.5 <= px < x + w - 0.5


def sample_labels(labels_layer, image_layer, bounds) -> np.ndarray | None:
    """The ids of ``labels_layer`` under each level-0 pixel of ``image_layer`` in ``bounds``
    (nearest label pixel, through both layers' scale and translate; 0 where it has no data), or
    None when it does not reach the region. Works for any label grid, e.g. a prediction made on a
    coarser pyramid level (whose pixel centres sit at the centre of the level-0 pixels it spans)."""
    y, x, h, w = bounds
    data = level0_data(labels_layer)
    if data.ndim != 2:
        return None
    s_i, t_i = np.asarray(image_layer.scale[-2:], float), np.asarray(image_layer.translate[-2:], float)
    s_l, t_l = np.asarray(labels_layer.scale[-2:], float), np.asarray(labels_layer.translate[-2:], float)
    idx = [np.floor((t_i[k] + s_i[k] * np.arange(start, start + n) - t_l[k]) / s_l[k] + 0.5).astype(np.int64)
           for k, (start, n) in enumerate(((y, h), (x, w)))]
    valid = [(i >= 0) & (i < data.shape[k]) for k, i in enumerate(idx)]
    if not valid[0].any() or not valid[1].any():
        return None
    rows, cols = idx[0][valid[0]], idx[1][valid[1]]
    block = np.asarray(data[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    out = np.zeros((h, w), np.int32)
    out[np.ix_(valid[0], valid[1])] = block[np.ix_(rows - rows.min(), cols - cols.min())]
    return out


def label_grid_over(layer, image_layer=None) -> tuple[tuple[float, float], float]:
    """(offset, downsample) of a Labels layer's pixel grid in level-0 pixels of the image, for
    the GeoJSON export: from the metadata layers of this plugin carry, else from both layers'
    scale and translate (label pixel j is centred on image data coordinate c = (t_l - t_i)/s_i
    + d*j and spans the pixel edges c + 0.5 -/+ d/2), else world units taken as pixels."""
    from .._writer import label_grid
    info = layer.metadata.get("genselfdiff", {})
    if "downsample" in info or image_layer is None:
        return label_grid({"metadata": layer.metadata, "scale": layer.scale, "translate": layer.translate})
    s_i, t_i = np.asarray(image_layer.scale[-2:], float), np.asarray(image_layer.translate[-2:], float)
    s_l, t_l = np.asarray(layer.scale[-2:], float), np.asarray(layer.translate[-2:], float)
    d = float(np.mean(s_l / s_i))
    offset = ((t_l - t_i) / s_i + 0.5 - d / 2) / d
    return (float(offset[0]), float(offset[1])), d


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _overlap(a, b) -> int:
    """Pixels shared by two (y, x, h, w) boxes."""
    iy = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iy * ix


# ---------------------------------------------------------------------------------------------
# jobs (run in a worker thread; no Qt, no layers)

def refine_job(project: Project, steps: int, device: str, overrides: dict) -> Iterator[Any]:
    """Relay :meth:`Project.refine`; returns its last event. Closing this generator (cancel)
    closes the project's, which saves the partial model and records a 'cancelled' refine."""
    events = project.refine(steps=steps, device=device, **overrides)
    last = None
    try:
        for last in events:
            yield last
    finally:
        events.close()
    return last


def suggest_job(model: str, device: str, cached: tuple | None, project: Project, source: Any, slide_id: str,
                region_size: int, top_k: int) -> Iterator[str]:
    """Rank regions of ``source`` (an array or a Slide) by uncertainty; returns (predictor cache,
    suggestions). A pyramid is scored at the level closest to the model's resolution."""
    yield "loading the model…"
    cached = load_predictor(model, device, cached)
    predictor = cached[1]
    level = source.level_for_mpp(predictor.mpp) if hasattr(source, "level_for_mpp") else 0
    yield f"scoring {region_size}-pixel regions at level {level}…"
    events = project.iter_suggest_regions(predictor, source, region_size=region_size, level=level, top_k=top_k,
                                          slide_id=slide_id)
    try:
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                return cached, stop.value
            yield f"level {level}: {event.message}…"
    finally:
        events.close()


# ---------------------------------------------------------------------------------------------
# the widget

class RefineWidget(StopsJobsOnClose, QWidget):
    """Open a project, correct regions of an image, accept them, refine the model, repeat."""

    def __init__(self, napari_viewer, settings: Settings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings or Settings("refine")
        self.project: Project | None = None
        self.refine_runner = JobRunner("refine", self)
        self.suggest_runner = JobRunner("region suggestion", self)
        self.runners = (self.refine_runner, self.suggest_runner)
        self._predictor: tuple | None = None  # cache of predict.load_predictor
        self._suggestions: list[dict] = []
        self._suggestion: int | None = None  # index of the suggestion on screen
        self._suggestion_done = False  # it was accepted or skipped (marked reviewed)
        self._suggested_image: str | None = None
        self._last_edit = None
        self._verified: set[tuple] = set()  # in-memory layers checked against their saved copy
        self._build()
        self.progress.follow(self.refine_runner)
        self.refine_runner.event.connect(self.progress.show_progress)
        self.refine_runner.result.connect(self._on_refined)
        self.refine_runner.stopped.connect(self._on_refine_stopped)
        self.suggest_runner.event.connect(self.suggest_info.setText)
        self.suggest_runner.result.connect(self._on_suggested)
        self.suggest_runner.failed.connect(lambda e: self.suggest_info.setText(f"failed: {readable_error(e)}"))
        self.suggest_runner.stopped.connect(self._on_suggest_stopped)
        self._update_status()

    # -- layout ------------------------------------------------------------------------------

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        body = QWidget()
        lay = QVBoxLayout(body)
        lay.addWidget(self._build_project())
        lay.addWidget(self._build_annotate())
        lay.addWidget(self._build_suggest())
        lay.addWidget(self._build_refine())
        lay.addWidget(self._build_geojson())
        lay.addStretch(1)
        scroll.setWidget(body)
        outer.addWidget(scroll)
        self._scroll, self._body = scroll, body
        for key, w in [("folder", self.folder), ("task", self.task), ("model", self.model), ("steps", self.steps),
                       ("patch", self.patch), ("batch", self.batch), ("device", self.device.combo),
                       ("repredict", self.repredict), ("region_size", self.region_size),
                       ("import_as", self.import_as), ("object_type", self.object_type)]:
            self.settings.bind(key, w)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        """Tall content scrolls vertically, but the dock is kept wide enough that nothing is cut,
        scroll bar included (asked each time, so it follows the style napari applies)."""
        hint = super().minimumSizeHint()
        width = (self._body.minimumSizeHint().width() + self._scroll.verticalScrollBar().sizeHint().width()
                 + 2 * self._scroll.frameWidth())
        return QSize(max(hint.width(), width), hint.height())

    def _build_project(self) -> QGroupBox:
        box, form, column = _group("Project")
        self.folder = PathEdit("dir", "project folder (new and empty, or an existing project)")
        form.addRow("Folder", self.folder)
        self.task = QComboBox()
        self.task.addItems(TASKS)
        self.task.setToolTip("what a new project segments")
        form.addRow("Task", self.task)
        self.model = PathEdit("dir", "checkpoint folder or bundled model name")
        self.model.setToolTip("the segmentation model a new project starts from ('Use' sets it on an open project)")
        form.addRow("Model", self.model)
        self.create_btn, self.open_btn, self.use_model_btn = (QPushButton(t) for t in ("Create", "Open", "Use model"))
        self.create_btn.setToolTip("create a new project in the folder, with this task and model")
        self.open_btn.setToolTip("open the existing project in the folder")
        self.use_model_btn.setToolTip("make the model above the open project's current model")
        self.create_btn.clicked.connect(lambda: self.create_project())
        self.open_btn.clicked.connect(lambda: self.open_project())
        self.use_model_btn.clicked.connect(lambda: self.use_model())
        form.addRow(_row(self.create_btn, self.open_btn, self.use_model_btn))
        self.status = _info_label("no project open")
        column.addWidget(self.status)
        return box

    def _build_annotate(self) -> QGroupBox:
        box, form, _ = _group("Annotate")
        self.image_layer = _combo()
        self.image_choices = LayerChoices(self.viewer, is_rgb_image, self.image_layer)
        self.image_layer.currentTextChanged.connect(lambda _: self._update_status())
        form.addRow("Image layer", self.image_layer)
        self.edit_btn, self.accept_btn = QPushButton("Edit region"), QPushButton("Accept region")
        self.edit_btn.setToolTip(f"open the region in view (at most {MAX_EDIT} x {MAX_EDIT} pixels) at full "
                                 "resolution as a Labels layer to paint on")
        self.accept_btn.setToolTip("store the selected (or last) edit layer as a correction in the project")
        self.edit_btn.clicked.connect(lambda: self.edit_region())
        self.accept_btn.clicked.connect(lambda: self.accept_region())
        form.addRow(_row(self.edit_btn, self.accept_btn))
        return box

    def _build_suggest(self) -> QGroupBox:
        box, form, column = _group("Where next")
        self.region_size = int_spin(64, 2048, 512, 64, "side of the candidate regions, in pixels of the level scored")
        form.addRow("Region size", self.region_size)
        self.suggest_btn, self.skip_btn = QPushButton("Suggest next region"), QPushButton("Skip")
        self.stop_suggest_btn = QPushButton("Stop")
        self.stop_suggest_btn.setToolTip("stop scoring regions (nothing is lost: no suggestion is made)")
        self.stop_suggest_btn.setEnabled(False)
        self.stop_suggest_btn.clicked.connect(self.suggest_runner.cancel)
        self.suggest_btn.setToolTip("find the tissue regions the current model is least sure about")
        self.skip_btn.setToolTip("mark the suggested region reviewed and show the next one")
        self.skip_btn.setEnabled(False)
        self.suggest_btn.clicked.connect(lambda: self.suggest_regions())
        self.skip_btn.clicked.connect(lambda: self.skip_suggestion())
        form.addRow(_row(self.suggest_btn, self.stop_suggest_btn, self.skip_btn))
        self.suggest_info = _info_label("")
        column.addWidget(self.suggest_info)
        return box

    def _build_refine(self) -> QGroupBox:
        box, form, column = _group("Refine")
        self.steps = int_spin(1, 100_000, 200, 50, "training steps on the accepted regions")
        self.patch = int_spin(32, 1024, 256, 32, "training patch size, in pixels")
        self.batch = int_spin(1, 64, 8, 1, "patches per step")
        form.addRow("Steps", self.steps)
        form.addRow("Patch", _row(self.patch, QLabel("Batch"), self.batch))
        self.device = DeviceChooser()
        form.addRow("Device", self.device)
        self.repredict = QCheckBox("then re-predict the view")
        self.repredict.setToolTip("after refining, the Predict widget (if open on this image) predicts its "
                                  "view again with the new model")
        self.repredict.setChecked(True)
        form.addRow(self.repredict)
        self.refine_btn, self.cancel_btn = QPushButton("Refine model"), QPushButton("Cancel")
        self.refine_btn.setToolTip("fine-tune the project's model on every accepted region")
        self.cancel_btn.setEnabled(False)
        self.refine_btn.clicked.connect(lambda: self.refine())
        self.cancel_btn.clicked.connect(self.refine_runner.cancel)
        form.addRow(_row(self.refine_btn, self.cancel_btn))
        self.progress = ProgressPanel(with_plot=True)
        column.addWidget(self.progress)
        self.dice = _info_label("Dice before → after: –")
        column.addWidget(self.dice)
        return box

    def _build_geojson(self) -> QGroupBox:
        box, form, _ = _group("GeoJSON (QuPath)")
        self.import_as = QComboBox()
        self.import_as.addItems(["Labels", "Shapes"])
        self.import_as.setToolTip("Labels: filled objects (holes kept); Shapes: editable polygons (holes dropped)")
        self.import_btn = QPushButton("Import GeoJSON…")
        self.import_btn.clicked.connect(lambda: self.import_geojson())
        form.addRow("Import as", _row(self.import_as, self.import_btn))
        self.export_source = _combo()
        self.export_source.setToolTip("what to export: the project's accepted labels of the image, or a Labels layer")
        self.export_choices = _ExportChoices(self.viewer, is_labels, self.export_source)
        form.addRow("Export", self.export_source)
        self.object_type = QComboBox()
        self.object_type.addItems(OBJECT_TYPES)
        self.object_type.setToolTip("QuPath object type: annotations (editable, e.g. glands) or detections "
                                    "(many small objects, e.g. nuclei)")
        self.export_btn = QPushButton("Export GeoJSON…")
        self.export_btn.clicked.connect(lambda: self.export_geojson())
        form.addRow("As", _row(self.object_type, self.export_btn))
        return box

    # -- project -----------------------------------------------------------------------------

    def create_project(self) -> Project | None:
        """Create a project in the folder field with the chosen task and (optional) model."""
        try:
            folder = self._folder()
            model = self.model.text() or None
            self._set_project(Project.create(folder, task=self.task.currentText(), model=model))
        except GenSelfDiffError as e:
            show_error(f"cannot create the project: {e}")
            return None
        show_info(f"created project {self.project.folder}")
        return self.project

    def open_project(self) -> Project | None:
        """Open the project in the folder field."""
        try:
            self._set_project(Project.open(self._folder()))
        except GenSelfDiffError as e:
            show_error(f"cannot open the project: {e}")
            return None
        return self.project

    def use_model(self) -> None:
        """Make the model field the open project's current model."""
        try:
            project = self._need_project()
            if not self.model.text():
                raise DataError("enter a checkpoint folder or bundled model name in 'Model'")
            project.set_current_model(self.model.text())
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        self._update_status()

    def _folder(self) -> str:
        if not self.folder.text():
            raise DataError("choose a project folder")
        return self.folder.text()

    def _set_project(self, project: Project) -> None:
        if self.refine_runner.running:
            raise DataError("a refine is running on the open project; wait for it or cancel it first")
        self.project = project
        self.folder.setText(str(project.folder))
        self._suggestions, self._suggestion = [], None
        self._show_suggestion()
        task = project.spec.task
        if task in TASKS:
            self.task.setCurrentText(task)
        self.object_type.setCurrentText("detection" if task == "nuclei" else "annotation")
        self._update_status()

    def _need_project(self) -> Project:
        if self.project is None:
            raise DataError("create or open a project first")
        return self.project

    def _update_status(self) -> None:
        p = self.project
        if p is None:
            self.status.setText("no project open")
            return
        regions = p.regions()
        lines = [f"<b>{html.escape(p.folder.name)}</b> · task {p.spec.task}",
                 f"slides: {len(p.slides())} · accepted regions: {len(regions)}"]
        sid = self._known_slide_id(self._image())
        if sid is not None:
            lines[-1] += f" ({sum(r['slide'] == sid for r in regions)} on this image)"
        model = html.escape(p.current_model.name) if p.current_model else "none (set one with Use model)"
        lines.append(f"model: {model}")
        history = p.history()
        if history:
            last = history[-1]
            dice = f"{_fmt(last.get('before'))} → {_fmt(last.get('after'))}"
            lines.append(f"last refine ({last['status']}): Dice {dice}")
        self.status.setText("<br>".join(lines))
        self.status.setToolTip(str(p.folder))

    # -- image layer and slide ---------------------------------------------------------------

    def _image(self):
        return self.image_choices.by_name(self.image_layer.currentText())

    def _need_image(self):
        layer = self._image()
        if layer is None:
            raise DataError("choose an RGB image layer")
        return layer

    def _layer_file(self, layer) -> Path | None:
        path = layer.source.path or layer.metadata.get("path")
        return Path(path) if path and Path(path).exists() else None

    def _known_slide_id(self, layer) -> str | None:
        """The project slide of ``layer`` if it is registered already (no side effects)."""
        if layer is None or self.project is None:
            return None
        path = self._layer_file(layer) or self.project.folder / "images" / f"{_slug(layer.name)}.tif"
        path = str(Path(path).absolute())
        return next((s["id"] for s in self.project.slides() if s["path"] == path), None)

    def slide_id(self, layer) -> str:
        """The project slide of ``layer``, registering it on first use: its file when it has one,
        else a copy saved in the project (``images/<layer name>.tif``)."""
        project = self._need_project()
        shape = level0_shape(layer)
        mpp = layer.metadata.get("mpp")
        path = self._layer_file(layer)
        if path is None:
            path = project.folder / "images" / f"{_slug(layer.name)}.tif"
            known = self._known_slide_id(layer)
            if known is not None:
                self._check_same_image(layer, project.slide(known))
                return known
            _save_tiff(path, layer_to_rgb(level0_data(layer), layer.name), mpp)
            return project.add_slide(path, mpp=mpp, shape=shape)
        sid = project.add_slide(path, mpp=mpp)
        stored = tuple(project.slide(sid)["shape"])
        if stored != shape:
            raise DataError(f"{path}: the project reads it as {stored[0]}x{stored[1]} pixels but layer "
                            f"{layer.name!r} is {shape[0]}x{shape[1]}; open the file with this plugin's reader")
        return sid

    def _check_same_image(self, layer, slide: dict) -> None:
        """An in-memory layer named like a saved project image must show that image: same shape
        and the same pixels on a sparse grid (checked once per layer array and session)."""
        data = level0_data(layer)
        key = (str(self.project.folder), slide["id"], id(data))
        if key in self._verified:
            return
        from ..slide.reader import open_slide
        shape, stored = level0_shape(layer), tuple(slide["shape"])
        same = stored == shape
        if same:
            step = max(1, max(shape) // 256)
            with open_slide(slide["path"]) as saved:
                same = np.array_equal(np.asarray(saved.levels[0][::step, ::step]),
                                      layer_to_rgb(np.asarray(data[::step, ::step]), layer.name))
        if not same:
            raise DataError(f"the project already holds a different image named {layer.name!r} "
                            f"({slide['path']}, {stored[0]}x{stored[1]} pixels); rename the layer")
        self._verified.add(key)

    def _read_image(self, layer, bounds) -> np.ndarray:
        y, x, h, w = bounds
        return layer_to_rgb(np.asarray(level0_data(layer)[y:y + h, x:x + w]), layer.name)

    # -- editing -----------------------------------------------------------------------------

    def edit_region(self):
        """Open the region in view (or the suggested region, while the camera centre is in it) as
        an editable Labels layer at full resolution, prefilled, with the paint tool selected."""
        try:
            project = self._need_project()
            image = self._need_image()
            bounds = self._suggested_bounds(image) or view_bounds(self.viewer, image)
            sid = self.slide_id(image)
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
                                           **placement(image, 1.0, y, x))
        self._start_painting(layer)
        self._update_status()
        return layer

    def _start_painting(self, layer) -> None:
        self._last_edit = layer
        self.viewer.layers.selection.active = layer
        layer.selected_label = int(np.max(layer.data)) + 1  # a new object
        layer.brush_size = max(5, min(layer.data.shape) // 50)
        layer.mode = "paint"

    def _prediction_layer(self, image):
        """The Predict widget's result layer for ``image`` (named after the project's task)."""
        task = self.project.spec.task
        names = [task] if task in TASKS else [n for n in self.project.class_names[1:2]]
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
        pred = self._prediction_layer(image)
        sampled = None if pred is None else sample_labels(pred, image, bounds)
        if sampled is not None and sampled.any():
            labels, prefill = sampled, ["prediction"]
        store = project.labels_store(sid)
        regions = [r["bounds"] for r in project.regions(sid) if _overlap(r["bounds"], bounds)]
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

    def _edit_layer(self):
        """The edit layer to accept: the selected one, else the last one opened."""
        active = self.viewer.layers.selection.active
        if active is not None and is_labels(active) and EDIT_KEY in active.metadata:
            return active
        if self._last_edit is not None and self._last_edit in self.viewer.layers:
            return self._last_edit
        raise DataError("no region to accept: press 'Edit region' and paint first (or select an edit layer)")

    def accept_region(self, layer=None) -> str | None:
        """Store ``layer`` (default: the selected or last edit layer) as a correction. The layer
        is kept (renamed ``✓ <region id> …``); on any error it is left as it was."""
        try:
            project = self._need_project()
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
            sid = self.slide_id(image)
            pixels = self._read_image(image, bounds)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rid = project.accept_region(sid, pixels, labels, bounds, level=0, author=_user(),
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
        self._reviewed_by_accept(image, bounds)
        self._update_status()
        return rid

    # -- suggestions -------------------------------------------------------------------------

    def suggest_regions(self) -> None:
        """Score the image's tissue regions with the current model in the background."""
        try:
            project = self._need_project()
            image = self._need_image()
            if project.current_model is None:
                raise DataError("the project has no model yet: set one with 'Use model'")
            sid = self.slide_id(image)
            data = level0_data(image)
            in_memory = not image.multiscale and isinstance(data, np.ndarray)
            source = layer_to_rgb(data, image.name) if in_memory else layer_slide(image)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        self._suggested_image = image.name
        self._set_suggesting(True)
        self.suggest_info.setText("starting…")
        self.suggest_runner.start(suggest_job, str(project.current_model), self.device.device, self._predictor,
                                  project, source, sid, self.region_size.value(), 8)

    def _set_suggesting(self, running: bool) -> None:
        self.suggest_btn.setEnabled(not running)
        self.stop_suggest_btn.setEnabled(running)

    def _on_suggest_stopped(self, cancelled: bool) -> None:
        self._set_suggesting(False)
        if cancelled:
            self.suggest_info.setText("stopped: no region suggested")

    def _on_suggested(self, result: tuple) -> None:
        self._predictor, self._suggestions = result
        self._suggestion = 0 if self._suggestions else None
        self._show_suggestion()

    def _current_suggestion(self) -> dict | None:
        if self._suggestion is None or self._suggestion >= len(self._suggestions):
            return None
        return self._suggestions[self._suggestion]

    def _suggested_bounds(self, image) -> tuple[int, int, int, int] | None:
        """The suggestion's bounds while it is on screen for this image (camera centre inside)."""
        s = self._current_suggestion()
        if s is None or self._suggestion_done or image.name != self._suggested_image:
            return None
        return tuple(s["bounds"]) if world_in_bounds(image, camera_of(self.viewer).center, s["bounds"]) else None

    def _show_suggestion(self) -> None:
        """Fly the camera to the current suggestion (centre, zoom to fit) and say what it is."""
        self._suggestion_done = False
        s = self._current_suggestion()
        self.skip_btn.setEnabled(s is not None)
        if s is None:
            self._outline(None, None)
            self.suggest_info.setText("no unreviewed tissue region left to suggest" if self._suggestion is not None
                                      else "")
            return
        image = self.viewer.layers[self._suggested_image] if self._suggested_image in self.viewer.layers else None
        if image is None:
            return
        y, x, h, w = s["bounds"]
        self._outline(image, s["bounds"])
        camera = camera_of(self.viewer)
        camera.center = bounds_centre_world(image, s["bounds"])
        sy, sx = (abs(float(v)) for v in image.scale[-2:])
        ch, cw = self.viewer.canvas.size
        camera.zoom = 0.9 * min(ch / (h * sy), cw / (w * sx))
        self.suggest_info.setText(
            f"suggestion {self._suggestion + 1}/{len(self._suggestions)}: {h}x{w} pixels at {y},{x}, "
            f"uncertainty {s['score']:.3f}. 'Edit region' opens it; accept it or Skip.")

    def _outline(self, image, bounds) -> None:
        """A yellow rectangle around the suggested region (removed when there is none), added
        without taking the layer selection away from the user."""
        if SUGGESTION_LAYER in self.viewer.layers:
            self.viewer.layers.remove(SUGGESTION_LAYER)
        if bounds is None:
            return
        y, x, h, w = bounds
        active = self.viewer.layers.selection.active
        self.viewer.add_shapes([np.array([[y - 0.5, x - 0.5], [y + h - 0.5, x + w - 0.5]])], shape_type="rectangle",
                               name=SUGGESTION_LAYER, edge_color="yellow", face_color="transparent",
                               edge_width=max(h, w) / 100, scale=image.scale, translate=image.translate)
        if active is not None:
            self.viewer.layers.selection.active = active

    def skip_suggestion(self) -> None:
        """Mark the suggestion reviewed (unless accepting did already) and show the next one."""
        s = self._current_suggestion()
        if s is None:
            return
        if not self._suggestion_done:
            try:
                image = self.viewer.layers[self._suggested_image]
                self._need_project().mark_reviewed(self.slide_id(image), s["bounds"])
            except (GenSelfDiffError, KeyError) as e:
                show_error(f"could not mark the region reviewed: {readable_error(e)}")
                return
        self._suggestion += 1
        self._show_suggestion()

    def _reviewed_by_accept(self, image, bounds) -> None:
        """Accepting a region that overlaps the suggestion on screen reviews the suggestion."""
        s = self._current_suggestion()
        if s is None or self._suggestion_done or image.name != self._suggested_image:
            return
        if _overlap(s["bounds"], bounds):
            try:
                self.project.mark_reviewed(self.slide_id(image), s["bounds"])
            except GenSelfDiffError as e:
                show_warning(f"the region was accepted, but the suggestion could not be marked reviewed: {e}")
                return
            self._suggestion_done = True
            self.suggest_info.setText(f"suggestion {self._suggestion + 1}/{len(self._suggestions)} accepted "
                                      "and marked reviewed; Skip shows the next one")

    # -- refining ----------------------------------------------------------------------------

    def refine(self) -> None:
        """Fine-tune the project's model on its accepted regions in the background."""
        try:
            project = self._need_project()
            if not project.regions():
                raise DataError("no accepted regions yet: edit a region, correct it and accept it first")
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        overrides = {"patch": self.patch.value(), "batch": self.batch.value()}
        self.progress.reset(f"refining on {len(project.regions())} accepted region(s)…")
        self._set_refining(True)
        self.refine_runner.start(refine_job, project, self.steps.value(), self.device.device, overrides)

    def _set_refining(self, running: bool) -> None:
        for w in (self.refine_btn, self.create_btn, self.open_btn, self.use_model_btn):
            w.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    def _on_refined(self, last) -> None:
        if last is None or not last.done:
            return
        before, after = (last.metrics or {}).get("before"), (last.metrics or {}).get("after")
        self.dice.setText(f"Dice before → after: <b>{_fmt(before)} → {_fmt(after)}</b>")
        self.dice.setToolTip(last.message)
        self.progress.set_status(last.message)
        self._publish_model(last.checkpoint)

    def _on_refine_stopped(self, cancelled: bool) -> None:
        self._set_refining(False)
        if cancelled:
            self.progress.set_status("cancelled: the partial model is kept under models/ (the current model "
                                     "is unchanged)")
        self._update_status()

    def _publish_model(self, checkpoint: str | None) -> None:
        """Hand the refined model to the Predict widget: remembered as its model and among the
        recent ones (for a Predict widget opened later), selected in any docked one, which then
        re-predicts its view of this image when 're-predict' is on."""
        if not checkpoint:
            return
        shared = Settings("models", self.settings.path)
        shared.set(RECENT_MODELS, [checkpoint] + [p for p in shared.get(RECENT_MODELS, []) if p != checkpoint][:9])
        Settings("predict", self.settings.path).set("model", checkpoint)
        image = self._image()
        for w in self._predict_widgets():
            w.add_model(checkpoint)
            if (self.repredict.isChecked() and not w.runner.running and image is not None
                    and w.image_layer.currentText() == image.name):
                w.predict_view()

    def _predict_widgets(self) -> list[PredictWidget]:
        docked = getattr(self.viewer.window, "dock_widgets", {})
        return [w for w in docked.values() if isinstance(w, PredictWidget)]

    # -- GeoJSON -----------------------------------------------------------------------------

    def import_geojson(self, path: str | None = None):
        """QuPath objects as a Labels layer (rasterised over their bounding box, so a few objects
        on a large slide stay small) or a Shapes layer, placed over the chosen image. A Labels
        import of at most MAX_EDIT x MAX_EDIT pixels can be accepted into the project like an
        edit (source 'import')."""
        from ..export.geojson import read_geojson

        if path is None:
            path = QFileDialog.getOpenFileName(self, "Import GeoJSON", str(Path.home()),
                                               "GeoJSON (*.geojson *.json)")[0]
            if not path:
                return None
        image = self._image()
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

        from ..export.geojson import features_to_labels

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
            place = placement(image, 1.0, y0, x0)
            if max(h, w) <= MAX_EDIT:
                meta[EDIT_KEY] = {"image": image.name, "bounds": [y0, x0, h, w], "source": "import", "model": None}
        return self.viewer.add_labels(labels, name=name, opacity=0.6, metadata=meta, **place)

    def _import_shapes(self, result, name: str, image):
        from ..export.geojson import features_to_shapes

        data, props = features_to_shapes(result)
        # GeoJSON coordinates are pixel edges; napari puts pixel j's centre at data coordinate j
        place = {"translate": (-0.5, -0.5)}
        if image is not None:
            place = placement(image, 1.0, -0.5, -0.5)
        return self.viewer.add_shapes(data, shape_type="polygon", name=name, features=props, face_color="transparent",
                                      edge_color="yellow", edge_width=2, **place)

    def export_geojson(self, path: str | None = None) -> int | None:
        """Write the project's labels of the image, or the chosen Labels layer, as GeoJSON in
        level-0 pixel coordinates; returns the number of objects written."""
        from ..export.geojson import export_label_array_chunked

        source = self.export_source.currentText()
        if path is None:
            path = QFileDialog.getSaveFileName(self, "Export GeoJSON", str(Path.home() / f"{_slug(source)}.geojson"),
                                               "GeoJSON (*.geojson)")[0]
            if not path:
                return None
        object_type = self.object_type.currentText()
        try:
            if source == PROJECT_LABELS:
                project, image = self._need_project(), self._need_image()
                n = project.export_geojson(self.slide_id(image), path, object_type=object_type,
                                           class_name=self._class_name(project.spec.task))
            else:
                layer = self.export_choices.by_name(source)
                if layer is None:
                    raise DataError("choose what to export")
                offset, d = label_grid_over(layer, self._image())
                n = export_label_array_chunked(level0_data(layer), path, offset=offset, downsample=d,
                                               object_type=object_type, class_name=self._class_name(layer.name))
        except (GenSelfDiffError, ValueError, OSError) as e:
            show_error(f"GeoJSON export failed: {readable_error(e)}")
            return None
        show_info(f"wrote {n} {object_type}(s) to {path}")
        return n

    def _class_name(self, task_or_name: str) -> str:
        if task_or_name in CLASS_NAMES:
            return CLASS_NAMES[task_or_name]
        if self.project is not None and self.project.spec.task in CLASS_NAMES:
            return CLASS_NAMES[self.project.spec.task]
        return task_or_name or "Object"


# ---------------------------------------------------------------------------------------------
# small helpers

class _ExportChoices(LayerChoices):
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


def _group(title: str) -> tuple[QGroupBox, QFormLayout, QVBoxLayout]:
    """A titled box: a form for the inputs, then a column for wrapped text below it (a
    word-wrapped label spanning a form row can be given too little height)."""
    box = QGroupBox(title)
    column = QVBoxLayout(box)
    form = QFormLayout()
    column.addLayout(form)
    return box, form, column


def _row(*widgets: QWidget) -> QWidget:
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        lay.addWidget(w)
    return row


def _combo() -> QComboBox:
    """A combo box whose width does not grow with long layer names."""
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)
    return combo


def _info_label(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a container
        return ""


def _save_tiff(path: Path, image: np.ndarray, mpp: float | None) -> None:
    """An in-memory image as a tiled TIFF in the project (atomically), with its mpp when known."""
    import io

    import tifffile

    from ..core.atomic import atomic_open
    buffer = io.BytesIO()
    extra = {}
    if mpp:
        extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(buffer, image, photometric="rgb", compression="zlib", tile=(512, 512), **extra)
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
