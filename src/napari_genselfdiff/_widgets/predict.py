"""Dock widget: segment glands or nuclei with a trained model, on screen or over a whole slide.

"Predict field of view" computes only the region in view, at the pyramid level napari shows,
through a tile-caching :class:`~napari_genselfdiff.slide.tiler.FieldOfViewPredictor` (so panning
back is free). "Predict whole slide" runs :func:`~napari_genselfdiff.slide.tiler.predict_slide`
in the background into a resumable zarr store and shows its label pyramid. Either way the
results are Labels layers named after the task ("glands", "nuclei") placed exactly over the
image: same scale and translate, times the level's downsample for a coarser level.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QPushButton, QVBoxLayout,
                            QWidget)

from ..core.errors import DataError, GenSelfDiffError
from ..models import bundled_models
from ._common import (DeviceChooser, JobRunner, LayerChoices, PathEdit, ProgressPanel, Settings, StopsJobsOnClose,
                      format_duration, int_spin, is_rgb_image)
from .finetune import RECENT_MODELS

MAX_VIEW_PIXELS = 4096 * 4096


# ---------------------------------------------------------------------------------------------
# models

def result_name(predictor) -> str:
    """The layer name for a model's objects: the task ("glands", "nuclei") or its first class."""
    return predictor.task if predictor.task in ("glands", "nuclei") else predictor.class_names[1]


# ---------------------------------------------------------------------------------------------
# geometry: layers, levels and what is on screen

def layer_downsamples(layer) -> list[float]:
    """How many level-0 pixels one pixel of each pyramid level spans (1.0 for single-scale)."""
    if not layer.multiscale:
        return [1.0]
    return [float(np.mean(f[-2:])) for f in np.asarray(layer.downsample_factors)]


def layer_slide(layer):
    """The image layer as a :class:`~napari_genselfdiff.slide.reader.Slide` over the very arrays
    napari shows (so predictions line up with the display), named after its file if it has one."""
    import dask.array as da

    from ..slide.reader import Slide

    if not layer.rgb:
        raise DataError(f"layer {layer.name!r} is not an RGB image")
    levels = list(layer.data) if layer.multiscale else [layer.data]
    if levels[0].dtype != np.uint8:
        raise DataError(f"layer {layer.name!r}: expected RGB uint8 pixels, got {levels[0].dtype}")
    levels = [lv if isinstance(lv, da.Array) else da.from_array(lv, chunks=(1024, 1024, -1)) for lv in levels]
    downsamples = layer_downsamples(layer)
    if len(levels) == 1:  # lazily coarsened levels, so a model trained at lower resolution can run
        from ..slide.reader import coarsened_levels
        levels = [levels[0]] + coarsened_levels(levels[0])
        downsamples = [2.0 ** i for i in range(len(levels))]
    path = layer.source.path or layer.metadata.get("path") or layer.name
    return Slide(path=Path(path), levels=levels, downsamples=downsamples, mpp=layer.metadata.get("mpp"))


def visible_region(viewer, layer) -> tuple[int, int, int, int, int]:
    """(level, y, x, h, w): the part of ``layer`` on screen, in pixels of the level napari shows."""
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    half = np.asarray(viewer.canvas.size, float) / (2 * camera.zoom)
    cy, cx = camera.center[-2:]
    corners = [layer.world_to_data((cy + sy * half[0], cx + sx * half[1]))[-2:] for sy in (-1, 1) for sx in (-1, 1)]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    level = layer.data_level if layer.multiscale else 0
    d = layer_downsamples(layer)[level]
    shape = (layer.data[level] if layer.multiscale else layer.data).shape[:2]
    y0, x0 = (max(0, math.floor(v / d)) for v in lo)
    y1, x1 = (min(s, math.ceil(v / d) + 1) for v, s in zip(hi, shape, strict=True))
    if y1 <= y0 or x1 <= x0:
        raise DataError(f"layer {layer.name!r} is not in view")
    if (y1 - y0) * (x1 - x0) > MAX_VIEW_PIXELS:
        raise DataError(f"the view shows {(x1 - x0)}x{(y1 - y0)} pixels of {layer.name!r}: zoom in, "
                        "or use 'Predict whole slide'")
    return level, y0, x0, y1 - y0, x1 - x0


