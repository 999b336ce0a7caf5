"""What the colours of the result layers mean, and the colours themselves.

Instance layers (glands, nuclei) are drawn in their class's colour (``formats.qupath``: the
colour QuPath shows them in; nuclei as outlines, so the nucleus stays visible), semantic layers
one colour per class, probability layers with a colour map; :class:`Legend` lists them: a swatch
and the class name for labels, a colour bar from 0 to 1 for probabilities. Each result layer
says what it shows in its metadata (``LEGEND_KEY``), so the legend reads the colours off the
layer itself and follows a colour changed in napari's layer controls.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from ..formats import qupath

#: Layer metadata key: what a result layer shows, for the legend. {"kind": "instances", "class":
#: name} | {"kind": "classes", "names": {id: name}} | {"kind": "probability", "of": name}.
LEGEND_KEY = "genselfdiff_legend"
#: Colours of the classes of a semantic layer (class 1, 2, ...), after background.
CLASS_PALETTE = [(0, 200, 0), (30, 90, 255), (255, 60, 60), (255, 190, 0), (180, 70, 255), (0, 200, 200),
                 (255, 120, 200), (140, 90, 40)]
PROBABILITY_COLORMAP = "inferno"
SWATCH = 14


def rgba(rgb: Sequence[int], alpha: float = 1.0) -> np.ndarray:
    return np.array([c / 255 for c in rgb[:3]] + [alpha], float)


def instance_style(task: str, class_name: str) -> dict[str, Any]:
    """``add_labels`` keywords for the objects of ``task``: every object in the task's colour,
    nuclei as outlines (many, small, touching: the nucleus stays visible), and the legend entry."""
    from napari.utils.colormaps import DirectLabelColormap

    colormap = DirectLabelColormap(color_dict={None: rgba(qupath.colour(task)), 0: np.zeros(4)})
    style: dict[str, Any] = {"colormap": colormap}
    if task == "nuclei":  # outlines two pixels wide, nearly opaque: visible at ordinary zoom
        style["contour"], style["opacity"] = 2, 0.9
    return {**style, "legend": {"kind": "instances", "class": class_name}}


def classes_style(class_names: Sequence[str]) -> dict[str, Any]:
    """``add_labels`` keywords for a semantic map of ``class_names`` (background first): one
    palette colour per class, and the legend entry."""
    from napari.utils.colormaps import DirectLabelColormap

    colours = {0: np.zeros(4), None: np.zeros(4)}
    for i in range(1, len(class_names)):
        colours[i] = rgba(CLASS_PALETTE[(i - 1) % len(CLASS_PALETTE)])
    names = {i: str(n) for i, n in enumerate(class_names) if i > 0}
    return {"colormap": DirectLabelColormap(color_dict=colours), "legend": {"kind": "classes", "names": names}}


def _swatch(colour: np.ndarray, outline: bool = False) -> QLabel:
    r, g, b, _ = (int(round(255 * float(c))) for c in colour)
    label = QLabel()
    label.setFixedSize(SWATCH, SWATCH)
    fill = "transparent" if outline else f"rgb({r},{g},{b})"
    label.setStyleSheet(f"background: {fill}; border: 2px solid rgb({r},{g},{b});")
    return label


def colour_bar(colormap, width: int = 120, height: int = SWATCH) -> QPixmap:
    """A horizontal bar of ``colormap`` (a napari Colormap) from 0 (left) to 1 (right)."""
    values = np.asarray(colormap.map(np.linspace(0, 1, width)))
    row = np.ascontiguousarray((np.clip(values, 0, 1) * 255).astype(np.uint8)[None, :, :4].repeat(height, 0))
    image = QImage(row.data, width, height, 4 * width, QImage.Format.Format_RGBA8888)
    return QPixmap.fromImage(image.copy())


class Legend(QGroupBox):
    """The legend of the result layers it is given (:meth:`show_layers`): for each, its name and
    what its colours mean. It follows colour changes and forgets layers removed from the viewer.

    ``entries()`` lists what it shows: (layer name, text, RGBA colour, or None for a colour bar).
    """

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__("Legend", parent)
        self.viewer = viewer
        self._layers: list = []
        self._entries: list[tuple[str, str, tuple | None]] = []
        self._grid = QGridLayout()
        self._grid.setColumnStretch(2, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(self._grid)
        viewer.layers.events.removed.connect(self._on_removed)
        self.destroyed.connect(lambda *_: self._disconnect_all())
        self.setVisible(False)

    def show_layers(self, layers: Sequence) -> None:
        """Explain ``layers`` (in this order; layers without a legend entry are left out)."""
        self._disconnect_layers()
        self._layers = [layer for layer in layers if LEGEND_KEY in layer.metadata]
        for layer in self._layers:
            layer.events.colormap.connect(self.refresh)
            if hasattr(layer.events, "contour"):
                layer.events.contour.connect(self.refresh)
        self.refresh()

    def entries(self) -> list[tuple[str, str, tuple | None]]:
        return list(self._entries)

    def refresh(self, event=None) -> None:
        while self._grid.count():
            item = self._grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self._entries = []
        r = 0
        for layer in self._layers:
            title = QLabel(f"<b>{html.escape(layer.name)}</b>")
            self._grid.addWidget(title, r, 0, 1, 3)
            r += 1
            for text, colour, widget in self._describe(layer):
                self._grid.addWidget(widget, r, 1, Qt.AlignmentFlag.AlignVCenter)
                self._grid.addWidget(QLabel(text), r, 2)
                self._entries.append((layer.name, text, None if colour is None else tuple(float(c) for c in colour)))
                r += 1
        self.setVisible(bool(self._layers))

    def _describe(self, layer) -> list[tuple[str, np.ndarray | None, QWidget]]:
        info = layer.metadata[LEGEND_KEY]
        kind = info.get("kind")
        if kind == "probability":
            bar = QLabel()
            bar.setPixmap(colour_bar(layer.colormap))
            return [(f"p({info.get('of', 'object')}): 0 → 1", None, bar)]
        outline = bool(getattr(layer, "contour", 0))
        if kind == "classes":
            names = {int(k): v for k, v in info.get("names", {}).items()}
            colours = layer.colormap.map(np.array(sorted(names), dtype=np.int64))
            return [(names[i], c, _swatch(c)) for i, c in zip(sorted(names), colours)]
        colour = layer.colormap.map(np.array([1], dtype=np.int64))[0]
        text = info.get("class", "object") + (" (outlines)" if outline else "")
        if not self._one_colour(layer):
            return [(f"{text}, one colour per object", colour, _swatch(colour, outline))]
        return [(text, colour, _swatch(colour, outline))]

    @staticmethod
    def _one_colour(layer) -> bool:
        """Whether every object of ``layer`` is drawn in one colour (a class colour map)."""
        ids = np.array([1, 2, 3, 1000], dtype=np.int64)
        return bool(np.allclose(layer.colormap.map(ids), layer.colormap.map(ids[:1])))

    def _on_removed(self, event) -> None:
        if event.value in self._layers:
            self._layers = [layer for layer in self._layers if layer is not event.value]
            self.refresh()

    def _disconnect_layers(self) -> None:
        for layer in self._layers:
            layer.events.colormap.disconnect(self.refresh)
            if hasattr(layer.events, "contour"):
                layer.events.contour.disconnect(self.refresh)

    def _disconnect_all(self) -> None:
        self._disconnect_layers()
        self.viewer.layers.events.removed.disconnect(self._on_removed)

