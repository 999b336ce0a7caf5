"""The dock widgets as a pathologist meets them (issue #15, items 8 and 14): every widget scrolls,
so the four fit stacked on a 1080-pixel screen; idle progress bars show no count; the Pretrain
source list leaves out our own generated tiles; while a job runs, only this package's warnings
become notifications.

Runs under Xvfb (pytest-xvfb) with QT_API=pyqt6.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

import napari  # noqa: E402,F401  (declared: missing or broken is a failure, never a skip)
import pytestqt  # noqa: E402,F401

from napari_genselfdiff._widgets import jobs  # noqa: E402
from napari_genselfdiff._widgets.inputs import VerticalScroll  # noqa: E402
from napari_genselfdiff._widgets.pretrain import GENERATED_KEY, TILES_LAYER, PretrainWidget  # noqa: E402
from napari_genselfdiff._widgets.progress import ProgressPanel  # noqa: E402
from napari_genselfdiff.core.errors import GenSelfDiffWarning  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("settings_dir")]

DOCKS = ["Pretrain (self-supervised)", "Fine-tune segmentation", "Predict glands / nuclei", "Annotate and refine"]
#: Tallest minimum a dock widget may ask for: four must fit stacked in a 1080-pixel window.
MAX_MIN_HEIGHT = 400


def test_every_dock_widget_scrolls_so_four_fit_stacked_on_a_1080_pixel_screen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1920, 1080)
    widgets = [viewer.window.add_plugin_dock_widget("napari-genselfdiff", name)[1] for name in DOCKS]
    qtbot.wait(50)
    for name, w in zip(DOCKS, widgets):
        scroll = w.findChild(VerticalScroll)
        assert scroll is not None, f"{name} does not scroll"
        content = scroll.widget()
        assert w.minimumSizeHint().height() < MAX_MIN_HEIGHT, name
        assert content.minimumSizeHint().height() > MAX_MIN_HEIGHT or name.startswith("Predict"), name
        # never narrower than its content (once napari's style has reached it): nothing is cut sideways
        qtbot.waitUntil(lambda: w.minimumSizeHint().width() >= content.minimumSizeHint().width(), timeout=3000)
    assert window.minimumSizeHint().height() <= 1080  # was 1987 without the scroll areas
    # issue 35 item 10: stacked, the docks share the column (they got 89, 170, 306 and 442 px) and
    # each dock's action buttons and progress stay in sight (pinned under its scroll area)
    from qtpy.QtWidgets import QDockWidget

    docks = [w.parentWidget() for w in widgets]
    assert all(isinstance(d, QDockWidget) for d in docks)
    qtbot.waitUntil(lambda: max(d.height() for d in docks) < 1.25 * min(d.height() for d in docks), timeout=3000)
    qtbot.wait(200)
    for w, buttons in zip(widgets[:3], [[widgets[0].start_btn, widgets[0].cancel_btn],
                                        [widgets[1].start_btn, widgets[1].cancel_btn],
                                        [widgets[2].fov_btn, widgets[2].slide_btn, widgets[2].cancel_btn]]):
        for b in buttons + [w.progress.bar]:
            seen = b.visibleRegion().boundingRect()
            assert b.isVisible() and seen.height() == b.height() and seen.width() == b.width(), b.text()
    assert widgets[0].progress.plot.isHidden() and widgets[1].progress.plot.isHidden()  # idle: no empty plot
    shots = Path(__file__).resolve().parents[1] / "screenshots"
    shots.mkdir(exist_ok=True)
    assert window.grab().save(str(shots / "four_docks_stacked.png"))
    for w in widgets[:2]:  # the training widgets' wrapped device line gets all the height it needs
        label = w.device.info
        qtbot.waitUntil(lambda label=label: label.height() >= label.heightForWidth(label.width()), timeout=3000)


def test_idle_progress_bars_show_no_count(qtbot):
    panel = ProgressPanel(with_plot=False)
    qtbot.addWidget(panel)
    assert not panel.bar.isTextVisible() and panel.bar.value() == 0
    panel.set_step(3, 10)
    assert panel.bar.isTextVisible() and panel.bar.text() == "3 / 10"
    panel.reset()  # busy until the first event; it stops before any step
    panel._on_stopped(cancelled=True)
    assert not panel.bar.isTextVisible() and panel.bar.maximum() == 1


def test_the_pretrain_source_list_leaves_out_our_generated_tiles(make_napari_viewer):
    viewer = make_napari_viewer()
    rgb = np.zeros((32, 32, 3), np.uint8)
    viewer.add_image(rgb, name="H&E", rgb=True)
    viewer.add_image(rgb, name=TILES_LAYER, rgb=True)
    viewer.add_image(rgb, name="renamed tiles", rgb=True, metadata={GENERATED_KEY: True})
    w = PretrainWidget(viewer)
    assert [w.layers.item(i).text() for i in range(w.layers.count())] == ["H&E"]


def test_only_our_warnings_become_notifications_while_a_job_runs(qtbot, monkeypatch, caplog):
    """A job during which a library warns a hundred times (every occurrence reaches the worker)
    shows only this package's warnings, each once; the others go to the log."""
    shown: list[str] = []
    monkeypatch.setattr(jobs, "show_warning", shown.append)
    ours = str(jobs.PACKAGE_DIR / "project" / "store.py")

    def job():
        for _ in range(100):
            warnings.warn("numpy.foo is deprecated", DeprecationWarning)  # this file: not ours
        warnings.warn_explicit("the label store could not be updated", UserWarning, ours, 1)
        for _ in range(3):
            warnings.warn("a warning of ours", GenSelfDiffWarning)
        yield "done"

    runner = jobs.JobRunner("prediction")
    with caplog.at_level(logging.WARNING, logger=jobs.log.name):
        runner.start(job)
        qtbot.waitUntil(lambda: not runner.running, timeout=30_000)
    assert shown == ["prediction: the label store could not be updated", "prediction: a warning of ours"]
    logged = [r.getMessage() for r in caplog.records if r.name == jobs.log.name]
    assert sum("numpy.foo is deprecated" in m for m in logged) == 100
    assert not any("of ours" in m for m in logged)


