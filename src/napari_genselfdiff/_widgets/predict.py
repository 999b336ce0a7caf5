"""Dock widget: segment glands or nuclei with a trained model, on screen or over a whole slide.

"Predict field of view" computes only the region in view, at the pyramid level napari shows,
through a tile-caching :class:`~napari_genselfdiff.slide.fov.FieldOfViewPredictor` (so panning
back is free). "Predict whole slide" runs :func:`~napari_genselfdiff.slide.tiler.predict_slide`
in the background into a resumable zarr store and shows its label pyramid. Either way the
results are Labels layers named after the task ("glands", "nuclei") placed exactly over the
image: same scale and translate, times the level's downsample for a coarser level.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QPushButton,
                            QWidget)

from ..bundled import bundled_models
from ..core.errors import DataError, GenSelfDiffError
from ..core.inference import PredictorCache, cached_predictor
from ..core.names import safe_name
from ..core.progress import Progress
from .geometry import Region, at_model_level, grid_of, layer_downsamples, placement, view_of, visible_region
from .inputs import DeviceChooser, LayerChoices, PathEdit, int_spin, is_rgb_image, level0_data, row, scrolling_column
from .jobs import JobRunner, StopsJobsOnClose
from .progress import ProgressPanel, format_duration
from .settings import Settings, recent_models

# ---------------------------------------------------------------------------------------------
# layers as the jobs need them


def result_name(predictor) -> str:
    """The layer name for a model's objects: the task ("glands", "nuclei") or its first class."""
    return predictor.task if predictor.task in ("glands", "nuclei") else predictor.class_names[1]


def downsamples_of(layer) -> list[float]:
    """How many level-0 pixels one pixel of each of ``layer``'s levels spans."""
    return layer_downsamples(layer.downsample_factors if layer.multiscale else None)


def layer_slide(layer, mpp: float | None = None):
    """The image layer as a :class:`~napari_genselfdiff.slide.reader.Slide` over the very arrays
    napari shows (so predictions line up with the display), named after its file if it has one.
    Its pixel size is the one read from the file (``layer.metadata["mpp"]``), else ``mpp`` (the
    widget's field), else unknown."""
    import dask.array as da

    from ..slide.reader import Slide, coarsened_levels

    if not layer.rgb:
        raise DataError(f"layer {layer.name!r} is not an RGB image")
    levels = list(layer.data) if layer.multiscale else [layer.data]
    if levels[0].dtype != np.uint8:
        raise DataError(f"layer {layer.name!r}: expected RGB uint8 pixels, got {levels[0].dtype}")
    levels = [lv if isinstance(lv, da.Array) else da.from_array(lv, chunks=(1024, 1024, -1)) for lv in levels]
    downsamples = downsamples_of(layer)
    if len(levels) == 1:  # lazily coarsened levels, so a model trained at lower resolution can run
        levels = [levels[0]] + coarsened_levels(levels[0])
        downsamples = [2.0 ** i for i in range(len(levels))]
    path = layer.source.path or layer.metadata.get("path") or layer.name
    return Slide(path=Path(path), levels=levels, downsamples=downsamples, mpp=layer.metadata.get("mpp") or mpp or None)


def region_on_screen(viewer, layer) -> Region:
    """(level, y, x, h, w): the part of ``layer`` on screen, in pixels of the level napari shows."""
    level = layer.data_level if layer.multiscale else 0
    shape = (layer.data[level] if layer.multiscale else layer.data).shape[:2]
    return visible_region(view_of(viewer), grid_of(layer), level, downsamples_of(layer)[level], shape, layer.name)


# ---------------------------------------------------------------------------------------------
# jobs (run in a worker thread; no Qt, no layers)

@dataclass
class FovKey:
    """What a field-of-view predictor (and its tile cache) is valid for."""

    model: Any  # the predictor cache's key: model path, device, weights' mtime
    source_id: int  # id of the layer's level-0 array (the cached slide keeps it alive)
    tile: int
    overlap: int


@dataclass
class FovResult:
    """What :func:`fov_job` returns: the region predicted and its probabilities and objects."""

    predictor: PredictorCache
    fov: tuple[FovKey, Any]  # (key, FieldOfViewPredictor), kept for the next view
    region: Region  # at the level the model ran on
    downsample: float  # of that level
    probs: np.ndarray
    instances: np.ndarray


@dataclass
class SlideResult:
    """What :func:`slide_job` returns: the finished store and the name of its labels."""

    predictor: PredictorCache
    out: str
    kind: str | None  # the label set ("glands" / "nuclei"), None for other models


