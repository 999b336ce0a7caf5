"""The "Project" box: create or open a project folder, set its model (the same chooser as the
Predict widget's: what each model is, its model card), and its status line."""
from __future__ import annotations

import html

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QComboBox, QGroupBox, QPushButton

from ...bundled import bundled_backbone, bundled_models
from ...core.errors import DataError, GenSelfDiffError
from ...project import Project
from ...project.refine import fmt_score
from ..inputs import PathEdit, form_and_column, info_label, row
from ..jobs import JobRunner
from ..models import ModelChooser
from ..settings import recent_models
from .context import RefineContext

TASKS = ("glands", "nuclei")


def starting_points() -> dict:
    """What a project may start from: the bundled segmentation models, then the pretrained backbone
    (the few-label start: it segments nothing until a refine on the regions labelled by hand)."""
    models = dict(bundled_models())
    backbone = bundled_backbone()
    if backbone is not None:
        models["pretrained backbone"] = backbone
    return models


class ProjectBox(QGroupBox):
    """Folder, task and model of a project, Create / Open / Use model, and what the open project
    holds (``status``). ``refine_runner`` is the refine job: no other project is opened while it
    runs."""

    def __init__(self, ctx: RefineContext, refine_runner: JobRunner):
        super().__init__("Project")
        self.ctx, self.refine_runner = ctx, refine_runner
        form, column = form_and_column(self)
        self.folder = PathEdit("dir", "project folder (new and empty, or an existing project)")
        form.addRow("Folder", self.folder)
        self.task = QComboBox()
        self.task.addItems(TASKS)
        self.task.setToolTip("what a new project segments")
        form.addRow("Task", self.task)
        self.model = ModelChooser(allow_none=True)
        self.model.combo.setToolTip("the segmentation model a new project starts from ('Use model' sets it on an "
                                    "open project); or the pretrained backbone, for tissue the bundled models do "
                                    "not know: label every object in a few regions, Refine learns from them")
        self.model.fill(starting_points(), recent_models(ctx.settings.path))
        self.model.setText(self.model.bundled_for(self.task.currentText()) or "")
        self.task.currentTextChanged.connect(self.model.prefer_task)
        form.addRow("Model", self.model)
        self.create_btn, self.open_btn, self.use_model_btn = (QPushButton(t) for t in ("Create", "Open", "Use model"))
        self.create_btn.setToolTip("create a new project in the folder, with this task and model")
        self.open_btn.setToolTip("open the existing project in the folder")
        self.use_model_btn.setToolTip("make the model above the open project's current model")
        self.create_btn.clicked.connect(lambda: self.create_project())
        self.open_btn.clicked.connect(lambda: self.open_project())
        self.use_model_btn.clicked.connect(lambda: self.use_model())
        form.addRow(row(self.create_btn, self.open_btn, self.use_model_btn))
        self.status = info_label("no project open")
        column.addWidget(self.status)
        ctx.changed.connect(self.update_status)

    # -- actions -----------------------------------------------------------------------------

    def create_project(self) -> Project | None:
        """Create a project in the folder field with the chosen task and (optional) model."""
        try:
            folder = self._folder()
            model = self.model.text() or None
            self._open(Project.create(folder, task=self.task.currentText(), model=model))
        except GenSelfDiffError as e:
            show_error(f"cannot create the project: {e}")
            return None
        show_info(f"created project {self.ctx.project.folder}")
        return self.ctx.project

    def open_project(self) -> Project | None:
        """Open the project in the folder field."""
        try:
            self._open(Project.open(self._folder()))
        except GenSelfDiffError as e:
            show_error(f"cannot open the project: {e}")
            return None
        return self.ctx.project

    def use_model(self) -> None:
        """Make the model field the open project's current model."""
        try:
            project = self.ctx.need_project()
            if not self.model.text():
                raise DataError("choose a model in 'Model' (a bundled one, or a checkpoint folder with …)")
            project.set_current_model(self.model.text())
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        self.update_status()

    def set_busy(self, running: bool) -> None:
        """While a refine runs, the project stays as it is."""
        for w in (self.create_btn, self.open_btn, self.use_model_btn):
            w.setEnabled(not running)

    def _folder(self) -> str:
        if not self.folder.text():
            raise DataError("choose a project folder")
        return self.folder.text()

    def _open(self, project: Project) -> None:
        if self.refine_runner.running:
            raise DataError("a refine is running on the open project; wait for it or cancel it first")
        self.folder.setText(str(project.folder))
        if project.spec.task in TASKS:
            self.task.setCurrentText(project.spec.task)
        if project.current_model is not None and project.current_model.is_dir():
            self.model.add_model(str(project.current_model))  # the chooser shows what the project uses
        self.ctx.open(project)

    # -- status ------------------------------------------------------------------------------

    def update_status(self) -> None:
        p = self.ctx.project
        if p is None:
            self.status.setText("no project open")
            return
        regions = p.regions()
        lines = [f"<b>{html.escape(p.folder.name)}</b> · task {p.spec.task}",
                 f"slides: {len(p.slides())} · accepted regions: {len(regions)}"]
        sid = self.ctx.known_slide_id(self.ctx.image())
        if sid is not None:
            lines[-1] += f" ({sum(r['slide'] == sid for r in regions)} on this image)"
        model = html.escape(p.current_model.name) if p.current_model else "none (set one with Use model)"
        lines.append(f"model: {model}")
        refines = [h for h in p.history() if "validated_on" in h]  # not the adopt / roll back lines
        if refines:
            last = refines[-1]
            dice = f"{fmt_score(last.get('before'))} → {fmt_score(last.get('after'))}"
            kept = ", kept aside" if last["status"] == "finished" and last.get("adopted") is False else ""
            lines.append(f"last refine ({last['status']}{kept}): Dice {dice}")
        self.status.setText("<br>".join(lines))
        self.status.setToolTip(str(p.folder))
