"""The "Refine" box: fine-tune the project's model on every accepted region in the background,
show the Dice before -> after, and hand the new model to the Predict widget (remembered as its
model and selected in a docked one, which re-predicts the view when asked)."""
from __future__ import annotations

from typing import Any, Iterator

from napari.utils.notifications import show_error
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QGroupBox, QLabel, QPushButton

from ...core.errors import DataError, GenSelfDiffError
from ...core.progress import relay_last
from ...project import Project
from ..inputs import DeviceChooser, form_and_column, info_label, int_spin, row
from ..jobs import JobRunner
from ..predict import PredictWidget
from ..progress import ProgressPanel
from ..settings import Settings, remember_model
from .context import RefineContext, segmentation_model
from ...project.refine import fmt_score

NO_DICE = "Dice before → after: –"
#: The Patch field's default, and what a project starting from the pretrained backbone gets.
PATCH, BACKBONE_PATCH = 256, 128


def refine_job(project: Project, steps: int, device: str, overrides: dict) -> Iterator[Any]:
    """Relay :meth:`Project.refine`; returns its last event. Closing this generator (cancel)
    closes the project's, which saves the partial model and records a 'cancelled' refine."""
    return (yield from relay_last(project.refine(steps=steps, device=device, **overrides)))


class RefineBox(QGroupBox):
    """Steps, patch, batch, device, *Refine model* / Cancel, progress and the Dice.

    ``running(bool)`` is emitted when a refine starts and when it has stopped.
    """

    running = Signal(bool)

    def __init__(self, ctx: RefineContext):
        super().__init__("Refine")
        self.ctx = ctx
        self.runner = JobRunner("refine", self)
        form, column = form_and_column(self)
        self.steps = int_spin(1, 100_000, 200, 50, "training steps on the accepted regions")
        self.patch = int_spin(32, 1024, PATCH, 32, "training patch size, in pixels (a step's time grows with its "
                              "square: from the pretrained backbone, 128 gives a first model in a minute or two)")
        self.batch = int_spin(1, 64, 8, 1, "patches per step")
        form.addRow("Steps", self.steps)
        form.addRow("Patch", row(self.patch, QLabel("Batch"), self.batch))
        self.device = DeviceChooser()
        form.addRow("Device", self.device)
        self.repredict = QCheckBox("then re-predict the view")
        self.repredict.setToolTip("after refining, the Predict widget (if open on this image) predicts its "
                                  "view again with the new model")
        self.repredict.setChecked(True)
        form.addRow(self.repredict)
        self.refine_btn, self.cancel_btn = QPushButton("Refine model"), QPushButton("Cancel")
        self.refine_btn.setToolTip("fine-tune the project's model on every accepted region; the new model is "
                                   "adopted only if it scores at least as well on the held-out regions")
        self.cancel_btn.setEnabled(False)
        self.refine_btn.clicked.connect(lambda: self.refine())
        self.cancel_btn.clicked.connect(self.runner.cancel)
        form.addRow(row(self.refine_btn, self.cancel_btn))
        self.adopt_btn, self.rollback_btn = QPushButton("Adopt anyway"), QPushButton("Roll back")
        self.adopt_btn.setToolTip("make the refined model that was kept aside (it scored lower) the current model")
        self.rollback_btn.setToolTip("make the model before the last refine / adopt current again")
        self.adopt_btn.setEnabled(False)
        self.adopt_btn.clicked.connect(lambda: self.adopt())
        self.rollback_btn.clicked.connect(lambda: self.roll_back())
        form.addRow(row(self.adopt_btn, self.rollback_btn))
        self._kept_aside: str | None = None
        self.progress = ProgressPanel(with_plot=True)
        column.addWidget(self.progress)
        self.dice = info_label(NO_DICE)
        column.addWidget(self.dice)
        self.progress.follow(self.runner)
        self.runner.event.connect(self.progress.show_progress)
        self.runner.result.connect(self._on_refined)
        self.runner.stopped.connect(self._on_stopped)
        self._suited = None  # the project whose start the patch was suited to
        ctx.changed.connect(self._suit_start)

    def _suit_start(self) -> None:
        """A project starting from the pretrained backbone (nothing segmented yet): 128-px patches, a
        quarter of a 256-px step's time (200 steps in about 100 s on a 2-core CPU,
        benchmarks/few_label_loop.py), unless the patch was changed from its default."""
        project = self.ctx.project
        if project is None or project.folder == self._suited:
            return
        self._suited = project.folder
        if self.patch.value() == PATCH and project.current_model is not None and segmentation_model(project) is None:
            self.patch.setValue(BACKBONE_PATCH)
            self.progress.set_status(f"from the pretrained backbone: Patch {BACKBONE_PATCH} px, a first model in a "
                                     "minute or two; label a few regions, then Refine")

    def refine(self) -> None:
        """Fine-tune the project's model on its accepted regions in the background."""
        try:
            project = self.ctx.need_project()
            if not project.regions():
                raise DataError("no accepted regions yet: edit a region, correct it and accept it first")
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        overrides = {"patch": self.patch.value(), "batch": self.batch.value()}
        self.progress.reset(f"refining on {len(project.regions())} accepted region(s)…")
        self._set_running(True)
        self.runner.start(refine_job, project, self.steps.value(), self.device.device, overrides)

    def _set_running(self, running: bool) -> None:
        self.refine_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        self.rollback_btn.setEnabled(not running)
        self.adopt_btn.setEnabled(not running and self._kept_aside is not None)
        self.running.emit(running)

    def _on_refined(self, last) -> None:
        if last is None or not last.done:
            return
        metrics = last.metrics or {}
        before, after = metrics.get("before"), metrics.get("after")
        adopted = metrics.get("adopted", True)
        verdict = "" if adopted else " · <b>kept aside</b> (scores lower): the current model is unchanged"
        self.dice.setText(f"Dice before → after: <b>{fmt_score(before)} → {fmt_score(after)}</b>{verdict}")
        self.dice.setToolTip(last.message)
        self.progress.set_status(last.message)
        self._kept_aside = None if adopted else last.checkpoint
        self.adopt_btn.setEnabled(not adopted)
        if adopted:
            self.publish_model(last.checkpoint)

    def adopt(self) -> None:
        """Adopt the refined model that was kept aside, and hand it to the Predict widget."""
        from ...project.refine import adopt

        try:
            project = self.ctx.need_project()
            if not self._kept_aside:
                raise DataError("no refined model is waiting to be adopted")
            path = adopt(project, self._kept_aside)
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        self._kept_aside = None
        self.adopt_btn.setEnabled(False)
        self.progress.set_status(f"adopted {path.name} as the current model")
        self.publish_model(str(path))
        self.ctx.changed.emit()

    def roll_back(self) -> None:
        """Make the model before the last refine / adopt current again."""
        from ...project.refine import roll_back

        try:
            model = roll_back(self.ctx.need_project())
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        self.progress.set_status(f"rolled back: the current model is {model.name if model else 'none'}")
        if model is not None:
            self.publish_model(str(model))
        self.ctx.changed.emit()

    def _on_stopped(self, cancelled: bool) -> None:
        self._set_running(False)
        if cancelled:
            self.progress.set_status("cancelled: the partial model is kept under models/ (the current model "
                                     "is unchanged)")
        self.ctx.changed.emit()

    def publish_model(self, checkpoint: str | None) -> None:
        """Hand the refined model to the Predict widget: remembered as its model and among the
        recent ones (for a Predict widget opened later), selected in any docked one, which then
        re-predicts its view of this image when 're-predict' is on."""
        if not checkpoint:
            return
        path = self.ctx.settings.path
        remember_model(checkpoint, path)
        Settings("predict", path).set("model", checkpoint)
        image = self.ctx.image()
        for w in self._predict_widgets():
            w.add_model(checkpoint)
            if (self.repredict.isChecked() and not w.runner.running and image is not None
                    and w.image_layer.currentText() == image.name):
                w.predict_view()

    def _predict_widgets(self) -> list[PredictWidget]:
        docked = getattr(self.ctx.viewer.window, "dock_widgets", {})
        return [w for w in docked.values() if isinstance(w, PredictWidget)]