def _load(model: str, device: str, cache: PredictorCache | None, tile: int, overlap: int):
    """Load (or reuse) the predictor; the overlap to use (-1: the model's default for ``tile``).
    Yields status lines; returns (cache, overlap)."""
    yield "loading the model…"
    cache = cached_predictor(model, device, cache)
    if overlap < 0:  # only then is the model asked (any tiler Predictor may come with an overlap of the user's)
        overlap, note = cache.predictor.overlap_for(tile)
        if note:
            yield note
    return cache, overlap


def fov_job(model: str, device: str, cache: PredictorCache | None, slide, source_id: int, region: Region,
            tile: int, overlap: int, fov: tuple[FovKey, Any] | None) -> Iterator[str]:
    """Predict the visible region; returns a :class:`FovResult`.

    The FOV predictor (and its tile cache) is kept while the model, the image and the tiling are
    the same.
    """
    from ..core.postprocess import postprocess
    from ..slide.fov import FieldOfViewPredictor

    cache, overlap = yield from _load(model, device, cache, tile, overlap)
    predictor = cache.predictor
    key = FovKey(cache.key, source_id, tile, overlap)
    if fov is None or fov[0] != key:
        fov = (key, FieldOfViewPredictor(predictor, slide, 0, tile, overlap, 256))
    region = at_model_level(region, slide.downsamples, [lv.shape for lv in slide.levels], slide.mpp, predictor.mpp)
    level, y, x, h, w = region
    yield f"predicting {w}x{h} pixels at level {level}…"
    probs = fov[1].predict_region(level, y, x, h, w)
    yield "finding objects…"
    _, instances = postprocess(probs, predictor.task)
    return FovResult(cache, fov, region, slide.downsamples[level], probs, instances)


def slide_job(model: str, device: str, cache: PredictorCache | None, slide, out: str, tile: int, overlap: int,
              batch: int) -> Iterator[Any]:
    """Predict the whole slide into the zarr store ``out`` (resumes a run with the same settings),
    at the pyramid level closest to the model's training resolution when both are known; returns
    a :class:`SlideResult`."""
    from ..slide.tiler import predict_slide

    cache, overlap = yield from _load(model, device, cache, tile, overlap)
    predictor = cache.predictor
    kind = result_name(predictor) if predictor.task in ("glands", "nuclei") else None
    yield from predict_slide(predictor, slide, out, level="auto", tile=tile, overlap=overlap, batch=batch,
                             tissue=True, class_names=predictor.class_names, postprocess=kind)
    return SlideResult(cache, out, kind)


# ---------------------------------------------------------------------------------------------
# the widget

