import numpy as np
from test_predict_progress import FakeModel, predict_widget, use_model
from napari_genselfdiff._sample_data import sample_he
from napari_genselfdiff.core.progress import Progress
from napari_genselfdiff._widgets.finetune import FinetuneWidget


def test_shots(make_napari_viewer, qtbot, monkeypatch, settings_dir):
    use_model(monkeypatch, FakeModel(seconds_per_tile=0.3))
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1920, 1080)
    viewer.add_image(sample_he()[0][0], name="H&E", rgb=True)
    w = predict_widget(viewer)
    viewer.reset_view()
    seen = []
    w.runner.event.connect(lambda e: seen.append(e) if isinstance(e, Progress) and e.tiles_computed else None)
    w.fov_btn.click()
    qtbot.waitUntil(lambda: len(seen) >= 4, timeout=60_000)
    qtbot.wait(100)
    viewer.window._qt_window.grab().save("/tmp/meas/shot_predict_progress.png")
    w.cancel_btn.click()
    qtbot.wait(50)
    viewer.window._qt_window.grab().save("/tmp/meas/shot_predict_cancelling.png")
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    qtbot.wait(100)
    viewer.window._qt_window.grab().save("/tmp/meas/shot_predict_cancelled.png")
    f = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(f, name="Fine-tune", area="right")
    f.controls.begin("fine-tuning…")
    f.controls.progress.show_progress(Progress("finetune", 6, 30, lr=1e-4, eta_s=95.0, activity="validating 3/8"))
    qtbot.wait(200)
    viewer.window._qt_window.grab().save("/tmp/meas/shot_finetune_validating.png")
    f.controls.set_running(False)