def placement(layer, downsample: float, y0: int = 0, x0: int = 0) -> dict:
    """scale/translate putting a result computed at ``downsample`` (offset y0, x0 in that level's
    pixels) over ``layer``: a level pixel j covers level-0 pixels d*j .. d*j + d - 1, so its centre
    sits at d*j + (d - 1)/2."""
    s, t = np.asarray(layer.scale[-2:], float), np.asarray(layer.translate[-2:], float)
    d = float(downsample)
    return {"scale": tuple(s * d), "translate": tuple(t + s * (d * np.array([y0, x0]) + (d - 1) / 2))}


# ---------------------------------------------------------------------------------------------
# jobs (run in a worker thread; no Qt, no layers)

def load_predictor(model: str, device: str, cached: tuple | None):
    """A TorchPredictor for ``model`` on ``device``, reusing ``cached`` = (key, predictor) unless
    the weights were rewritten since (a model fine-tuned again into the same folder)."""
    from ..core.inference import TorchPredictor
    weights = Path(model, "model.safetensors")
    key = (os.path.abspath(model), device, weights.stat().st_mtime_ns if weights.is_file() else None)
    if cached is not None and cached[0] == key:
        return cached
    return key, TorchPredictor.from_checkpoint(model, device=device)


def fov_job(model: str, device: str, cached: tuple | None, slide, source_id: int,
            region: tuple[int, int, int, int, int], tile: int, overlap: int, fov_cache: tuple | None) -> Iterator[str]:
    """Predict the visible region; returns (predictor cache, FOV cache, region, probs, instances).

    The FOV predictor (and its tile cache) is kept while the model, the image (``source_id``, the
    id of the layer's level-0 array, which the cached slide keeps alive) and the tiling are the same.
    """
    from ..core.evaluation import postprocess
    from ..slide.tiler import FieldOfViewPredictor

    yield "loading the model…"
    cached = load_predictor(model, device, cached)
    predictor = cached[1]
    fov_key = (cached[0], source_id, tile, overlap)
    if fov_cache is None or fov_cache[0] != fov_key:
        fov_cache = (fov_key, FieldOfViewPredictor(predictor, slide, 0, tile, overlap, 256))
    region = at_model_level(slide, region, predictor.mpp)
    level, y, x, h, w = region
    yield f"predicting {w}x{h} pixels at level {level}…"
    probs = fov_cache[1].predict_region(level, y, x, h, w)
    yield "finding objects…"
    _, instances = postprocess(probs, predictor.task)
    return cached, fov_cache, (region, slide.downsamples[level]), probs, instances


def at_model_level(slide, region: tuple[int, int, int, int, int], model_mpp: float | None):
    """The same view in pixels of the pyramid level closest to the model's microns per pixel (a
    half-resolution gland model must not run on level 0); unchanged when either mpp is unknown."""
    level, y, x, h, w = region
    if not model_mpp or not slide.mpp:
        return region
    target = slide.level_for_mpp(model_mpp)
    if target == level:
        return region
    f = slide.downsamples[level] / slide.downsamples[target]
    H, W = slide.levels[target].shape[:2]
    y0, x0 = min(int(y * f), H - 1), min(int(x * f), W - 1)
    y1, x1 = min(H, max(y0 + 1, math.ceil((y + h) * f))), min(W, max(x0 + 1, math.ceil((x + w) * f)))
    return target, y0, x0, y1 - y0, x1 - x0


def slide_job(model: str, device: str, cached: tuple | None, slide, out: str, tile: int, overlap: int,
              batch: int) -> Iterator[Any]:
    """Predict the whole slide into the zarr store ``out`` (resumes a run with the same settings),
    at the pyramid level closest to the model's training resolution when both are known."""
    from ..slide.tiler import predict_slide

    yield "loading the model…"
    cached = load_predictor(model, device, cached)
    predictor = cached[1]
    kind = result_name(predictor) if predictor.task in ("glands", "nuclei") else None
    yield from predict_slide(predictor, slide, out, level="auto", tile=tile, overlap=overlap, batch=batch,
                             tissue=True, class_names=predictor.class_names, postprocess=kind)
    return cached, out, kind


