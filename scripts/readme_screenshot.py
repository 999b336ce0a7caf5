"""Make docs/napari_nuclei.png for the README: the sample image (skin), the bundled nuclei model
predicted over the whole image from the Predict widget, docked in a real napari window; then the
glands model over the same view: skin has no glands, and the bundled glands model (colon, GlaS)
outlines its epidermis (epithelium) instead; a model that labels nearly all the tissue, unsure, adds
no layer and says why (core/eval/glandular.py).

    xvfb-run -a .venv/bin/python scripts/readme_screenshot.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_genselfdiff._sample_data import sample_he
from napari_genselfdiff._widgets.predict import PredictWidget
from napari_genselfdiff.bundled import bundled_models

OUT = Path(__file__).resolve().parents[1] / "docs" / "napari_nuclei.png"


def wait_for(cond, timeout=600):
    t = time.time()
    while not cond():
        QApplication.processEvents()
        time.sleep(0.05)
        if time.time() - t > timeout:
            sys.exit("timed out")


def main() -> None:
    models = bundled_models()
    if not models:
        sys.exit("no bundled models: run benchmarks/train_defaults.py first")
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    for data, kw, _ in sample_he():
        viewer.add_image(data, **kw)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Predict", area="right")
    for name in ("nuclei", "glands"):
        if name in models:
            widget.add_model(str(models[name]))
            viewer.reset_view()
            widget.predict_view()
            wait_for(lambda: not widget.runner.running and (name in viewer.layers or "no glands" in widget.progress.status.text()))
    for name, width in (("glands", 4), ("nuclei", 1)):
        if name in viewer.layers:
            viewer.layers[name].contour = width
    viewer.reset_view()
    QApplication.processEvents()
    OUT.parent.mkdir(exist_ok=True)
    viewer.screenshot(str(OUT), canvas_only=False)
    print(f"wrote {OUT}")
    viewer.close()


if __name__ == "__main__":
    main()
