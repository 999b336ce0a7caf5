"""The pixel size of an image layer, asked once where its file does not say (issue 35 item 4).

A model runs at the resolution it learned, so it must know the image's microns per pixel. Slides
say it; many PNG/JPEG tiles do not. Then the first widget that needs it asks, once per image, in
the words a pathologist uses (the objective: 40x, 20x, 10x, or a value), and the answer is kept on
the layer (``layer.metadata[GIVEN_MPP]``), where Predict, Fine-tune and Refine (the project's slide)
all read it: :func:`.geometry.known_mpp`. The file's own value (``metadata["mpp"]``, or a layer in microns)
always wins; the Pixel size row of a widget replaces what was asked (and is remembered the same
way); "I don't know" is remembered too (no second question; the model's own resolution is assumed,
with the warning that says so).
"""
from __future__ import annotations

from qtpy.QtWidgets import (QButtonGroup, QDialog, QDialogButtonBox, QDoubleSpinBox, QLabel, QRadioButton,
                            QVBoxLayout, QWidget)

from .geometry import GIVEN_MPP, stated_mpp

#: The objectives a pathologist names, with the usual scanner pixel size at each.
MAGNIFICATIONS = (("40x", 0.25), ("20x", 0.5), ("10x", 1.0))


class PixelSizeDialog(QDialog):
    """'What magnification is <image>?': 40x / 20x / 10x / another value / I don't know."""

    def __init__(self, parent: QWidget | None, name: str):
        super().__init__(parent)
        self.setWindowTitle("Pixel size")
        lay = QVBoxLayout(self)
        ask = QLabel(f"<b>{name}</b> does not say its pixel size. At which magnification was it scanned? "
                     "The model runs at the resolution it learned; asked once for this image.")
        ask.setWordWrap(True)
        lay.addWidget(ask)
        self.group = QButtonGroup(self)
        self.buttons: list[tuple[QRadioButton, float | None]] = []
        for text, mpp in MAGNIFICATIONS:
            self._choice(lay, f"{text}  ({mpp:g} µm/px)", mpp)
        self.other = self._choice(lay, "another pixel size:", -1.0)
        self.value_spin = QDoubleSpinBox()
        self.value_spin.setRange(0.01, 50.0)
        self.value_spin.setDecimals(3)
        self.value_spin.setValue(0.5)
        self.value_spin.setSuffix(" µm/px")
        self.value_spin.valueChanged.connect(lambda _: self.other.setChecked(True))
        lay.addWidget(self.value_spin)
        self._choice(lay, "I don't know (assume the model's own resolution)", None)
        self.buttons[1][0].setChecked(True)  # 20x: the commonest scan
        box = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        box.accepted.connect(self.accept)
        box.rejected.connect(self.reject)
        lay.addWidget(box)

    def _choice(self, lay: QVBoxLayout, text: str, mpp: float | None) -> QRadioButton:
        button = QRadioButton(text)
        self.group.addButton(button)
        self.buttons.append((button, mpp))
        lay.addWidget(button)
        return button

    def value(self) -> float | None:
        """The chosen µm/px (None: not known)."""
        mpp = next(m for b, m in self.buttons if b.isChecked())
        return float(self.value_spin.value()) if mpp == -1.0 else mpp


def ask(parent: QWidget | None, layer) -> tuple[bool, float | None]:
    """Show the question for ``layer`` (modal): (answered, µm/px or None when not known)."""
    dialog = PixelSizeDialog(parent, layer.name)
    return (True, dialog.value()) if dialog.exec() else (False, None)


def pixel_size_of(parent: QWidget | None, layer, typed: float | None = None) -> float | None:
    """µm/px of ``layer`` for a job: the file's; else ``typed`` (a widget's Pixel size row), kept on
    the layer; else what was asked before; else asked now (once per layer), kept on the layer."""
    meta = layer.metadata
    file_mpp = stated_mpp(layer)
    if file_mpp:
        return file_mpp
    if typed:
        meta[GIVEN_MPP] = float(typed)
        return float(typed)
    if GIVEN_MPP in meta:
        return meta[GIVEN_MPP]
    answered, mpp = ask(parent, layer)
    if answered:  # closed without an answer: asked again next time
        meta[GIVEN_MPP] = mpp
    return mpp
