"""Dock widget: segment glands or nuclei with a trained model, on screen or over a whole slide.

"Predict field of view" computes only the region in view, at the pyramid level closest to the
model's resolution, through a tile-caching :class:`~napari_genselfdiff.slide.fov.FieldOfViewPredictor`
(so panning back is free); each view's result is gathered with the earlier ones into one
growing layer (:mod:`.canvas`), so moving around keeps what was predicted. "Predict whole
slide" runs :func:`~napari_genselfdiff.slide.tiler.predict_slide` in the background (or, by
"Run on", the same block graph as the CLI on a Dask cluster: :mod:`.whole_slide`) into a
resumable zarr store and shows its label pyramid. Either way the results are Labels layers
named after the task ("glands", "nuclei") placed exactly over the image: same scale, translate
and units (microns when the pixel size is known), times the level's downsample for a coarser
level; objects are drawn in their class's colour and the legend (:mod:`.legend`) says what
the colours mean. The model chooser (:mod:`.models`) says what each model is.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QGroupBox, QPushButton, QWidget

from ..bundled import bundled_models
from ..core.errors import DataError, GenSelfDiffError
from ..core.inference import PredictorCache
from ..core.names import safe_name
from ..core.progress import Progress
from .canvas import FOV_KEY, LABELS, GatheredViews
from .fov_job import FovKey, FovResult, fov_job, region_on_screen
from .geometry import grid_of, placement, scale_bar_of
from .inputs import (DeviceChooser, LayerChoices, PathEdit, PrecisionChooser, explain_labels, int_spin, is_rgb_image,
                     level0_data, pinned_footer, pixel_size_spin, row, scrolling_column,
                     why_not_rgb)
from .jobs import JobRunner, StopsJobsOnClose
from .objects import ObjectControls
from .pixelsize import pixel_size_of
from .readers import prefer_our_reader, say_reader_preference
from .legend import LEGEND_KEY, PROBABILITY_COLORMAP, Legend, classes_style, instance_style
from .measure import Measurements
from .models import ModelChooser, fmt_mpp
from .progress import ProgressPanel, format_duration
from .settings import Settings, recent_models
from .slide_layer import layer_slide
from .whole_slide import RunOnChooser, SlideResult, kept_after_cancel, relabel_job, result_name, slide_job

# ---------------------------------------------------------------------------------------------
# the widget

class PredictWidget(QWidget):
    """Pick a model and an image layer; predict what is on screen or the whole slide."""

    def __init__(self, napari_viewer, settings: Settings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings or Settings("predict")
        self.runner = JobRunner("prediction", self)
        # what the measurements say (a saved table, a whole slide's parts measured) never covers a running job's
        self.measurements = Measurements(napari_viewer, self, lambda text: self.runner.running or
                                         self.progress.set_status(text))
        self.objects = ObjectControls(self, self._relabelled, self.apply_to_slide)
        self.stops_jobs = StopsJobsOnClose(self, [self.runner, *self.measurements.runners, self.objects.runner])
        self._predictor: PredictorCache | None = None
        self._fov: tuple[FovKey, Any] | None = None  # (key, FieldOfViewPredictor)
        self._image_layer = None
        self._last_fov: FovResult | None = None  # what the Objects controls find objects in again
        self._job = None  # the job running (or last run)
        self._slide_layer = None  # the image of the last whole-slide result
        self._blocks = (0, 0)
        self._shown: dict[str, Any] = {}  # layer name -> the layer this widget added under it last
        self.views = GatheredViews(napari_viewer)  # the fields of view gathered per result layer
        say_reader_preference(prefer_our_reader())  # File > Open gives slides to our reader
        self._scale_bar_shown = False
        self._build()
        explain_labels(self)  # a row's label explains its field on hover, as the field does
        self.progress.follow(self.runner)
        self.runner.event.connect(self._on_event)
        self.runner.result.connect(self._on_result)
        self.runner.stopped.connect(self._on_stopped)

    def _build(self) -> None:
        lay = scrolling_column(self)
        box = QGroupBox("Model and image")
        form = QFormLayout(box)
        self.chooser = ModelChooser()
        self.model, self.browse = self.chooser.combo, self.chooser.browse
        form.addRow("Model", self.chooser)
        self.image_layer = QComboBox()
        self.image_layer.setToolTip("the H&E image layer to segment")
        self.image_choices = LayerChoices(self.viewer, is_rgb_image, self.image_layer, why_not_rgb)
        form.addRow("Image layer", self.image_layer)
        self.device = DeviceChooser()
        form.addRow("Device", self.device)
        self.precision = PrecisionChooser(self.device)
        form.addRow("Precision", self.precision)
        self.mpp = pixel_size_spin("microns per pixel of the image, used only when its file does not say "
                                   "(e.g. 0.25 at 40x, 0.5 at 20x); the model always runs at its own resolution")
        form.addRow("Pixel size", self.mpp)
        self.probability = QCheckBox("also add a probability layer")
        form.addRow("", self.probability)
        self.stain = QCheckBox("normalise the stain to the model's training images")
        self.stain.setToolTip("move the image's tissue colours to the nearest stain of the model's training images "
                              "first (Reinhard, in CIE Lab): for slides stained unlike the training sets; on images "
                              "like them it costs 0.01-0.08 AJI, so it is off by default")
        form.addRow("", self.stain)
        lay.addWidget(box)

        box = QGroupBox("Tiling")
        form = QFormLayout(box)
        self.tile = int_spin(64, 2048, 512, 64, "the model sees the image in square tiles of this many pixels "
                             "(of the model's resolution), blended where they overlap: larger tiles take more "
                             "memory, not a different answer")
        form.addRow("Tile", self.tile)
        self.overlap = int_spin(-1, 512, -1, 8, "overlap between neighbouring tiles, in pixels of the model's "
                                "resolution (a multiple of 8); "
                                "the model's default comes from its receptive field, so tiling cannot change the answer")
        self.overlap.setSpecialValueText("model's default")
        form.addRow("Overlap", self.overlap)
        self.batch = int_spin(1, 64, 4, 1, "most tiles per model call (whole slide); fewer while one call would "
                              "take over half a second, so Cancel stays quick")
        form.addRow("Batch", self.batch)
        self.out = PathEdit("dir", "folder for whole-slide results (.zarr)")
        self.out.setText(str(Path.home() / "genselfdiff" / "predictions"))
        form.addRow("Output folder", self.out)
        self.run_on = RunOnChooser()
        form.addRow("Run on", self.run_on)
        lay.addWidget(box)

        self.fov_btn = QPushButton("Predict field of view")
        self.fov_btn.setToolTip("segment what is on screen now: seconds for a zoomed-in screen on a laptop CPU "
                                "(the tiles it needs, kept for panning back); zoomed out over a slide, minutes")
        self.fov_btn.clicked.connect(self.predict_view)
        self.slide_btn = QPushButton("Predict whole slide")
        self.slide_btn.setToolTip("segment the whole image in the background; resumes an interrupted run")
        self.slide_btn.clicked.connect(self.predict_slide)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        footer = pinned_footer(self)  # in sight however little height the dock gets (stacked with others)
        footer.addWidget(self.fov_btn)
        footer.addWidget(row(self.slide_btn, self.cancel_btn))
        self.progress = ProgressPanel(with_plot=False)
        footer.addWidget(self.progress)
        lay.addWidget(self.objects.box)
        self.legend = Legend(self.viewer)
        lay.addWidget(self.legend)
        self.measure_btn = self.measurements.button
        lay.addWidget(row(self.measure_btn, self.measurements.table_button, self.measurements.count_button))
        lay.addStretch(1)

        self.fill_models()
        self.settings.bind_all({"device": self.device.combo, "precision": self.precision.combo,
                                "probability": self.probability, "stain": self.stain, "tile": self.tile,
                                "mpp": self.mpp, "model": self.chooser,
                                "overlap": self.overlap, "batch": self.batch, "out": self.out,
                                "run_on": self.run_on.combo, "workers": self.run_on.workers,
                                "scheduler": self.run_on.scheduler})

    # -- models ----------------------------------------------------------------------------

    def fill_models(self) -> None:
        """Bundled models, then recently trained ones (the remembered choice is restored by the
        settings binding)."""
        self.chooser.fill(bundled_models(), recent_models(self.settings.path))

    def add_model(self, path: str, select: bool = True) -> None:
        self.chooser.add_model(path, select)

    def model_path(self) -> str | None:
        return self.chooser.model_path()

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
                    self._predictor, slide, source_id, region, self.tile.value(), self.overlap.value(), self._fov,
                    precision=self.precision.precision, overrides=self.objects.overrides(),
                    stain=self.stain.isChecked())

    def predict_slide(self) -> None:
        """Segment the whole image into a zarr store next to the other results (resumable)."""
        try:
            model, layer = self._inputs()
            if not self.out.text():
                raise DataError("choose an output folder for the whole-slide result")
            slide = self._slide(layer)
            run_on = self.run_on.value()
            run_on.check(slide)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        out = Path(self.out.text()) / f"{safe_name(layer.name, 'image')}-{safe_name(Path(model).name, 'image')}.zarr"
        self._start(layer, f"predicting {layer.name!r} into {out}…", slide_job, model, self.device.device,
                    self._predictor, slide, str(out), self.tile.value(), self.overlap.value(), self.batch.value(),
                    run_on, precision=self.precision.precision, stain=self.stain.isChecked())

    def apply_to_slide(self, options: dict) -> None:
        """Find the objects of the whole slide shown last again with ``options`` (the Objects
        controls'), from its stored probabilities: the model does not run again."""
        out, kind = self.objects.slide
        if self._slide_layer not in self.viewer.layers:
            show_error(f"the image of {Path(out).name} is no longer open: open it, or predict its whole slide again")
            return
        self.measurements.stop_store()  # its labels are about to be replaced
        self._start(self._slide_layer, f"finding the {kind} of {Path(out).name} again…", relabel_job,
                    self._predictor, out, kind, options)

    def _slide(self, layer):
        """The layer as a Slide with its pixel size (asked once when the file does not say); one
        warning when nobody knows it."""
        slide = layer_slide(layer, pixel_size_of(self, layer, self.mpp.value() or None))
        if slide.mpp is None:
            show_warning(f"{layer.name}: pixel size unknown (not in the file, 'Pixel size' not set): the model "
                         "runs on the image as it is, assuming the model's own resolution")
        return slide

    def _start(self, layer, text: str, job, *args, **kwargs) -> None:
        self._image_layer, self._job = layer, job
        self._blocks = (0, 0)  # (finished, all) output blocks of a whole slide, as its events say
        self.progress.reset(text)
        self._set_running(True)
        self.runner.start(job, *args, **kwargs)

    def cancel(self) -> None:
        """Stop the running prediction after its current model call (the store keeps its blocks)."""
        if self.runner.running:
            self.runner.cancel()
            self.cancel_btn.setEnabled(False)
            self.progress.set_status("cancelling…")

    def _set_running(self, running: bool) -> None:
        for b in (self.fov_btn, self.slide_btn, self.model, self.browse, self.objects.slide_btn):
            b.setEnabled(not running and (b is not self.objects.slide_btn or self.objects.slide is not None))
        self.cancel_btn.setEnabled(running)

    def _on_event(self, ev: Progress | str) -> None:
        if not isinstance(ev, str) and ev.blocks_total:
            self._blocks = (ev.blocks_done, ev.blocks_total)
        if self.runner.cancelling:  # the line keeps saying "cancelling…"
            return
        if isinstance(ev, str):
            self.progress.set_status(ev)
            return
        self.progress.set_step(ev.step, ev.total)
        unit = "tiles" if ev.stage == "predict" else "blocks"  # 'cluster' (see .whole_slide) counts blocks
        eta = "" if ev.eta_s is None else f" · ETA {format_duration(ev.eta_s)}"
        self.progress.set_status(f"{ev.stage}: {ev.step}/{ev.total} {unit} · "
                                 f"{ev.megapixels_per_s:.2f} Mpx/s{eta}")

    def _on_result(self, result: FovResult | SlideResult) -> None:
        self._predictor = result.predictor
        if isinstance(result, FovResult):
            self._fov = result.fov
            if result.no_glands:  # a pathologist expects no gland outlines on tissue without glands
                self.progress.set_step(1, 1)
                self.progress.set_status(f"no glands here: nothing added ({result.no_glands})")
            else:
                self._show_view(result)
                self._last_fov = result
                self.objects.result(result.predictor.key, result.predictor.predictor.task, result.model_values,
                                    result.probs, result.mpp, result.view)
        else:
            self._show_store(result.out, result.kind, result.no_glands)
            if result.kind and not result.no_glands and result.kind in self._shown:
                self._slide_layer = self._image_layer
                self.objects.slide_result(result.predictor.key, result.kind, result.model_values, result.values,
                                          result.out, result.mpp)
                if self._job is relabel_job:
                    self.progress.set_status(f"{self.progress.status.text()} · found again with threshold "
                                             f"{result.values['threshold']:.2f}, smallest {result.values['min_size']} px")
                self.measurements.measure_store(self._shown[result.kind], result.out, result.kind,
                                                layer_slide(self._image_layer).levels, self.progress.status.text())

    def _on_stopped(self, cancelled: bool) -> None:
        self._set_running(False)
        if cancelled:
            self.progress.set_status("cancelled" + kept_after_cancel(self._job, self._blocks))

    # -- results ---------------------------------------------------------------------------

    def _put_labels(self, name: str, data, place: dict, grid: dict, multiscale: bool = False,
                    style: dict | None = None, meta: dict | None = None):
        """Add (or update, see :meth:`_update_layer`) the Labels layer ``name``, drawn in
        ``style`` (:mod:`.legend`: colours, and the legend entry); returns it. ``grid``
        (downsample, offset in level pixels) goes into its metadata so the GeoJSON writer can
        place objects in slide pixels; ``meta`` adds to it (e.g. the gathered views)."""
        style = dict(style or {})
        slide_mpp = grid_of(self._image_layer).mpp  # microns per full-resolution pixel: the GeoJSON's µm
        meta = {"genselfdiff": {**grid, "image": self._image_layer.name, **({"mpp": slide_mpp} if slide_mpp else {})},
                **(meta or {})}
        if "legend" in style:
            meta[LEGEND_KEY] = style.pop("legend")
        if self._update_layer(name, data, place, multiscale, metadata=meta):
            return self._shown[name]
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        contour = style.pop("contour", 0)  # not an add_labels keyword
        opacity = style.pop("opacity", 0.5)
        layer = self.viewer.add_labels(data, name=name, multiscale=multiscale, opacity=opacity, metadata=meta,
                                       **style, **place)
        layer.contour = contour
        self._shown[name] = layer
        return layer

    def _update_layer(self, name: str, data, place: dict, multiscale: bool, **attrs: Any) -> bool:
        """Give the layer ``name`` new data in place, when it is the one this widget added last
        and takes it as it is (same pyramid depth and dtype): removing a layer and adding a new one
        costs the GUI thread two to three times as long (new controls, new visual). False when
        there is no such layer."""
        old = self._shown.get(name)
        if old is None or name not in self.viewer.layers or self.viewer.layers[name] is not old:
            return False
        new0, old0 = (data[0] if multiscale else data), level0_data(old)
        if old.multiscale != multiscale or (multiscale and len(old.data) != len(data)) \
                or old0.dtype != new0.dtype or old0.ndim != new0.ndim:
            return False
        for key in ("scale", "translate"):
            if not np.allclose(getattr(old, key)[-2:], place[key]):
                setattr(old, key, place[key])
        for key, value in attrs.items():
            setattr(old, key, value)
        old.data = data
        return True

    def _show_view(self, result: FovResult) -> None:
        """Gather the view with the earlier ones of this image and model (:mod:`.canvas`) and
        show the gathered layers."""
        predictor = result.predictor.predictor
        level, y, x, h, w = result.region
        name, of = result_name(predictor), predictor.class_names[1]
        arrays = {LABELS: result.instances, "probability": result.foreground}
        if result.semantic is not None:
            arrays["classes"] = result.semantic
        key = (self._image_layer.name, result.fov[0].source_id, result.predictor.key, level, result.downsample)
        view = None if result.view is None else (y + result.view[0], x + result.view[1], *result.view[2:])
        canvas, kept, _ = self.views.gather(name, key, (y, x, h, w), arrays,
                                            {"probability": f"{name} probability", "classes": "classes"}, view)
        oy, ox = canvas.origin
        place = placement(grid_of(self._image_layer), result.downsample, oy, ox)
        grid = {"downsample": result.downsample, "offset": [oy, ox]}
        views = {FOV_KEY: {"regions": canvas.regions_in_array()}}
        shown = [self._put_labels(name, canvas.arrays[LABELS], place, grid, style=instance_style(predictor.task, of),
                                  meta=views)]
        ch, cw = canvas.shape  # the H&E under the gathered views, read in the worker (optical densities)
        self.measurements.measure(shown[0], canvas.arrays[LABELS], canvas.arrays["probability"], result.mpp,
                                  lambda: result.fov[1].slide.levels[level][oy:oy + ch, ox:ox + cw])
        self.views.shown(name, canvas, shown[0])
        if "classes" in canvas.arrays:
            shown.append(self._put_labels("classes", canvas.arrays["classes"], place, grid,
                                          style=classes_style(predictor.class_names), meta=views))
        shown += self._put_probability(name, canvas.arrays["probability"], place, of=of)
        self._explain(shown)
        n = result.objects
        self.progress.set_step(1, 1)
        noun = name if n != 1 else of  # "1 gland", "2 glands"
        where = fmt_mpp(result.mpp) if result.mpp else f"level {level} (pixel size unknown)"
        held = f"; it holds {len(canvas.regions)} views" if len(canvas.regions) > 1 else ""
        vh, vw = result.view[2:] if result.view else (h, w)
        self.progress.set_status(f"{n} {noun} in the {vw}x{vh} view at {where} (layer '{name}'{held}){kept}")

    def _relabelled(self, labels: np.ndarray, values: dict) -> None:
        """The last field of view's objects found again with the Objects controls' ``values``."""
        last = self._last_fov
        if last is None or self._image_layer not in self.viewer.layers:
            return
        self._show_view(dataclasses.replace(last, instances=labels, objects=int(labels.max(initial=0))))
        self.progress.set_status(f"{self.progress.status.text()} · threshold {values['threshold']:.2f}, "
                                 f"smallest {values['min_size']} px")

    def _explain(self, layers: list) -> None:
        """The legend of the new result layers; the scale bar on (once) when the image is in microns."""
        self.legend.show_layers(layers)
        if grid_of(self._image_layer).mpp and not self._scale_bar_shown:
            scale_bar_of(self.viewer).visible = True
            self._scale_bar_shown = True

    def _put_probability(self, name: str, data, place: dict, multiscale: bool = False, of: str = "object") -> list:
        """Add (or update) the probability layer of ``name`` when asked for; [it] or []."""
        pname = f"{name} probability"
        dtype = (data[0] if multiscale else data).dtype
        limits = (0, 255) if dtype == np.uint8 else (0, 1)  # stored as p * 255; on screen as floats
        if self.probability.isChecked() and self._update_layer(pname, data, place, multiscale, contrast_limits=limits):
            return [self._shown[pname]]
        if pname in self.viewer.layers:
            self.viewer.layers.remove(pname)
        if not self.probability.isChecked():
            return []
        self._shown[pname] = self.viewer.add_image(data, name=pname, colormap=PROBABILITY_COLORMAP, opacity=0.5,
                                                   blending="additive", contrast_limits=limits,
                                                   multiscale=multiscale, **place,
                                                   metadata={LEGEND_KEY: {"kind": "probability", "of": of}})
        return [self._shown[pname]]

    def _show_store(self, out: str, kind: str | None, no_glands: str | None = None) -> None:
        import dask.array as da

        from ..slide.store import PredictionStore

        store = PredictionStore.open(out)
        d = store.downsample  # of the level the model ran on
        place = placement(grid_of(self._image_layer), d)
        names, grid, shown = store.class_names or ["background", "object"], {"downsample": d, "offset": [0, 0]}, []
        if no_glands:
            pass  # the store keeps the labels; no layer shows them as glands
        elif kind is not None and kind in store.label_names():
            levels = [da.from_zarr(lv) for lv in store.label_levels(kind)]
            multiscale = len(levels) > 1
            self.views.forget(kind)
            shown.append(self._put_labels(kind, levels if multiscale else levels[0], place, grid,
                                          multiscale=multiscale, style=instance_style(kind, names[1])))
        elif len(names) > 2:  # a model of several object classes: its class map, lazily
            c = da.from_zarr(store.probabilities)[:len(names)].argmax(axis=0).astype(np.uint8)  # classes, not maps
            levels = [c] + [c[::2 ** k, ::2 ** k] for k in range(1, 8) if min(c.shape) // 2 ** k >= 256]
            shown.append(self._put_labels("classes", levels if len(levels) > 1 else c, place, grid,
                                          multiscale=len(levels) > 1, style=classes_style(names)))
        fg = store.foreground_dask()
        pyramid = [fg] + [fg[::2 ** k, ::2 ** k] for k in range(1, 8) if min(fg.shape) // 2 ** k >= 256]
        multiscale = len(pyramid) > 1
        shown += self._put_probability(kind or "foreground", pyramid if multiscale else fg, place, multiscale,
                                       of=names[1])
        self._explain(shown)
        if no_glands:
            self.progress.set_status(f"done: results in {out}; no glands here, no '{kind}' layer added ({no_glands})")
        else:
            self.progress.set_status(f"done: results in {out}" + (f" (layer '{kind}')" if kind else ""))