# ---------------------------------------------------------------------------------------------
# the widget

class PredictWidget(StopsJobsOnClose, QWidget):
    """Pick a model and an image layer; predict what is on screen or the whole slide."""

    def __init__(self, napari_viewer, settings: Settings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings or Settings("predict")
        self.runner = JobRunner("prediction", self)
        self.runners = (self.runner,)
        self._predictor: tuple | None = None  # ((model path, device, weights mtime), TorchPredictor)
        self._fov: tuple | None = None  # (key, FieldOfViewPredictor)
        self._image_layer = None
        self._whole_slide = False
        self._build()
        self.progress.follow(self.runner)
        self.runner.event.connect(self._on_event)
        self.runner.result.connect(self._on_result)
        self.runner.stopped.connect(self._on_stopped)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        box = QGroupBox("Model and image")
        form = QFormLayout(box)
        row = QWidget()
        rl = QHBoxLayout(row)
        rl.setContentsMargins(0, 0, 0, 0)
        self.model = QComboBox()
        self.model.setToolTip("a bundled model, a recently trained one, or any checkpoint folder (…)")
        self.model.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model.setMinimumContentsLength(16)
        self.browse = QPushButton("…")
        self.browse.setFixedWidth(30)
        self.browse.setToolTip("choose a checkpoint folder")
        self.browse.clicked.connect(self._browse_model)
        rl.addWidget(self.model, 1)
        rl.addWidget(self.browse)
        form.addRow("Model", row)
        self.image_layer = QComboBox()
        self.image_choices = LayerChoices(self.viewer, is_rgb_image, self.image_layer)
        form.addRow("Image layer", self.image_layer)
        self.device = DeviceChooser()
        form.addRow("Device", self.device)
        self.probability = QCheckBox("also add a probability layer")
        form.addRow("", self.probability)
        lay.addWidget(box)

        box = QGroupBox("Tiling")
        form = QFormLayout(box)
        self.tile = int_spin(64, 2048, 512, 64, "tile size the model sees, in pixels")
        form.addRow("Tile", self.tile)
        self.overlap = int_spin(0, 512, 64, 16, "overlap between neighbouring tiles, in pixels")
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
        buttons = QWidget()
        bl = QHBoxLayout(buttons)
        bl.setContentsMargins(0, 0, 0, 0)
        bl.addWidget(self.slide_btn)
        bl.addWidget(self.cancel_btn)
        lay.addWidget(buttons)
        self.progress = ProgressPanel(with_plot=False)
        lay.addWidget(self.progress)
        lay.addStretch(1)

        self.fill_models()
        for key, w in [("device", self.device.combo), ("probability", self.probability), ("tile", self.tile),
                       ("overlap", self.overlap), ("batch", self.batch), ("out", self.out)]:
            self.settings.bind(key, w)
        self.model.currentIndexChanged.connect(lambda _: self.settings.set("model", self.model_path()))

    # -- models ----------------------------------------------------------------------------

    def fill_models(self) -> None:
        """Bundled models, then recently trained ones, then the remembered choice."""
        self.model.clear()
        for name, path in bundled_models().items():
            self.model.addItem(f"{name} (bundled)", str(path))
        for path in Settings("models", self.settings.path).get(RECENT_MODELS, []):
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
        from qtpy.QtWidgets import QFileDialog
        chosen = QFileDialog.getExistingDirectory(self, "Choose a model (checkpoint folder)", str(Path.home()))
        if chosen:
            self.add_model(chosen)

    # -- actions ---------------------------------------------------------------------------

    def _inputs(self) -> tuple[str, Any]:
        model = self.model_path()
        if not model:
            raise DataError("choose a model: a checkpoint folder with model.safetensors and config.json")
        layer = self.image_choices.by_name(self.image_layer.currentText())
        if layer is None:
            raise DataError("choose the image layer to segment")
        return model, layer

    def predict_view(self) -> None:
        """Segment what is on screen (in the background; usually seconds)."""
        try:
            model, layer = self._inputs()
            region = visible_region(self.viewer, layer)
            slide = layer_slide(layer)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        source_id = id(layer.data[0] if layer.multiscale else layer.data)
        self._start(layer, f"predicting the field of view of {layer.name!r}…", fov_job, model, self.device.device,
                    self._predictor, slide, source_id, region, self.tile.value(), self.overlap.value(), self._fov)

    def predict_slide(self) -> None:
        """Segment the whole image into a zarr store next to the other results (resumable)."""
        try:
            model, layer = self._inputs()
            if not self.out.text():
                raise DataError("choose an output folder for the whole-slide result")
            slide = layer_slide(layer)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        out = Path(self.out.text()) / f"{_safe(layer.name)}-{_safe(Path(model).name)}.zarr"
        self._start(layer, f"predicting {layer.name!r} into {out}…", slide_job, model, self.device.device,
                    self._predictor, slide, str(out), self.tile.value(), self.overlap.value(), self.batch.value())

    def _start(self, layer, text: str, job, *args) -> None:
        self._image_layer, self._whole_slide = layer, job is slide_job
        self.progress.reset(text)
        self._set_running(True)
        self.runner.start(job, *args)

    def _set_running(self, running: bool) -> None:
        for b in (self.fov_btn, self.slide_btn, self.model, self.browse):
            b.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, str):
            self.progress.set_status(ev)
            return
        total = max(int(ev.total), 1)
        self.progress.bar.setRange(0, total)
        self.progress.bar.setValue(min(int(ev.done), total))
        unit = "tiles" if ev.phase == "predict" else "blocks"
        eta = "" if ev.eta_s is None else f" · ETA {format_duration(ev.eta_s)}"
        self.progress.set_status(f"{ev.phase}: {ev.done}/{ev.total} {unit} · "
                                 f"{ev.megapixels_per_s:.2f} Mpx/s{eta}")

    def _on_result(self, result: tuple) -> None:
        if len(result) == 5:
            self._predictor, self._fov, region, probs, instances = result
            self._show_view(region, probs, instances)
        else:
            self._predictor, out, kind = result
            self._show_store(out, kind)

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

    def _show_view(self, region, probs: np.ndarray, instances: np.ndarray) -> None:
        layer, predictor = self._image_layer, self._predictor[1]
        (level, y, x, h, w), d = region
        place = placement(layer, d, y, x)
        name = result_name(predictor)
        self._put_labels(name, instances.astype(np.int32), place, {"downsample": d, "offset": [y, x]})
        self._put_probability(name, (1.0 - probs[0]).astype(np.float32), place)
        n = int(instances.max())
        self.progress.bar.setRange(0, 1)
        self.progress.bar.setValue(1)
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
        import zarr

        group = zarr.open_group(out, mode="r")
        d = float(group.attrs["genselfdiff"]["downsample"])  # of the level the model ran on
        place = placement(self._image_layer, d)
        if kind is not None and f"labels/{kind}" in group:
            lab = group[f"labels/{kind}"]
            levels = [da.from_zarr(lab[k]) for k in sorted(lab.array_keys(), key=int)]
            multiscale = len(levels) > 1
            self._put_labels(kind, levels if multiscale else levels[0], place, {"downsample": d, "offset": [0, 0]},
                             multiscale=multiscale)
        fg = da.from_zarr(group["probabilities"])[1]
        pyramid = [fg] + [fg[::2 ** k, ::2 ** k] for k in range(1, 8) if min(fg.shape) // 2 ** k >= 256]
        multiscale = len(pyramid) > 1
        self._put_probability(kind or "foreground", pyramid if multiscale else fg, place, multiscale)
        self.progress.set_status(f"done: results in {out}" + (f" (layer '{kind}')" if kind else ""))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "image"