def test_is_our_warning_by_category_or_file():
    assert jobs.is_our_warning(GenSelfDiffWarning, "/somewhere/else.py")
    assert jobs.is_our_warning(UserWarning, jobs.PACKAGE_DIR / "slide" / "tiler.py")
    assert not jobs.is_our_warning(DeprecationWarning, "/usr/lib/python3/site-packages/numpy/core.py")
    assert not jobs.is_our_warning(UserWarning, "<string>")


def test_every_row_of_every_dock_explains_itself_on_hover(make_napari_viewer, qtbot):
    """Issue 35 item 10: no jargon without a tooltip. Every form row (Tile, Overlap, Batch, Run on,
    Pretext, Sampling steps, Loss, ...) has an explanation, shown over its label as over its field."""
    from qtpy.QtCore import QEvent, QPoint
    from qtpy.QtGui import QHelpEvent
    from qtpy.QtWidgets import QApplication, QFormLayout, QLabel, QToolTip

    from napari_genselfdiff._widgets.inputs import field_tip

    viewer = make_napari_viewer(show=True)
    widgets = [viewer.window.add_plugin_dock_widget("napari-genselfdiff", name)[1] for name in DOCKS]
    labels = {}  # (dock, row label) -> the label widget
    for name, w in zip(DOCKS, widgets):
        for form in w.findChildren(QFormLayout):
            for i in range(form.rowCount()):
                item = form.itemAt(i, QFormLayout.ItemRole.LabelRole)
                if item is not None and isinstance(item.widget(), QLabel) and item.widget().text():
                    labels[(name, item.widget().text())] = item.widget()
    missing = [key for key, lb in labels.items() if lb.buddy() is None or not field_tip(lb.buddy())]
    assert len(labels) >= 40 and missing == [], missing
    # each row explains its own field, not a neighbour's
    tip = {key: field_tip(lb.buddy()) for key, lb in labels.items()}
    assert "arithmetic" in tip[("Predict glands / nuclei", "Precision")]
    assert "where the network runs" in tip[("Predict glands / nuclei", "Device")]
    predict = widgets[DOCKS.index("Predict glands / nuclei")]
    tile = labels[("Predict glands / nuclei", "Tile")]
    qtbot.waitExposed(tile)
    QApplication.sendEvent(tile, QHelpEvent(QEvent.Type.ToolTip, QPoint(2, 2), tile.mapToGlobal(QPoint(2, 2))))
    qtbot.waitUntil(lambda: QToolTip.text() == predict.tile.toolTip(), timeout=3000)
    assert "square tiles" in QToolTip.text()
