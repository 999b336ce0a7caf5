"""The "Where next" box: rank tissue regions by the model's uncertainty and fly the camera to
the most uncertain one; while the camera centre stays inside it, *Edit region* opens exactly
that region, and accepting or skipping it marks it reviewed so it is not offered again."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import QGroupBox, QPushButton

from ...core.errors import DataError, GenSelfDiffError
from ...core.inference import PredictorCache, cached_predictor
from ...core.progress import relay
from ...project import Project
from ...slide.levels import level_for_mpp
from ..geometry import (Bounds, bounds_centre_world, box_overlap, camera_of, grid_of, world_in_bounds,
                        zoom_to_fit)
from ..inputs import form_and_column, info_label, int_spin, layer_to_rgb, level0_data, row
from ..jobs import JobRunner, readable_error
from ..slide_layer import layer_slide
from .context import RefineContext

SUGGESTION_LAYER = "suggested region"
#: How many regions one suggestion run offers.
TOP_K = 8


@dataclass
class Suggestions:
    """The ranked regions of one image and where the user is in them.

    ``image`` is the name of the image layer they are for, ``regions`` the ranked suggestions
    (dicts with ``bounds``, ``score``, ...), ``index`` the one on screen (None before the first
    run; ``len(regions)`` once all were shown, 0 when a run found none) and ``reviewed`` whether
    that one was accepted or skipped (marked reviewed in the project) already.
    """

    image: str | None = None
    regions: list[dict] = field(default_factory=list)
    index: int | None = None
    reviewed: bool = False

    def clear(self) -> None:
        self.regions, self.index, self.reviewed = [], None, False

    def show(self, regions: list[dict]) -> None:
        """A new ranking: its first region goes on screen."""
        self.regions, self.index, self.reviewed = list(regions), 0, False  # none found: nothing left

    def next(self) -> None:
        self.index, self.reviewed = self.index + 1, False

    @property
    def current(self) -> dict | None:
        if self.index is None or self.index >= len(self.regions):
            return None
        return self.regions[self.index]

    def open_for(self, image_name: str) -> dict | None:
        """The suggestion on screen, if it is for ``image_name`` and not reviewed yet."""
        s = self.current
        return None if s is None or self.reviewed or image_name != self.image else s


def suggest_job(model: str, device: str, cache: PredictorCache | None, project: Project, source: Any, slide_id: str,
                region_size: int, top_k: int) -> Iterator[str]:
    """Rank regions of ``source`` (an array or a Slide) by uncertainty; returns (predictor cache,
    suggestions). A pyramid is scored at the level closest to the model's resolution."""
    yield "loading the model…"
    cache = cached_predictor(model, device, cache)
    predictor = cache.predictor
    level = level_for_mpp(source.downsamples, source.mpp, predictor.mpp) if hasattr(source, "downsamples") else 0
    yield f"scoring {region_size}-pixel regions at level {level}…"
    events = project.iter_suggest_regions(predictor, source, region_size=region_size, level=level, top_k=top_k,
                                          slide_id=slide_id)
    regions = yield from relay(events, lambda event: f"level {level}: {event.message}…")
    return cache, regions


