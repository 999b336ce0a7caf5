"""The "Annotate and refine" dock widget: the boxes of :mod:`.` stacked in a scroll area and
wired together."""
from __future__ import annotations

from qtpy.QtWidgets import QWidget

from ...project import Project
from ..inputs import LayerChoices, explain_labels, is_rgb_image, narrow_combo, scrolling_column, why_not_rgb
from ..jobs import StopsJobsOnClose
from ..settings import Settings
from .annotate import AnnotateBox
from .context import RefineContext
from .geojson_box import GeoJsonBox
from .project_box import ProjectBox
from .refining import RefineBox
from .suggest import SuggestBox


class RefineWidget(QWidget):
    """Open a project, correct regions of an image, accept them, refine the model, repeat.

    One box per step, top to bottom: ``project_box`` (:class:`ProjectBox`), ``annotate``
    (:class:`AnnotateBox`), ``suggest`` (:class:`SuggestBox`), ``refine_box``
    (:class:`RefineBox`) and ``geojson`` (:class:`GeoJsonBox`); what they share is ``ctx``
    (:class:`RefineContext`: the viewer, the open project, the chosen image layer).
    """

    def __init__(self, napari_viewer, settings: Settings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings or Settings("refine")
        images = narrow_combo()
        images.setToolTip("the H&E image layer whose regions you correct")
        choices = LayerChoices(napari_viewer, is_rgb_image, images, why_not_rgb)
        self.ctx = RefineContext(napari_viewer, self.settings, choices, self)

        self.refine_box = RefineBox(self.ctx)
        self.project_box = ProjectBox(self.ctx, self.refine_box.runner)
        self.suggest = SuggestBox(self.ctx, device=lambda: self.refine_box.device.device)
        self.annotate = AnnotateBox(self.ctx, suggested_bounds=self.suggest.suggested_bounds,
                                    device=lambda: self.refine_box.device.device)
        self.geojson = GeoJsonBox(self.ctx)
        self.stops_jobs = StopsJobsOnClose(self, [self.refine_box.runner, self.suggest.runner, self.annotate.runner,
                                                  self.geojson.runner])

        self.refine_box.running.connect(self.project_box.set_busy)
        self.annotate.accepted.connect(self.suggest.reviewed_by_accept)
        images.currentTextChanged.connect(lambda _: self.project_box.update_status())
        self._layout([self.project_box, self.annotate, self.suggest, self.refine_box, self.geojson])

        p, r = self.project_box, self.refine_box
        self.settings.bind_all({"folder": p.folder, "task": p.task, "model": p.model, "steps": r.steps,
                                "patch": r.patch, "batch": r.batch, "device": r.device.combo,
                                "repredict": r.repredict, "region_size": self.suggest.region_size,
                                "import_as": self.geojson.import_as, "object_type": self.geojson.object_type})
        self.project_box.update_status()

    @property
    def project(self) -> Project | None:
        return self.ctx.project

    def _layout(self, boxes: list[QWidget]) -> None:
        """The boxes top to bottom in a vertical scroll area (``inputs.scrolling_column``)."""
        lay = scrolling_column(self)
        for box in boxes:
            lay.addWidget(box)
        lay.addStretch(1)
        explain_labels(self)  # a row's label explains its field on hover, as the field does
