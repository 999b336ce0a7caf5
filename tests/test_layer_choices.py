"""The layer lists of the dock widgets (``_widgets.inputs.LayerChoices``): they follow the viewer's
layers, and a widget that was never docked can be garbage collected without an error (the known bug
of issue #15: ``_disconnect`` raised AttributeError from Qt's ``destroyed`` signal once the garbage
collector had cleared the choices' attributes, as it does to objects of one reference cycle)."""
from __future__ import annotations

import gc
import os
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

import napari  # noqa: E402,F401  (declared: missing or broken is a failure, never a skip)
import pytestqt  # noqa: E402,F401

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("settings_dir")]


@pytest.fixture
def uncaught(monkeypatch) -> list:
    """Exceptions nobody catches: in a Qt slot (PyQt calls sys.excepthook) or a finaliser."""
    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    return seen


def test_choices_cleared_by_the_garbage_collector_disconnect_without_error(make_napari_viewer, qtbot, uncaught):
    from qtpy.QtWidgets import QComboBox

    from napari_genselfdiff._widgets.inputs import LayerChoices, is_rgb_image

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="a")
    combo = QComboBox()
    choices = LayerChoices(viewer, is_rgb_image, combo)
    assert [combo.itemText(i) for i in range(combo.count())] == ["a"]
    vars(choices).clear()  # what gc's clearing of a reference cycle does, before Qt deletes the widget
    with qtbot.capture_exceptions() as raised:
        combo.deleteLater()  # -> destroyed -> _disconnect: AttributeError '_events' before the fix
        qtbot.wait(50)
    assert [e[1] for e in raised] == [] and uncaught == []


def test_an_undocked_widget_is_collected_and_stops_following_the_viewer(make_napari_viewer, qtbot, uncaught):
    from napari_genselfdiff._widgets.predict import PredictWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="H&E")
    w = PredictWidget(viewer)  # never docked: nothing owns it but this name
    assert w.image_layer.currentText() == "H&E"
    combo, alive = w.image_layer, weakref.ref(w)
    with qtbot.capture_exceptions() as raised:
        del w
        gc.collect()
        qtbot.wait(10)
        assert alive() is None
        viewer.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="second")  # nobody refreshes a dead combo
        viewer.layers["H&E"].name = "renamed"
        qtbot.wait(10)
    assert [e[1] for e in raised] == [] and uncaught == []
    del combo


def test_the_choices_follow_inserts_renames_and_removals(make_napari_viewer):
    from qtpy.QtWidgets import QComboBox

    from napari_genselfdiff._widgets.inputs import LayerChoices, is_rgb_image

    viewer = make_napari_viewer()
    combo = QComboBox()
    choices = LayerChoices(viewer, is_rgb_image, combo)
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="a")
    viewer.add_image(np.zeros((16, 16), np.uint8), name="grey")  # not RGB: not offered
    assert [combo.itemText(i) for i in range(combo.count())] == ["a"]
    viewer.layers["a"].name = "b"
    assert combo.currentText() == "b" and choices.current() is viewer.layers["b"]
    viewer.layers.remove("b")
    assert combo.count() == 0 and choices.current() is None


def test_a_greyscale_image_is_not_listed_and_the_choosers_say_why(make_napari_viewer, qtbot, tmp_path):
    """Issue 35 item 9: greyscale images were silently missing from the image lists."""
    from napari_genselfdiff._widgets.finetune import FinetuneWidget
    from napari_genselfdiff._widgets.predict import PredictWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.uint8), name="grey scan")
    predict, finetune = PredictWidget(viewer), FinetuneWidget(viewer)
    for w in (predict, finetune):
        combo = w.image_layer
        assert combo.count() == 0
        assert combo.placeholderText() == "'grey scan' is greyscale, not H&E"
        assert "'grey scan' is greyscale: the models read H&E colour" in combo.toolTip()
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="H&E")
    for w in (predict, finetune):
        combo = w.image_layer
        assert [combo.itemText(i) for i in range(combo.count())] == ["H&E"]
        assert combo.placeholderText() == "" and "'grey scan' is greyscale" in combo.toolTip()
    viewer.layers.remove("grey scan")
    assert "grey scan" not in predict.image_layer.toolTip()
    viewer.window.add_dock_widget(predict, name="Predict")
    viewer.layers.remove("H&E")
    viewer.add_image(np.zeros((16, 16), np.uint8), name="grey scan")
    qtbot.wait(50)
    path = Path(os.environ.get("GENSELFDIFF_SHOTS", tmp_path)) / "predict_greyscale.png"
    predict.grab().save(str(path))
    assert path.stat().st_size > 0


def test_slides_open_with_our_reader_once_a_widget_is_opened_and_a_users_choice_stays(make_napari_viewer, qtbot):
    """Issue 35 item 9: File > Open asked "napari-genselfdiff or builtins" for every slide."""
    from types import SimpleNamespace

    import yaml
    from napari.plugins.utils import get_preferred_reader
    from napari.settings import get_settings

    from napari_genselfdiff import __file__ as package
    from napari_genselfdiff._widgets.predict import PredictWidget
    from napari_genselfdiff._widgets.readers import PLUGIN, SLIDE_PATTERNS, prefer_our_reader

    manifest = yaml.safe_load((Path(package).parent / "napari.yaml").read_text())
    claimed = set(manifest["contributions"]["readers"][0]["filename_patterns"])
    assert set(SLIDE_PATTERNS) == claimed - {"*.zarr"}
    fake = SimpleNamespace(plugins=SimpleNamespace(extension2reader={"*.tif": "napari"}))
    assert "*.tif" not in prefer_our_reader(fake)
    assert fake.plugins.extension2reader["*.tif"] == "napari"  # the user's choice is kept
    assert fake.plugins.extension2reader["*.svs"] == PLUGIN and prefer_our_reader(fake) == []

    viewer = make_napari_viewer()
    settings = get_settings()
    before = dict(settings.plugins.extension2reader)
    try:
        settings.plugins.extension2reader = {"*.tiff": "napari"}
        assert get_preferred_reader("slide.svs") is None  # napari would ask
        PredictWidget(viewer)
        assert get_preferred_reader("slide.svs") == PLUGIN and get_preferred_reader("scan.ndpi") == PLUGIN
        assert get_preferred_reader("image.tiff") == "napari"
    finally:
        settings.plugins.extension2reader = before