class SuggestBox(QGroupBox):
    """Region size, *Suggest next region* / Stop / Skip, and what the suggestion on screen is.

    ``device()`` names the device to score on; the predictor is cached between runs.
    """

    def __init__(self, ctx: RefineContext, device: Callable[[], str]):
        super().__init__("Where next")
        self.ctx, self.device = ctx, device
        self.state = Suggestions()
        self.runner = JobRunner("region suggestion", self)
        self._predictor: PredictorCache | None = None
        form, column = form_and_column(self)
        self.region_size = int_spin(64, 2048, 512, 64, "side of the candidate regions, in pixels of the level scored")
        form.addRow("Region size", self.region_size)
        self.suggest_btn, self.skip_btn = QPushButton("Suggest next region"), QPushButton("Skip")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setToolTip("stop scoring regions (nothing is lost: no suggestion is made)")
        self.stop_btn.setEnabled(False)
        self.stop_btn.clicked.connect(self.runner.cancel)
        self.suggest_btn.setToolTip("find the tissue regions the current model is least sure about")
        self.skip_btn.setToolTip("mark the suggested region reviewed and show the next one")
        self.skip_btn.setEnabled(False)
        self.suggest_btn.clicked.connect(lambda: self.suggest_regions())
        self.skip_btn.clicked.connect(lambda: self.skip_suggestion())
        form.addRow(row(self.suggest_btn, self.stop_btn, self.skip_btn))
        self.info = info_label("")
        column.addWidget(self.info)
        self.runner.event.connect(self.info.setText)
        self.runner.result.connect(self._on_suggested)
        self.runner.failed.connect(lambda e: self.info.setText(f"failed: {readable_error(e)}"))
        self.runner.stopped.connect(self._on_stopped)
        ctx.project_opened.connect(lambda _: self.reset())

    @property
    def viewer(self):
        return self.ctx.viewer

    def reset(self) -> None:
        """No suggestion (another project was opened)."""
        self.state.clear()
        self._show_suggestion()

    # -- scoring -----------------------------------------------------------------------------

    def suggest_regions(self) -> None:
        """Score the image's tissue regions with the current model in the background."""
        try:
            project = self.ctx.need_project()
            image = self.ctx.need_image()
            if project.current_model is None:
                raise DataError("the project has no model yet: set one with 'Use model'")
            sid = self.ctx.slide_id(image)
            data = level0_data(image)
            in_memory = not image.multiscale and isinstance(data, np.ndarray)
            source = layer_to_rgb(data, image.name) if in_memory else layer_slide(image)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        self.state.image = image.name
        self._set_running(True)
        self.info.setText("starting…")
        self.runner.start(suggest_job, str(project.current_model), self.device(), self._predictor,
                          project, source, sid, self.region_size.value(), TOP_K)

    def _set_running(self, running: bool) -> None:
        self.suggest_btn.setEnabled(not running)
        self.stop_btn.setEnabled(running)

    def _on_stopped(self, cancelled: bool) -> None:
        self._set_running(False)
        if cancelled:
            self.info.setText("stopped: no region suggested")

    def _on_suggested(self, result: tuple) -> None:
        self._predictor, regions = result
        self.state.show(regions)
        self._show_suggestion()

    # -- the suggestion on screen ------------------------------------------------------------

    def suggested_bounds(self, image) -> Bounds | None:
        """The suggestion's bounds while it is on screen for this image (camera centre inside)."""
        s = self.state.open_for(image.name)
        if s is None:
            return None
        return tuple(s["bounds"]) if world_in_bounds(grid_of(image), camera_of(self.viewer).center,
                                                     s["bounds"]) else None

    def _show_suggestion(self) -> None:
        """Fly the camera to the current suggestion (centre, zoom to fit) and say what it is."""
        self.state.reviewed = False
        s = self.state.current
        self.skip_btn.setEnabled(s is not None)
        if s is None:
            self._outline(None, None)
            self.info.setText("no unreviewed tissue region left to suggest" if self.state.index is not None else "")
            return
        name = self.state.image
        image = self.viewer.layers[name] if name in self.viewer.layers else None
        if image is None:
            return
        y, x, h, w = s["bounds"]
        self._outline(image, s["bounds"])
        camera = camera_of(self.viewer)
        camera.center = bounds_centre_world(grid_of(image), s["bounds"])
        camera.zoom = zoom_to_fit(grid_of(image), s["bounds"], self.viewer.canvas.size)
        self.info.setText(
            f"suggestion {self.state.index + 1}/{len(self.state.regions)}: {h}x{w} pixels at {y},{x}, "
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
                               edge_width=max(h, w) / 100, scale=image.scale, translate=image.translate,
                               units=image.units)
        if active is not None:
            self.viewer.layers.selection.active = active

    def skip_suggestion(self) -> None:
        """Mark the suggestion reviewed (unless accepting did already) and show the next one."""
        s = self.state.current
        if s is None:
            return
        if not self.state.reviewed:
            try:
                image = self.viewer.layers[self.state.image]
                self.ctx.need_project().mark_reviewed(self.ctx.slide_id(image), s["bounds"])
            except (GenSelfDiffError, KeyError) as e:
                show_error(f"could not mark the region reviewed: {readable_error(e)}")
                return
        self.state.next()
        self._show_suggestion()

    def reviewed_by_accept(self, image, bounds) -> None:
        """Accepting a region that overlaps the suggestion on screen reviews the suggestion."""
        s = self.state.open_for(image.name)
        if s is None or not box_overlap(s["bounds"], bounds):
            return
        try:
            self.ctx.project.mark_reviewed(self.ctx.slide_id(image), s["bounds"])
        except GenSelfDiffError as e:
            show_warning(f"the region was accepted, but the suggestion could not be marked reviewed: {e}")
            return
        self.state.reviewed = True
        self.info.setText(f"suggestion {self.state.index + 1}/{len(self.state.regions)} accepted "
                          "and marked reviewed; Skip shows the next one")
