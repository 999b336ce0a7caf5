"""What the boxes of the refine widget share: the viewer, the open project, the chosen image
layer, and the project slide each image layer is filed under.

Images without a file (an array added from the console or a plugin) are saved once into the
project as ``images/<layer name>.tif`` and registered as a slide from there, because a project
slide is a file (so the project can be reopened, refined from the CLI and exported later).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Signal

from ...core.errors import DataError
from ...core.names import safe_name
from ...formats.tiff import write_tiff
from ...project import Project
from ..geometry import known_mpp
from ..inputs import LayerChoices, layer_file, layer_to_rgb, level0_data, level0_shape
from ..settings import Settings


class RefineContext(QObject):
    """The state every box of the refine widget reads: ``viewer``, ``settings``, ``project`` (the
    open one, or None) and ``images`` (the chooser of the image layer to work on).

    Signals: ``project_opened(Project)`` when a project is created or opened, ``changed()``
    whenever what the project holds may have changed (the status line follows it).
    """

    project_opened = Signal(object)
    changed = Signal()

    def __init__(self, viewer, settings: Settings, images: LayerChoices, parent: QObject | None = None):
        super().__init__(parent)
        self.viewer, self.settings, self.images = viewer, settings, images
        self.project: Project | None = None
        self._verified: set[tuple] = set()  # in-memory layers checked against their saved copy

    def open(self, project: Project) -> None:
        self.project = project
        self.project_opened.emit(project)
        self.changed.emit()

    def need_project(self) -> Project:
        if self.project is None:
            raise DataError("create or open a project first")
        return self.project

    def image(self):
        """The chosen image layer (None when there is none)."""
        return self.images.current()

    def need_image(self):
        layer = self.image()
        if layer is None:
            raise DataError("choose an RGB image layer")
        return layer

    # -- the project slide of an image layer -------------------------------------------------

    def _saved_copy(self, project: Project, layer) -> Path:
        return project.folder / "images" / f"{safe_name(layer.name, 'image')}.tif"

    def known_slide_id(self, layer) -> str | None:
        """The project slide of ``layer`` if it is registered already (no side effects)."""
        if layer is None or self.project is None:
            return None
        path = str(Path(layer_file(layer) or self._saved_copy(self.project, layer)).absolute())
        return next((s["id"] for s in self.project.slides() if s["path"] == path), None)

    def slide_id(self, layer) -> str:
        """The project slide of ``layer``, registering it on first use: its file when it has one,
        else a copy saved in the project (``images/<layer name>.tif``)."""
        project = self.need_project()
        shape = level0_shape(layer)
        mpp = known_mpp(layer)  # the file's, or the one given in Predict / Fine-tune (asked once)
        path = layer_file(layer)
        if path is None:
            known = self.known_slide_id(layer)
            if known is not None:
                self._check_same_image(layer, project.slide(known))
                return known
            path = self._saved_copy(project, layer)
            write_tiff(path, layer_to_rgb(level0_data(layer), layer.name), photometric="rgb", tile=(512, 512), mpp=mpp)
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
        from ...slide.reader import open_slide
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


def segmentation_model(project: Project) -> str | None:
    """The project's model when it can segment (not a pretrained diffusion model, the few-label
    start), else None."""
    from ...core.checkpoint import load_config
    from ...core.errors import GenSelfDiffError

    model = project.current_model
    if model is None:
        return None
    try:
        return str(model) if load_config(model).get("kind") == "segmentation" else None
    except GenSelfDiffError:
        return None


def read_pixels(layer, bounds) -> np.ndarray:
    """The level-0 RGB pixels of ``layer`` in ``bounds`` (y, x, h, w)."""
    y, x, h, w = bounds
    return layer_to_rgb(np.asarray(level0_data(layer)[y:y + h, x:x + w]), layer.name)
