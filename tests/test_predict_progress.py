"""The Predict widget's field of view as a job (issue #15, items 4 and 7): tile progress with an
ETA in the panel, a warning when the view is the whole image, Cancel stopping within one model
call, and a second view updating the result layers in place instead of replacing them.

A fake model (counting its calls, optionally sleeping per tile) stands in for the checkpoint, so
these tests measure work, not time. Runs under Xvfb (pytest-xvfb) with QT_API=pyqt6.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

import napari  # noqa: E402,F401  (declared: missing or broken is a failure, never a skip)
import pytestqt  # noqa: E402,F401

from napari_genselfdiff._sample_data import sample_he  # noqa: E402
from napari_genselfdiff.bundled import bundled_models  # noqa: E402
from napari_genselfdiff.core.inference import PredictorCache  # noqa: E402
from napari_genselfdiff.core.progress import Progress  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("settings_dir")]


class FakeModel:
    """What the widget needs from a TorchPredictor: dark pixels are glands."""

    num_classes, tile_multiple, mpp, task = 2, 1, None, "glands"
    class_names = ["background", "gland"]
    postprocess_options = None

    def __init__(self, seconds_per_tile: float = 0.0) -> None:
        self.seconds_per_tile = seconds_per_tile
        self.sizes: list[int] = []

    def overlap_for(self, tile: int, requested: int | None = None):
        return 16, None

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.sizes.append(len(tiles))
        time.sleep(self.seconds_per_tile * len(tiles))
        fg = np.clip((0.75 - tiles.astype(np.float32).mean(axis=-1) / 255.0) * 4.0, 0.0, 1.0)
        return np.stack([1.0 - fg, fg], axis=1).astype(np.float32)


def use_model(monkeypatch, model: FakeModel) -> None:
    monkeypatch.setattr("napari_genselfdiff._widgets.whole_slide.cached_predictor",
                        lambda path, device, cache, **options: PredictorCache(("fake", device), model))


@pytest.fixture
def warned(monkeypatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr("napari_genselfdiff._widgets.jobs.show_warning", seen.append)
    return seen


def predict_widget(viewer):
    from napari_genselfdiff._widgets.predict import PredictWidget

    w = PredictWidget(viewer)
    viewer.window.add_dock_widget(w, name="Predict", area="right")
    if not w.model_path():
        w.add_model(str(bundled_models()["glands"]))
    w.device.combo.setCurrentText("cpu")
    w.tile.setValue(128)
    w.overlap.setValue(16)
    w.probability.setChecked(True)
    return w


def wait_idle(qtbot, w, timeout: int = 60_000) -> None:
    qtbot.waitUntil(lambda: not w.runner.running, timeout=timeout)


def test_whole_image_view_warns_shows_tiles_and_eta_and_cancels_within_one_call(make_napari_viewer, qtbot,
                                                                                 monkeypatch, warned):
    model = FakeModel(seconds_per_tile=0.15)  # 63 tiles: about 10 s if it were not cancelled
    use_model(monkeypatch, model)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(sample_he()[0][0], name="H&E", rgb=True)
    w = predict_widget(viewer)
    viewer.reset_view()  # the fitted view: the whole image
    progress, status = [], []

    def on_event(ev):
        if isinstance(ev, Progress):
            progress.append(ev)
            status.append(w.progress.status.text())

    w.runner.event.connect(on_event)
    w.fov_btn.click()
    qtbot.waitUntil(lambda: sum(e.tiles_computed > 0 for e in progress) >= 2, timeout=30_000)
    w.cancel_btn.click()
    calls = len(model.sizes)
    wait_idle(qtbot, w)
    assert len(model.sizes) <= calls + 1  # at most the call in flight when Cancel came
    assert sum(model.sizes) < progress[0].total == 7 * 9
    assert "cancelled" in w.progress.status.text() and "glands" not in viewer.layers
    assert any("shows all of" in m and "Predict whole slide" in m for m in warned)
    assert all(e.stage == "predict" for e in progress)
    # tissue-free tiles come first, without an ETA; from the first computed tile on it is known
    k = next(i for i, e in enumerate(progress) if e.tiles_computed > 0)
    assert progress[k].step >= 1 and progress[k].eta_s is not None and progress[k].eta_s > 0
    assert "tiles" in status[k] and "ETA" in status[k]
    assert w.fov_btn.isEnabled()


def test_a_second_view_updates_the_result_layers_in_place(make_napari_viewer, qtbot, monkeypatch, warned):
    use_model(monkeypatch, FakeModel())
    viewer = make_napari_viewer(show=True)
    viewer.add_image(sample_he()[0][0], name="H&E", rgb=True)
    w = predict_widget(viewer)
    viewer.reset_view()
    camera = viewer.scene.camera
    camera.center, camera.zoom = (200, 300), camera.zoom * 3
    w.fov_btn.click()
    wait_idle(qtbot, w)
    glands, prob = viewer.layers["glands"], viewer.layers["glands probability"]
    assert glands.data.dtype == np.int32 and prob.data.dtype == np.float32 and not warned
    y, x = (int(round(v)) for v in glands.translate)
    assert not (y <= 500 <= y + glands.data.shape[0] and x <= 700 <= x + glands.data.shape[1])
    camera.center = (500, 700)  # pan: another region
    w.fov_btn.click()
    wait_idle(qtbot, w)
    # the same layer objects, now covering the new view (scale 1: translate = level pixels)
    assert viewer.layers["glands"] is glands and viewer.layers["glands probability"] is prob
    y, x = (int(round(v)) for v in glands.translate)
    h, wd = glands.data.shape
    assert y <= 500 <= y + h and x <= 700 <= x + wd
    assert glands.data.dtype == np.int32 and prob.data.shape == (h, wd)
    assert tuple(prob.translate) == tuple(glands.translate)
    assert [layer.name for layer in viewer.layers].count("glands") == 1
    w.probability.setChecked(False)  # unticked: the probability layer goes, the labels stay
    w.fov_btn.click()
    wait_idle(qtbot, w)
    assert "glands probability" not in viewer.layers and viewer.layers["glands"] is glands