class PredictWidget(QWidget):
    """Pick a model and an image layer; predict what is on screen or the whole slide."""

    def __init__(self, napari_viewer, settings: Settings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings or Settings("predict")
        self.runner = JobRunner("prediction", self)
        self.stops_jobs = StopsJobsOnClose(self, [self.runner])
        self._predictor: PredictorCache | None = None
        self._fov: tuple[FovKey, Any] | None = None  # (key, FieldOfViewPredictor)
        self._image_layer = None
        self._whole_slide = False
        self._build()
        self.progress.follow(self.runner)
        self.runner.event.connect(self._on_event)
        self.runner.result.connect(self._on_result)
        self.runner.stopped.connect(self._on_stopped)

    def _build(self) -> None:
        lay = scrolling_column(self)
        box = QGroupBox("Model and image")
        form = QFormLayout(box)
        self.model = QComboBox()
        self.model.setToolTip("a bundled model, a recently trained one, or any checkpoint folder (…)")
        self.model.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model.setMinimumContentsLength(16)
        self.browse = QPushButton("…")
        self.browse.setFixedWidth(30)
        self.browse.setToolTip("choose a checkpoint folder")
        self.browse.clicked.connect(self._browse_model)
        model_row = row(self.model, self.browse)
        model_row.layout().setStretch(0, 1)
        form.addRow("Model", model_row)
        self.image_layer = QComboBox()
        self.image_choices = LayerChoices(self.viewer, is_rgb_image, self.image_layer)
        form.addRow("Image layer", self.image_layer)
        self.device = DeviceChooser()
        form.addRow("Device", self.device)
        self.mpp = QDoubleSpinBox()
        self.mpp.setRange(0.0, 50.0)
        self.mpp.setDecimals(3)
        self.mpp.setSingleStep(0.05)
        self.mpp.setSuffix(" um/px")
        self.mpp.setSpecialValueText("from the image")
        self.mpp.setToolTip("microns per pixel of the image, used only when its file does not say "
                            "(e.g. 0.25 at 40x, 0.5 at 20x); the model always runs at its own resolution")
        form.addRow("Pixel size", self.mpp)
        self.probability = QCheckBox("also add a probability layer")
        form.addRow("", self.probability)
        lay.addWidget(box)

        box = QGroupBox("Tiling")
        form = QFormLayout(box)
        self.tile = int_spin(64, 2048, 512, 64, "tile size the model sees, in pixels")
        form.addRow("Tile", self.tile)
        self.overlap = int_spin(-1, 512, -1, 8, "overlap between neighbouring tiles, in pixels (a multiple of 8); "
                                "the model's default comes from its receptive field, so tiling cannot change the answer")
        self.overlap.setSpecialValueText("model's default")
        form.addRow("Overlap", self.overlap)
        self.batch = int_spin(1, 64, 4, 1, "tiles per model call (whole slide)")
        form.addRow("Batch", self.batch)
        self.out = PathEdit("dir", "folder for whole-slide results (.zarr)")
        self.out.setText(str(Path.home() / "genselfdiff" / "predictions"))
        form.addRow("Output folder", self.out)
        lay.addWidget(box)

        self.fov_btn = QPushButton("Predict field of view")
        self.fov_btn.setToolTip("segment what is on screen now (fast)")
        self.fov_btn.clicked.connect(self.predict_view)
        self.slide_btn = QPushButton("Predict whole slide")
        self.slide_btn.setToolTip("segment the whole image in the background; resumes an interrupted run")
        self.slide_btn.clicked.connect(self.predict_slide)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.runner.cancel)
        lay.addWidget(self.fov_btn)
        lay.addWidget(row(self.slide_btn, self.cancel_btn))
        self.progress = ProgressPanel(with_plot=False)
        lay.addWidget(self.progress)
        lay.addStretch(1)

        self.fill_models()
        self.settings.bind_all({"device": self.device.combo, "probability": self.probability, "tile": self.tile,
                                "mpp": self.mpp,
                                "overlap": self.overlap, "batch": self.batch, "out": self.out})
        self.model.currentIndexChanged.connect(lambda _: self.settings.set("model", self.model_path()))

    # -- models ----------------------------------------------------------------------------

    def fill_models(self) -> None:
        """Bundled models, then recently trained ones, then the remembered choice."""
        self.model.clear()
        for name, path in bundled_models().items():
            self.model.addItem(f"{name} (bundled)", str(path))
        for path in recent_models(self.settings.path):
            if Path(path, "config.json").is_file():
                self.add_model(path, select=False)
        chosen = self.settings.get("model")
        if chosen and Path(chosen, "config.json").is_file():
            self.add_model(chosen)

    def add_model(self, path: str, select: bool = True) -> None:
        i = self.model.findData(path)
        if i < 0:
            self.model.addItem(Path(path).name, path)
            i = self.model.count() - 1
            self.model.setItemData(i, path, Qt.ItemDataRole.ToolTipRole)
        if select:
            self.model.setCurrentIndex(i)

    def model_path(self) -> str | None:
        return self.model.currentData()

    def _browse_model(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, "Choose a model (checkpoint folder)", str(Path.home()))
        if chosen:
            self.add_model(chosen)

    # -- actions ---------------------------------------------------------------------------

    def _inputs(self) -> tuple[str, Any]:
        model = self.model_path()
        if not model:
            raise DataError("choose a model: a checkpoint folder with model.safetensors and config.json")
        layer = self.image_choices.current()
        if layer is None:
            raise DataError("choose the image layer to segment")
        return model, layer

    def predict_view(self) -> None:
        """Segment what is on screen (in the background; usually seconds)."""
        try:
            model, layer = self._inputs()
            region = region_on_screen(self.viewer, layer)
            slide = self._slide(layer)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        source_id = id(level0_data(layer))
        self._start(layer, f"predicting the field of view of {layer.name!r}…", fov_job, model, self.device.device,
                    self._predictor, slide, source_id, region, self.tile.value(), self.overlap.value(), self._fov)

    def predict_slide(self) -> None:
        """Segment the whole image into a zarr store next to the other results (resumable)."""
        try:
            model, layer = self._inputs()
            if not self.out.text():
                raise DataError("choose an output folder for the whole-slide result")
            slide = self._slide(layer)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        out = Path(self.out.text()) / f"{safe_name(layer.name, 'image')}-{safe_name(Path(model).name, 'image')}.zarr"
        self._start(layer, f"predicting {layer.name!r} into {out}…", slide_job, model, self.device.device,
                    self._predictor, slide, str(out), self.tile.value(), self.overlap.value(), self.batch.value())

    def _slide(self, layer):
        """The layer as a Slide with its pixel size; one warning when nobody knows it."""
        slide = layer_slide(layer, self.mpp.value() or None)
        if slide.mpp is None:
            show_warning(f"{layer.name}: pixel size unknown (not in the file, 'Pixel size' not set): the model "
                         "runs on the image as it is, assuming the model's own resolution")
        return slide

    def _start(self, layer, text: str, job, *args) -> None:
        self._image_layer, self._whole_slide = layer, job is slide_job
        self.progress.reset(text)
        self._set_running(True)
        self.runner.start(job, *args)

    def _set_running(self, running: bool) -> None:
        for b in (self.fov_btn, self.slide_btn, self.model, self.browse):
            b.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    def _on_event(self, ev: Progress | str) -> None:
        if isinstance(ev, str):
            self.progress.set_status(ev)
            return
        self.progress.set_step(ev.step, ev.total)
        unit = "tiles" if ev.stage == "predict" else "blocks"
        eta = "" if ev.eta_s is None else f" · ETA {format_duration(ev.eta_s)}"
        self.progress.set_status(f"{ev.stage}: {ev.step}/{ev.total} {unit} · "
                                 f"{ev.megapixels_per_s:.2f} Mpx/s{eta}")

    def _on_result(self, result: FovResult | SlideResult) -> None:
        self._predictor = result.predictor
        if isinstance(result, FovResult):
            self._fov = result.fov
            self._show_view(result)
        else:
            self._show_store(result.out, result.kind)

    def _on_stopped(self, cancelled: bool) -> None:
        self._set_running(False)
        if cancelled:
            resume = "; 'Predict whole slide' again resumes where it stopped" if self._whole_slide else ""
            self.progress.set_status(f"cancelled{resume}")

    # -- results ---------------------------------------------------------------------------

    def _put_labels(self, name: str, data, place: dict, grid: dict, multiscale: bool = False) -> None:
        """Add (or replace) the Labels layer ``name``; ``grid`` (downsample, offset in level pixels)
        goes into its metadata so the GeoJSON writer can place objects in slide pixels."""
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        meta = {"genselfdiff": {**grid, "image": self._image_layer.name}}
        self.viewer.add_labels(data, name=name, multiscale=multiscale, opacity=0.5, metadata=meta, **place)

    def _show_view(self, result: FovResult) -> None:
        predictor = result.predictor.predictor
        level, y, x, h, w = result.region
        place = placement(grid_of(self._image_layer), result.downsample, y, x)
        name = result_name(predictor)
        self._put_labels(name, result.instances.astype(np.int32), place,
                         {"downsample": result.downsample, "offset": [y, x]})
        self._put_probability(name, (1.0 - result.probs[0]).astype(np.float32), place)
        n = int(result.instances.max())
        self.progress.set_step(1, 1)
        noun = name if n != 1 else predictor.class_names[1]  # "1 gland", "2 glands"
        self.progress.set_status(f"{n} {noun} in the {w}x{h} view at level {level} (layer '{name}')")

    def _put_probability(self, name: str, data, place: dict, multiscale: bool = False) -> None:
        pname = f"{name} probability"
        if pname in self.viewer.layers:
            self.viewer.layers.remove(pname)
        if self.probability.isChecked():
            dtype = (data[0] if multiscale else data).dtype
            limits = (0, 255) if dtype == np.uint8 else (0, 1)  # stored as p * 255; on screen as floats
            self.viewer.add_image(data, name=pname, colormap="inferno", opacity=0.5, blending="additive",
                                  contrast_limits=limits, multiscale=multiscale, **place)

    def _show_store(self, out: str, kind: str | None) -> None:
        import dask.array as da

        from ..slide.store import PredictionStore

        store = PredictionStore.open(out)
        d = store.downsample  # of the level the model ran on
        place = placement(grid_of(self._image_layer), d)
        if kind is not None and kind in store.label_names():
            levels = [da.from_zarr(lv) for lv in store.label_levels(kind)]
            multiscale = len(levels) > 1
            self._put_labels(kind, levels if multiscale else levels[0], place, {"downsample": d, "offset": [0, 0]},
                             multiscale=multiscale)
        fg = store.foreground_dask()
        pyramid = [fg] + [fg[::2 ** k, ::2 ** k] for k in range(1, 8) if min(fg.shape) // 2 ** k >= 256]
        multiscale = len(pyramid) > 1
        self._put_probability(kind or "foreground", pyramid if multiscale else fg, place, multiscale)
        self.progress.set_status(f"done: results in {out}" + (f" (layer '{kind}')" if kind else ""))
