"""The napari plugin: manifest, dock widgets running real (tiny) jobs in a real viewer, cancel,
closing during a job, error paths, remembered settings, reader / writer / sample data.

Runs under Xvfb (pytest-xvfb) with QT_API=pyqt6. Screenshots of each docked widget are saved
to ``screenshots/`` at the repository root (git-ignored) for a person to look at.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import napari  # noqa: E402,F401  (declared: missing or broken is a failure, never a skip)
import pytestqt  # noqa: E402,F401

from qtpy.QtCore import QThreadPool, Qt, QTimer  # noqa: E402

from napari_genselfdiff._sample_data import SAMPLE_NAME, sample_he  # noqa: E402
from napari_genselfdiff._widgets.finetune import FinetuneWidget  # noqa: E402
from napari_genselfdiff._widgets.pretrain import TILES_LAYER, PretrainWidget  # noqa: E402
from napari_genselfdiff._widgets.settings import SETTINGS_FILE, Settings  # noqa: E402
from napari_genselfdiff.core.data import LabeledImage  # noqa: E402
from napari_genselfdiff.core.progress import Progress  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("settings_dir")]

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "screenshots"
MANIFEST = REPO / "src" / "napari_genselfdiff" / "napari.yaml"


# ---------------------------------------------------------------------------------------------
# fixtures and helpers



@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Messages the widgets sent to napari's error notifications."""
    seen: list[str] = []
    import napari.utils.notifications as notifications

    original = notifications.show_error

    def record(message: str) -> None:
        seen.append(message)
        original(message)

    for module in ("jobs", "pretrain", "finetune", "predict", "measure"):
        monkeypatch.setattr(f"napari_genselfdiff._widgets.{module}.show_error", record)
    return seen


@pytest.fixture(scope="session")
def he_image() -> np.ndarray:
    return sample_he()[0][0]


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer(show=True)
    v.window._qt_window.resize(1280, 900)
    return v


class Ticker:
    """Counts QTimer ticks: proof that the GUI event loop runs while a job works."""

    def __init__(self, interval_ms: int = 20):
        self.count = 0
        self.timer = QTimer()
        self.timer.timeout.connect(self._tick)
        self.timer.start(interval_ms)

    def _tick(self) -> None:
        self.count += 1

    def stop(self) -> int:
        self.timer.stop()
        return self.count


def dock(viewer, widget, name: str):
    viewer.window.add_dock_widget(widget, name=name, area="right")
    return widget


def screenshot(viewer, qtbot, name: str) -> Path:
    SHOTS.mkdir(exist_ok=True)
    viewer.reset_view()
    qtbot.wait(100)
    path = SHOTS / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.stat().st_size > 10_000
    return path


def tiny_pretrain_settings(w: PretrainWidget, out: Path, steps: int) -> None:
    w.preset.setCurrentText("tiny")
    w.patch.setValue(32)
    w.steps.setValue(steps)
    w.batch.setValue(2)
    w.device.combo.setCurrentText("cpu")
    w.out.setText(str(out))
    w.n_tiles.setValue(4)
    w.ddim_steps.setValue(2)


def training_state(ckpt: Path) -> dict:
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    return json.loads((ckpt / "training_state.json").read_text())


def wait_idle(qtbot, widget, timeout: int = 60_000) -> None:
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# manifest

def test_manifest_validates_and_contributes_the_widgets():
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(MANIFEST)
    pm.validate_imports()
    widgets = {w.display_name: w.command for w in pm.contributions.widgets}
    assert set(widgets) == {"Pretrain (self-supervised)", "Fine-tune segmentation", "Predict glands / nuclei",
                            "Annotate and refine"}
    commands = {c.id: c.python_name for c in pm.contributions.commands}
    assert commands[widgets["Pretrain (self-supervised)"]].endswith("pretrain:PretrainWidget")
    assert [r.command for r in pm.contributions.readers] == ["napari-genselfdiff.get_reader"]
    assert pm.contributions.writers[0].layer_types == ["labels"]
    assert pm.contributions.sample_data[0].display_name == SAMPLE_NAME


def test_napari_discovers_this_manifest():
    """npe2 resolves the entry point ``napari_genselfdiff:napari.yaml`` through the package's
    search path (sys.path), so with PYTHONPATH=src it loads the manifest of this checkout."""
    from importlib.util import find_spec

    from npe2 import PluginManager, PluginManifest

    [location] = find_spec("napari_genselfdiff").submodule_search_locations
    assert Path(location) / "napari.yaml" == MANIFEST
    pm = PluginManager()
    pm.discover(include_npe1=False)
    found = pm.get_manifest("napari-genselfdiff")
    assert found.contributions.widgets == PluginManifest.from_file(MANIFEST).contributions.widgets


# ---------------------------------------------------------------------------------------------
# settings

def test_settings_are_remembered_between_widgets(make_napari_viewer, settings_dir):
    v = make_napari_viewer()
    w = PretrainWidget(v)
    w.steps.setValue(1234)
    w.preset.setCurrentText("tiny")
    w.out.setText("/somewhere/else")
    w.resume.setChecked(False)
    again = PretrainWidget(v)
    assert again.steps.value() == 1234
    assert again.preset.currentText() == "tiny"
    assert again.out.text() == "/somewhere/else"
    assert not again.resume.isChecked()
    assert (settings_dir / SETTINGS_FILE).is_file()
    other = FinetuneWidget(v)  # sections are per widget
    assert other.steps.value() == 500


def test_a_remembered_device_this_machine_lacks_is_not_restored(make_napari_viewer):
    from napari_genselfdiff.core.device import available_devices

    missing = next((d for d in ("cuda", "mps") if d not in available_devices()), None)
    if missing is None:
        pytest.skip("this machine has both cuda and mps")
    Settings("pretrain").set("device", missing)
    w = PretrainWidget(make_napari_viewer())
    assert w.device.device == "auto"
    assert "found: " in w.device.info.text() and "using" in w.device.info.text()


def test_damaged_settings_file_falls_back_to_defaults(make_napari_viewer, settings_dir):
    settings_dir.mkdir(parents=True)
    (settings_dir / SETTINGS_FILE).write_text("{not json")
    w = PretrainWidget(make_napari_viewer())
    assert w.steps.value() == 1000
    w.steps.setValue(7)  # and it repairs the file
    assert Settings("pretrain").get("steps") == 7


# ---------------------------------------------------------------------------------------------
# pretraining

def test_pretrain_widget_trains_and_shows_generated_tiles(viewer, qtbot, tmp_path, he_image):
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = dock(viewer, PretrainWidget(viewer), "Pretrain")
    assert [w.layers.item(i).text() for i in range(w.layers.count())] == ["H&E"]
    w.layers.item(0).setSelected(True)
    out = tmp_path / "pretrained"
    tiny_pretrain_settings(w, out, steps=4)
    ticker = Ticker()
    w.start_btn.click()
    assert not w.start_btn.isEnabled() and w.cancel_btn.isEnabled()
    wait_idle(qtbot, w)
    assert ticker.stop() >= 5  # the event loop kept running during the job
    assert w.start_btn.isEnabled() and not w.cancel_btn.isEnabled()
    assert training_state(out)["step"] == 4
    assert json.loads((out / "config.json").read_text())["kind"] == "pretrain"
    tiles = viewer.layers[TILES_LAYER]
    assert tiles.rgb and tiles.data.dtype == np.uint8
    assert tiles.data.shape == (2 * 34 + 2, 2 * 34 + 2, 3)  # 4 tiles of 32 px in a 2x2 grid, 2 px gaps
    assert len(w.progress.plot.values) == 4 and not w.progress.plot.isHidden()  # hidden until the first loss
    assert w.progress.bar.value() == w.progress.bar.maximum()
    assert "generated" in w.progress.status.text()
    assert "after only 4 steps the tiles may well be coloured noise" in w.progress.status.text()  # not a fault
    viewer.layers.selection.active = viewer.layers["H&E"]
    screenshot(viewer, qtbot, "pretrain_widget")


def test_cancel_stops_pretraining_and_keeps_a_checkpoint(viewer, qtbot, tmp_path, he_image):
    viewer.add_image(he_image[:256, :256], name="H&E", rgb=True)
    w = dock(viewer, PretrainWidget(viewer), "Pretrain")
    w.layers.item(0).setSelected(True)
    out = tmp_path / "cancelled"
    tiny_pretrain_settings(w, out, steps=100_000)
    ticker = Ticker()
    w.start_btn.click()
    qtbot.waitUntil(lambda: w.progress.bar.value() >= 2, timeout=60_000)
    w.cancel_btn.click()
    said = [w.progress.status.text()]
    w.runner.event.connect(lambda ev: said.append(w.progress.status.text()))
    if w.runner.running:  # a step event still in flight, as the worker's queue delivers them
        w.runner.event.emit(Progress("pretrain", 3, 100_000, loss=0.5))
    wait_idle(qtbot, w, timeout=30_000)
    assert ticker.stop() >= 5
    state = training_state(out)
    assert 2 <= state["step"] < 100_000
    # no step update replaces "cancelling…" while the job winds down (events still in flight)
    assert said and all(t.startswith("cancelling") for t in said), said
    assert "cancelled" in w.progress.status.text()
    assert TILES_LAYER not in viewer.layers
    assert w.start_btn.isEnabled()  # and it can start again: resume the same run
    w.steps.setValue(state["step"] + 1)
    w.start_btn.click()
    wait_idle(qtbot, w)
    assert training_state(out)["step"] == state["step"] + 1


def test_removing_the_dock_during_a_job_stops_it(viewer, qtbot, tmp_path, he_image):
    viewer.add_image(he_image[:256, :256], name="H&E", rgb=True)
    w = dock(viewer, PretrainWidget(viewer), "Pretrain")
    w.layers.item(0).setSelected(True)
    out = tmp_path / "removed"
    tiny_pretrain_settings(w, out, steps=100_000)
    w.start_btn.click()
    qtbot.waitUntil(lambda: w.progress.bar.value() >= 1, timeout=60_000)
    viewer.window.remove_dock_widget(w)
    wait_idle(qtbot, w, timeout=30_000)
    assert 1 <= training_state(out)["step"] < 100_000


def test_closing_the_viewer_during_a_job_stops_it(make_napari_viewer, qtbot, tmp_path, he_image):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(he_image[:256, :256], name="H&E", rgb=True)
    w = dock(viewer, PretrainWidget(viewer), "Pretrain")
    w.layers.item(0).setSelected(True)
    out = tmp_path / "closed"
    tiny_pretrain_settings(w, out, steps=100_000)
    w.start_btn.click()
    qtbot.waitUntil(lambda: w.progress.bar.value() >= 1, timeout=60_000)
    worker = w.runner.worker
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    assert QThreadPool.globalInstance().waitForDone(10_000)
    assert 1 <= training_state(out)["step"] < 100_000


def test_pretrain_without_sources_is_a_readable_error(make_napari_viewer, tmp_path, errors):
    w = PretrainWidget(make_napari_viewer())
    w.out.setText(str(tmp_path / "x"))
    w.start_btn.click()
    assert errors and "choose at least one image layer" in errors[-1]
    assert not w.runner.running and w.start_btn.isEnabled()
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# fine-tuning

def painted_labels(shape: tuple[int, int]) -> np.ndarray:
    """A few painted 'glands': discs in all four quadrants."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint8)
    for i, (cy, cx) in enumerate([(0.25, 0.25), (0.25, 0.75), (0.75, 0.3), (0.7, 0.7)], start=1):
        labels[(yy - cy * shape[0]) ** 2 + (xx - cx * shape[1]) ** 2 < (0.12 * shape[0]) ** 2] = i
    return labels


def tiny_finetune_settings(w: FinetuneWidget, out: Path, steps: int) -> None:
    w.preset.setCurrentText("tiny")
    w.patch.setValue(64)
    w.steps.setValue(steps)
    w.batch.setValue(2)
    w.device.combo.setCurrentText("cpu")
    w.out.setText(str(out))


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory) -> Path:
    """A tiny diffusion-pretrained model (two steps of the core's pretraining)."""
    from napari_genselfdiff.core.data import ImageSource
    from napari_genselfdiff.core.progress import drain
    from napari_genselfdiff.core.train.training import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("models") / "pretrained-tiny"
    cfg = PretrainConfig(preset="tiny", steps=2, patch=32, batch=2, checkpoint_every=0)
    drain(pretrain([ImageSource(sample_he()[0][0][:128, :128], "crop")], out, cfg, device="cpu"))
    return out


def test_finetune_widget_trains_with_validation_dice(viewer, qtbot, tmp_path, he_image, pretrained_model):
    image = he_image[:192, :192]
    viewer.add_image(image, name="H&E", rgb=True)
    viewer.add_labels(painted_labels(image.shape[:2]), name="glands drawn")
    w = dock(viewer, FinetuneWidget(viewer), "Fine-tune")
    assert w.image_layer.currentText() == "H&E" and w.labels_layer.currentText() == "glands drawn"
    out = tmp_path / "seg"
    tiny_finetune_settings(w, out, steps=3)
    w.val_fraction.setValue(0.25)  # one quadrant of four held out
    w.init.setText(str(pretrained_model))
    events = []
    w.runner.event.connect(events.append)
    ticker = Ticker()
    w.start_btn.click()
    wait_idle(qtbot, w)
    assert ticker.stop() >= 5
    assert training_state(out)["step"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "segmentation" and config["task"]["task"] == "glands"
    assert len(config["training"]["train_images"]) == 3 and len(config["training"]["val_images"]) == 1
    assert config["training"]["init_info"]["init_kind"] == "pretrain"
    dice = [e.metrics["val_dice"] for e in events if e.metrics]
    assert dice and 0.0 <= dice[-1] <= 1.0
    assert "validation Dice" in w.progress.status.text()
    assert Settings("models").get("recent_models") == [str(out)]
    viewer.layers.selection.active = viewer.layers["glands drawn"]
    screenshot(viewer, qtbot, "finetune_widget")


def test_finetune_widget_trains_a_nuclei_model_with_a_distance_map(viewer, qtbot, tmp_path, he_image):
    image = he_image[:128, :128]
    viewer.add_image(image, name="H&E", rgb=True)
    viewer.add_labels(painted_labels(image.shape[:2]), name="nuclei drawn")
    w = dock(viewer, FinetuneWidget(viewer), "Fine-tune")
    w.task.setCurrentText("glands")
    assert w.boundary.isEnabled() and not w.distance.isEnabled()  # glands: a contour class, no distance map
    assert "contour" in w.boundary.text() and w.distance.isHidden()
    w.boundary.setChecked(True)
    w.distance.setChecked(True)
    assert w.spec().class_names == ("background", "gland", "contour") and not w.spec().distance
    assert w.config().boundary_width == 2
    screenshot(viewer, qtbot, "finetune_widget_glands_contour")
    w.task.setCurrentText("nuclei")
    assert "nuclei" in w.boundary.text()
    w.boundary.setChecked(False)
    assert w.boundary.isEnabled() and not w.distance.isEnabled()  # the map needs the boundary class
    w.distance.setChecked(True)
    assert not w.spec().distance
    w.boundary.setChecked(True)
    assert w.distance.isEnabled() and w.spec().out_channels == 4 and w.config().distance
    out = tmp_path / "nuclei"
    tiny_finetune_settings(w, out, steps=2)
    w.start_btn.click()
    wait_idle(qtbot, w)
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["distance"] is True and config["model"]["out_channels"] == 4
    screenshot(viewer, qtbot, "finetune_widget_nuclei_distance")


def test_finetune_widget_starts_from_the_shipped_backbone_and_can_train_the_head_only(viewer, qtbot, tmp_path,
                                                                                       he_image):
    from napari_genselfdiff.bundled import bundled_backbone
    from napari_genselfdiff.core import checkpoint as ck

    from napari_genselfdiff._widgets.geometry import slide_scale

    image = he_image[:128, :128]
    viewer.add_image(image, name="H&E", rgb=True, **slide_scale(0.5))  # an image in microns
    viewer.add_labels(painted_labels(image.shape[:2]), name="glands drawn", **slide_scale(0.5))
    w = dock(viewer, FinetuneWidget(viewer), "Fine-tune")
    assert w.init.text() == "pretrained" and bundled_backbone() is not None  # the default starting point
    assert w.config().mpp == pytest.approx(0.5)  # the layer's pixel size reaches the model
    w.mpp.setValue(0.25)  # the Pixel size row is for images that do not say, as in Predict: the file's wins
    assert w.config().mpp == pytest.approx(0.5)
    w.mpp.setValue(0.0)
    w.freeze.setChecked(True)
    out = tmp_path / "head-only"
    tiny_finetune_settings(w, out, steps=2)
    assert w.config().freeze_backbone
    w.start_btn.click()
    wait_idle(qtbot, w)
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["init_info"]["init"] == str(bundled_backbone())
    assert config["model"]["norm"] == "layer" and config["mpp"] == pytest.approx(0.5)
    pre, ft = ck.load_weights(bundled_backbone()), ck.load_weights(out)
    assert torch.equal(pre["stem.weight"], ft["stem.weight"])  # frozen
    assert not torch.equal(pre["final_block.conv2.weight"], ft["final_block.conv2.weight"])  # trained
    screenshot(viewer, qtbot, "finetune_widget_backbone")
    w.init.setText("")
    assert not w.config().freeze_backbone and not w.freeze.isEnabled()  # nothing to freeze from random weights


def test_finetune_from_folders_validates_by_image(make_napari_viewer, qtbot, tmp_path, he_image):
    import imageio.v3 as iio

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i, (y, x) in enumerate([(0, 0), (256, 512)]):
        iio.imwrite(tmp_path / "images" / f"t{i}.png", he_image[y:y + 96, x:x + 96])
        iio.imwrite(tmp_path / "masks" / f"t{i}.png", (painted_labels((96, 96)) > 0).astype(np.uint8) * 255)
    w = FinetuneWidget(make_napari_viewer())
    w.source.setCurrentText("folders of image/mask pairs")
    assert w._data_form.isRowVisible(w.images_dir) and not w._data_form.isRowVisible(w.image_layer)
    w.images_dir.setText(str(tmp_path / "images"))
    w.masks_dir.setText(str(tmp_path / "masks"))
    w.val_fraction.setValue(0.5)
    tiny_finetune_settings(w, tmp_path / "seg", steps=2)
    w.start_btn.click()
    wait_idle(qtbot, w)
    training = json.loads((tmp_path / "seg" / "config.json").read_text())["training"]
    assert sorted(training["train_images"] + training["val_images"]) == ["t0", "t1"]
    assert len(training["val_images"]) == 1


def test_finetune_with_empty_labels_shows_an_error_and_starts_nothing(make_napari_viewer, tmp_path, he_image,
                                                                      errors):
    v = make_napari_viewer()
    v.add_image(he_image[:64, :64], name="H&E", rgb=True)
    v.add_labels(np.zeros((64, 64), np.uint8), name="nothing yet")
    w = FinetuneWidget(v)
    tiny_finetune_settings(w, tmp_path / "seg", steps=3)
    w.start_btn.click()
    assert errors and "is empty" in errors[-1] and "nothing yet" in errors[-1]
    assert not w.runner.running and w.start_btn.isEnabled()
    assert not (tmp_path / "seg").exists()


def test_error_in_the_worker_is_notified_and_start_reenabled(make_napari_viewer, qtbot, tmp_path, he_image,
                                                             errors):
    v = make_napari_viewer()
    v.add_image(he_image[:64, :64], name="H&E", rgb=True)
    v.add_labels(painted_labels((64, 64)), name="drawn")
    w = FinetuneWidget(v)
    tiny_finetune_settings(w, tmp_path / "seg", steps=3)
    w.init.setText(str(tmp_path / "missing"))  # a path that is not there: refused before any work
    w.start_btn.click()
    assert errors and "missing: neither a checkpoint folder nor a bundled model" in errors[-1]
    assert w.start_btn.isEnabled() and not w.runner.running
    (tmp_path / "no-such-checkpoint").mkdir()  # a folder holding no checkpoint: only the worker finds out
    w.init.setText(str(tmp_path / "no-such-checkpoint"))
    w.start_btn.click()
    wait_idle(qtbot, w)
    assert errors and "fine-tuning failed" in errors[-1] and "no-such-checkpoint" in errors[-1]
    assert w.start_btn.isEnabled() and not w.cancel_btn.isEnabled()
    assert w.progress.status.text().startswith("failed:")
    assert w.progress.bar.maximum() > 0  # no busy bar left spinning


# ---------------------------------------------------------------------------------------------
# sample data

def test_sample_data_is_the_bundled_he_image():
    [(data, kwargs, kind)] = sample_he()
    assert kind == "image" and kwargs["rgb"] and kwargs["name"] == SAMPLE_NAME
    assert data.shape == (768, 1024, 3) and data.dtype == np.uint8
    assert kwargs["metadata"]["mpp"] == pytest.approx(0.499)


def test_sample_data_opens_through_napari(make_napari_viewer):
    v = make_napari_viewer()
    v.open_sample("napari-genselfdiff", "he_skin")
    assert v.layers[SAMPLE_NAME].rgb and v.layers[SAMPLE_NAME].data.shape == (768, 1024, 3)


def test_widget_can_be_opened_from_the_plugin_menu(make_napari_viewer):
    v = make_napari_viewer()
    dw, widget = v.window.add_plugin_dock_widget("napari-genselfdiff", "Fine-tune segmentation")
    assert isinstance(widget, FinetuneWidget)



# ---------------------------------------------------------------------------------------------
# GeoJSON writer

def test_writer_places_objects_in_full_resolution_pixels(tmp_path):
    """A one-pixel object at label (0, 0) of a crop at offset (3, 5) on a level of downsample 2
    covers full-resolution x 10..12, y 6..8 (pixel edges)."""
    from napari_genselfdiff._writer import write_geojson
    from napari_genselfdiff.formats.geojson import read_geojson

    labels = np.zeros((4, 4), np.int32)
    labels[0, 0] = 7
    meta = {"name": "nuclei", "metadata": {"genselfdiff": {"downsample": 2.0, "offset": [3, 5]}},
            "scale": (2.0, 2.0), "translate": (6.5, 10.5)}
    path = str(tmp_path / "n.geojson")
    assert write_geojson(path, labels, meta) == [path]
    [feature] = read_geojson(path).features
    assert feature.geometry.bounds == (10.0, 6.0, 12.0, 8.0)
    assert feature.class_name == "Nucleus" and feature.object_type == "detection"
    # without our metadata the same grid is read from scale and translate
    del meta["metadata"]
    write_geojson(path, labels, meta)
    assert read_geojson(path).features[0].geometry.bounds == (10.0, 6.0, 12.0, 8.0)


def test_saving_a_labels_layer_as_geojson_round_trips(make_napari_viewer, tmp_path):
    from napari_genselfdiff.formats.geojson import features_to_labels, read_geojson

    v = make_napari_viewer()
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:20] = 1
    labels[20:35, 30:45] = 2
    v.add_labels(labels, name="glands")
    path = tmp_path / "glands.geojson"
    v.layers.save(str(path), selected=False, plugin="napari-genselfdiff")
    result = read_geojson(path)
    assert [f.class_name for f in result.features] == ["Gland", "Gland"]
    back, _ = features_to_labels(result, labels.shape)
    np.testing.assert_array_equal(back, labels)


# ---------------------------------------------------------------------------------------------
# prediction

@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """A tiny glands model, fine-tuned for a few steps with the core (what the widget would load)."""
    from napari_genselfdiff.core.data import TaskSpec, mask_to_target
    from napari_genselfdiff.core.progress import drain
    from napari_genselfdiff.core.train.training import FinetuneConfig, finetune

    image = sample_he()[0][0][:128, :128]
    item = LabeledImage("crop", image, mask_to_target(painted_labels((128, 128)), TaskSpec.make("glands")))
    out = tmp_path_factory.mktemp("models") / "glands-tiny"
    cfg = FinetuneConfig(preset="tiny", steps=3, patch=64, batch=2, checkpoint_every=0, mpp=1.0)
    drain(finetune([item], out, cfg, device="cpu"))
    return out


def predict_widget(viewer, seg_model: Path, out: Path):
    from napari_genselfdiff._widgets.predict import PredictWidget

    w = dock(viewer, PredictWidget(viewer), "Predict")
    w.add_model(str(seg_model))
    w.device.combo.setCurrentText("cpu")
    w.tile.setValue(128)
    w.overlap.setValue(16)
    w.out.setText(str(out))
    w.probability.setChecked(True)
    return w


def pixel_edges(layer) -> np.ndarray:
    """World coordinates of the layer's outer pixel edges (extent.world holds pixel centres)."""
    half = np.asarray(layer.scale) / 2
    return np.stack([layer.extent.world[0] - half, layer.extent.world[1] + half])


def test_predict_field_of_view_adds_aligned_layers(viewer, qtbot, tmp_path, he_image, seg_model, monkeypatch):
    from napari_genselfdiff._widgets.fov_job import region_on_screen

    image = viewer.add_image(he_image, name="H&E", rgb=True, scale=(0.5, 0.5), translate=(100, 200))
    w = predict_widget(viewer, seg_model, tmp_path / "pred")
    assert w.image_layer.currentText() == "H&E" and w.model_path() == str(seg_model)
    viewer.reset_view()
    camera = viewer.scene.camera
    camera.center = (100 + 0.5 * 300, 200 + 0.5 * 400)  # zoomed in on a part of the image
    camera.zoom = camera.zoom * 3
    level, y, x, h, wd = region_on_screen(viewer, image)
    assert level == 0 and 0 < h < 768 and 0 < wd < 1024
    assert y <= 300 <= y + h and x <= 400 <= x + wd
    ticker = Ticker()
    w.fov_btn.click()
    wait_idle(qtbot, w)
    assert ticker.stop() >= 3
    glands = viewer.layers["glands"]
    # the view with a margin around it where the objects its border cuts are found whole
    from napari_genselfdiff.slide.fov import view_margin, with_margin

    mpp = w._predictor.predictor.mpp
    (y, x, gh, gw), view = with_margin((y, x, h, wd), view_margin("glands", mpp), he_image.shape[:2])
    assert gh > h and gw > wd and glands.metadata["genselfdiff_fov"]["regions"] == [list(view)]
    assert glands.data.shape == (gh, gw) and glands.data.dtype == np.int32
    assert tuple(glands.scale) == pytest.approx((0.5, 0.5))
    assert tuple(glands.translate) == pytest.approx((100 + 0.5 * y, 200 + 0.5 * x))
    assert glands.metadata["genselfdiff"] == {"downsample": 1.0, "offset": [y, x], "image": "H&E"}
    h, wd = gh, gw
    prob = viewer.layers["glands probability"]
    assert prob.data.shape == (h, wd) and prob.data.dtype == np.float32
    assert 0.0 <= prob.data.min() and prob.data.max() <= 1.0
    assert tuple(prob.translate) == pytest.approx(tuple(glands.translate))
    assert w.fov_btn.isEnabled()
    # the per-object table: one row per object (made in a worker), napari shows it under the cursor, saved as CSV
    qtbot.waitUntil(w.measure_btn.isEnabled, timeout=30_000)
    ids = np.unique(glands.data[glands.data > 0])
    feats = glands.features
    assert list(feats["Object ID"]) == list(ids) and (feats["Area px^2"] == np.bincount(glands.data.ravel())[ids]).all()
    one = int(ids[0])
    yy, xx = np.argwhere(glands.data == one)[0]
    status = glands.get_status(tuple(np.array(glands.translate) + np.array(glands.scale) * (yy, xx)), world=True)
    assert "Circularity" in str(status)
    # the optical densities come from the H&E under the view (read in the worker), object by object
    from skimage.color import rgb2hed

    hed = rgb2hed(he_image[y:y + h, x:x + wd])
    k = list(feats["Object ID"]).index(one)
    assert feats["Hematoxylin OD mean"][k] == pytest.approx(hed[..., 0][glands.data == one].mean(), rel=1e-5)
    assert feats["Eosin OD mean"][k] == pytest.approx(hed[..., 1][glands.data == one].mean(), rel=1e-5)
    # the table under the canvas: a row per object; a row selects its object and centres it, a click
    # on an object selects its row
    camera = viewer.scene.camera
    view = (tuple(camera.center), camera.zoom)
    table = w.measurements.show_table()
    model = table.model()
    assert table is not None and model.rowCount() == len(ids) and "Objects table" in viewer.window.dock_widgets
    assert w.measurements.show_table() is table  # shown again: the same dock, not a second one
    assert model.headerData(0, Qt.Orientation.Horizontal) == "Object ID"
    k_row = [int(model.index(r, 0).data()) for r in range(model.rowCount())].index(one)
    table.selectRow(k_row)
    assert glands.selected_label == one
    centre = np.argwhere(glands.data == one).mean(axis=0)
    np.testing.assert_allclose(camera.center[-2:], glands.data_to_world(centre)[-2:], atol=1e-6)
    other = int(ids[-1])
    oy, ox = np.argwhere(glands.data == other)[0]

    class Click:  # the event napari hands a mouse callback: where, in world coordinates
        position = tuple(glands.data_to_world((oy, ox)))

    for callback in glands.mouse_drag_callbacks:
        callback(glands, Click())
    assert int(model.index(table.currentIndex().row(), 0).data()) == other
    screenshot(viewer, qtbot, "predict_object_table")
    camera.center, camera.zoom = view  # back to the view predicted, for what follows
    csv_path = w.measurements.save(str(tmp_path / "glands.csv"))
    assert csv_path and (tmp_path / "glands.csv").read_text(encoding="utf-8").count("\n") == len(ids) + 1
    from qtpy.QtWidgets import QFileDialog  # the button asks where (the dialog answered here)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(tmp_path / "b.csv"), "")))
    w.measure_btn.click()
    assert (tmp_path / "b.csv").read_text(encoding="utf-8").startswith("Object ID,")
    fov = w._fov[1]
    computed = fov.tiles_computed
    w.fov_btn.click()  # the same view again: every tile comes from the cache
    wait_idle(qtbot, w)
    assert w._fov[1] is fov and fov.tiles_computed == computed and fov.cache_hits > 0
    glands = viewer.layers["glands"]
    viewer.layers.selection.active = glands
    screenshot(viewer, qtbot, "predict_widget")


def test_objects_are_counted_in_regions_drawn_on_a_shapes_layer(viewer, qtbot, tmp_path, he_image, seg_model, errors):
    """Issue 35 item 5: draw a rectangle and an ellipse over a result, 'Count in drawn regions':
    each shape gets its count, density and area fraction (as region_summary gives them on the
    labels' own grid), written on it. The image is 0.5 µm/px; the model runs at 1 µm/px, so the
    labels have half the image's pixels and the regions are placed through world coordinates."""
    from skimage.draw import ellipse

    from napari_genselfdiff.formats.measurements import region_summary

    viewer.add_image(he_image, name="H&E", rgb=True, scale=(0.5, 0.5), translate=(10, 20), units=("µm", "µm"))
    w = predict_widget(viewer, seg_model, tmp_path / "pred")
    w.measurements.count()  # nothing predicted yet: one clear line
    assert errors and "predict first" in errors[-1]
    viewer.reset_view()
    w.fov_btn.click()
    wait_idle(qtbot, w)
    glands = viewer.layers["glands"]
    labels = glands.data
    assert labels.shape == (384, 512) and tuple(glands.scale) == pytest.approx((1.0, 1.0))
    assert tuple(glands.translate) == pytest.approx((10.25, 20.25))  # label pixel j centred on world 10.25 + j
    w.measurements.count()  # a result, but no regions drawn
    assert "Shapes layer" in errors[-1]
    shapes = viewer.add_shapes([np.array([[60, 120], [60, 320], [160, 320], [160, 120]]),
                                np.array([[230, 330], [230, 390], [280, 390], [280, 330]])],
                               shape_type=["rectangle", "ellipse"], name="regions")
    rows = w.measurements.count()
    assert rows is not None and [r["region"] for r in rows] == [1, 2]
    rect = np.zeros(labels.shape, bool)
    rect[50:150, 100:300] = True  # world 60..160 x 120..320: label pixel centres 50..149 x 100..299
    oval = np.zeros(labels.shape, bool)
    oval[ellipse(244.75, 339.75, 25, 30, shape=labels.shape)] = True
    for row, mask in zip(rows, (rect, oval)):
        want = region_summary(np.where(mask, labels, 0), mask, 1.0)
        assert row["objects"] == want["objects"] and row["area mm^2"] == pytest.approx(want["area mm^2"], rel=0.03)
        assert row["area fraction"] == pytest.approx(want["area fraction"], abs=0.02)
    assert rows[0]["area mm^2"] == pytest.approx(100 * 200 * 1e-6) and rows[0]["objects per mm^2"] > 0
    assert list(shapes.features["objects"]) == [r["objects"] for r in rows] and shapes.text.visible
    status = w.progress.status.text()
    assert f"#1 {rows[0]['objects']} · " in status and f"#2 {rows[1]['objects']} · " in status and "/mm²" in status
    viewer.layers.selection.active = shapes
    screenshot(viewer, qtbot, "predict_region_counts")


def test_predict_field_of_view_on_a_multiscale_level(make_napari_viewer, qtbot, tmp_path, he_image, seg_model):
    viewer = make_napari_viewer()
    pyramid = [he_image, np.ascontiguousarray(he_image[::2, ::2])]
    image = viewer.add_image(pyramid, name="slide", rgb=True, multiscale=True)
    image.locked_data_level = 1
    w = predict_widget(viewer, seg_model, tmp_path / "pred")
    viewer.reset_view()
    w.fov_btn.click()
    wait_idle(qtbot, w)
    glands = viewer.layers["glands"]
    assert glands.data.shape == (384, 512)  # the whole image, at level 1
    assert tuple(glands.scale) == pytest.approx((2.0, 2.0))
    assert tuple(glands.translate) == pytest.approx((0.5, 0.5))  # level pixel j is centred on 2j + 0.5
    # the labels cover exactly the image: the same outer pixel edges
    np.testing.assert_allclose(pixel_edges(glands), pixel_edges(image), atol=1e-6)
    np.testing.assert_allclose(pixel_edges(image), [[-0.5, -0.5], [767.5, 1023.5]])


def test_predict_whole_slide_writes_a_store_and_shows_its_labels(make_napari_viewer, qtbot, tmp_path, he_image,
                                                                 seg_model):
    import zarr

    viewer = make_napari_viewer()
    viewer.add_image(he_image[:256, :384], name="H&E crop", rgb=True, translate=(7, 9))
    w = predict_widget(viewer, seg_model, tmp_path / "pred")
    events = []
    w.runner.event.connect(events.append)
    w.slide_btn.click()
    assert w.cancel_btn.isEnabled() and not w.fov_btn.isEnabled()
    wait_idle(qtbot, w)
    store = tmp_path / "pred" / "H_E_crop-glands-tiny.zarr"
    assert store.is_dir()
    assert zarr.open_group(store, mode="r")["probabilities"].shape == (2, 256, 384)
    assert any(not isinstance(e, str) and e.phase == "predict" for e in events)
    glands = viewer.layers["glands"]
    level0 = glands.data[0] if glands.multiscale else glands.data
    assert level0.shape == (256, 384) and level0.dtype == np.int32
    assert tuple(glands.translate) == pytest.approx((7, 9)) and tuple(glands.scale) == pytest.approx((1, 1))
    prob = viewer.layers["glands probability"]
    assert (prob.data[0] if prob.multiscale else prob.data).dtype == np.uint8
    assert tuple(prob.contrast_limits) == (0, 255)
    assert "done" in w.progress.status.text()
    w.slide_btn.click()  # a second run finds the finished store and only shows it again
    wait_idle(qtbot, w)
    assert "glands" in viewer.layers and w.slide_btn.isEnabled()


def test_predict_normalises_the_stain_when_asked(make_napari_viewer, qtbot, tmp_path, he_image, seg_model):
    """The stain box: the field of view is predicted on the stain-normalised image (other
    probabilities than without), its tile cache is kept apart from the plain one's, and a whole
    slide's store records the normalisation; the status says what it was normalised to."""
    viewer = make_napari_viewer()
    viewer.add_image(he_image[:256, :384], name="H&E crop", rgb=True)
    w = predict_widget(viewer, seg_model, tmp_path / "pred")
    lines = []
    w.runner.event.connect(lambda e: lines.append(e) if isinstance(e, str) else None)
    viewer.reset_view()
    w.fov_btn.click()
    wait_idle(qtbot, w)
    plain = np.array(viewer.layers["glands probability"].data)
    assert not w._fov[0].stain
    w.stain.setChecked(True)
    w.fov_btn.click()
    wait_idle(qtbot, w)
    assert w._fov[0].stain and any("stain normalised to the model's 'training'" in s for s in lines)
    normed = np.array(viewer.layers["glands probability"].data)
    assert normed.shape == plain.shape and np.abs(normed - plain).max() > 0.01
    w.slide_btn.click()
    wait_idle(qtbot, w)
    from napari_genselfdiff.slide.store import PredictionStore

    store = PredictionStore.open(tmp_path / "pred" / "H_E_crop-glands-tiny.zarr")
    assert store.settings["stain"]["target_name"] == "training"


def test_predict_whole_slide_runs_at_the_models_resolution(make_napari_viewer, qtbot, tmp_path, he_image,
                                                           seg_model):
    """The model was trained at 1.0 micron per pixel, the slide is 0.5: level 1 (downsample 2) is
    predicted, and its labels are placed over the image like that level."""
    viewer = make_napari_viewer()
    crop = he_image[:256, :512]
    image = viewer.add_image([crop, np.ascontiguousarray(crop[::2, ::2])], name="slide", rgb=True,
                             multiscale=True, metadata={"mpp": 0.5})
    w = predict_widget(viewer, seg_model, tmp_path / "pred")
    w.probability.setChecked(False)
    w.slide_btn.click()
    wait_idle(qtbot, w)
    glands = viewer.layers["glands"]
    assert glands.data.shape == (128, 256)
    assert tuple(glands.scale) == pytest.approx((2.0, 2.0))
    np.testing.assert_allclose(pixel_edges(glands), pixel_edges(image), atol=1e-6)
    assert glands.metadata["genselfdiff"]["downsample"] == 2.0
    assert "glands probability" not in viewer.layers


def test_cancelled_whole_slide_prediction_can_be_run_again(make_napari_viewer, qtbot, tmp_path, he_image,
                                                            seg_model):
    viewer = make_napari_viewer()
    viewer.add_image(he_image[:320, :320], name="H&E", rgb=True)
    w = predict_widget(viewer, seg_model, tmp_path / "pred")
    w.tile.setValue(64)
    w.batch.setValue(2)
    seen = []
    w.runner.event.connect(lambda e: seen.append(e) if not isinstance(e, str) else None)
    w.slide_btn.click()
    qtbot.waitUntil(lambda: len(seen) >= 1, timeout=30_000)
    w.cancel_btn.click()
    wait_idle(qtbot, w)
    # one 320-px block, cancelled before it was stored: the message says nothing is kept, as the store does
    import zarr

    [store] = list((tmp_path / "pred").glob("*.zarr"))
    assert not np.asarray(zarr.open_group(store, mode="r")["done"][...]).any()
    status = w.progress.status.text()
    assert status.startswith("cancelled") and "nothing is kept" in status and "starts over" in status, status
    assert "glands" not in viewer.layers
    assert seen[-1].step < seen[-1].total
    w._blocks = (9, 63)  # had blocks been stored, the message counts them
    w._on_stopped(True)
    assert "9 of 63 blocks are kept" in w.progress.status.text() and "resumes" in w.progress.status.text()
    assert w.slide_btn.isEnabled() and w.fov_btn.isEnabled()
    w.slide_btn.click()
    wait_idle(qtbot, w)
    assert viewer.layers["glands"].data.shape == (320, 320)


def test_predict_without_a_model_is_a_readable_error(make_napari_viewer, he_image, errors, monkeypatch):
    from napari_genselfdiff._widgets.predict import PredictWidget

    monkeypatch.setattr("napari_genselfdiff._widgets.predict.bundled_models", dict)
    v = make_napari_viewer()
    v.add_image(he_image[:64, :64], name="H&E", rgb=True)
    w = PredictWidget(v)
    assert w.model.count() == 0  # no bundled models, nothing trained
    w.fov_btn.click()
    assert errors and "choose a model" in errors[-1]
    assert not w.runner.running and w.fov_btn.isEnabled()


def test_predict_offers_bundled_then_recently_trained_models(make_napari_viewer, seg_model, monkeypatch):
    from napari_genselfdiff._widgets.predict import PredictWidget
    from napari_genselfdiff._widgets.settings import RECENT_MODELS

    monkeypatch.setattr("napari_genselfdiff._widgets.predict.bundled_models", lambda: {"glands": seg_model})
    Settings("models").set(RECENT_MODELS, [str(seg_model.parent / "copy"), "/gone/model"])
    (seg_model.parent / "copy").mkdir(exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        (seg_model.parent / "copy" / f).write_bytes((seg_model / f).read_bytes())
    w = PredictWidget(make_napari_viewer())
    texts = [w.model.itemText(i) for i in range(w.model.count())]
    assert [t.split(" — ")[0] for t in texts] == ["glands (bundled)", "copy"]
    assert all("glands · 1.00 µm/px (~10x)" in t for t in texts)  # what each model is (issue #15, 12)
    assert w.model.itemData(1) == str(seg_model.parent / "copy")  # a model that is gone is not offered


# ---------------------------------------------------------------------------------------------
# slide reader

def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float) -> None:
    """A tiled OME-TIFF with two SubIFD levels (1/2 and 1/4) and its pixel size."""
    import tifffile

    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, subifds=2, tile=(128, 128), photometric="rgb", metadata=meta)
        for k in (2, 4):
            tif.write(np.ascontiguousarray(image[::k, ::k]), subfiletype=1, tile=(128, 128), photometric="rgb")


def test_reader_opens_a_pyramidal_ome_tiff_as_multiscale(make_napari_viewer, tmp_path, he_image):
    path = tmp_path / "crop.ome.tif"
    write_pyramid_tiff(path, he_image[:512, :768], mpp=0.25)
    v = make_napari_viewer()
    [layer] = v.open(str(path), plugin="napari-genselfdiff")
    assert layer.name == "crop" and layer.rgb and layer.multiscale
    assert [tuple(lv.shape) for lv in layer.data] == [(512, 768, 3), (256, 384, 3), (128, 192, 3)]
    assert layer.metadata["mpp"] == pytest.approx(0.25)
    np.testing.assert_array_equal(np.asarray(layer.data[0][100:110, 200:210]), he_image[100:110, 200:210])


def test_reader_opens_a_real_svs_slide(make_napari_viewer, slides_dir):
    v = make_napari_viewer()
    [layer] = v.open(str(slides_dir / "cmu_small_region.svs"), plugin="napari-genselfdiff")
    assert layer.rgb and layer.multiscale and layer.data[0].dtype == np.uint8
    assert layer.metadata["mpp"] == pytest.approx(0.499, abs=0.01)


def test_reader_declines_what_it_does_not_read(tmp_path):
    from napari_genselfdiff._reader import napari_get_reader

    assert napari_get_reader(str(tmp_path / "photo.png")) is None
    assert napari_get_reader([str(tmp_path / "a.svs"), str(tmp_path / "b.svs")]) is None
    assert napari_get_reader(str(tmp_path / "slide.SVS")) is not None
    assert napari_get_reader(str(tmp_path / "image.ome.zarr") + "/") is not None


def test_pretrain_on_a_slide_layer_samples_the_slide(make_napari_viewer, qtbot, tmp_path, he_image):
    path = tmp_path / "slide.ome.tif"
    write_pyramid_tiff(path, he_image[:512, :768], mpp=0.5)
    v = make_napari_viewer()
    [layer] = v.open(str(path), plugin="napari-genselfdiff")
    w = PretrainWidget(v)
    w.layers.item(0).setSelected(True)
    [source] = w.sources()
    assert source.name == "slide.ome.tif"  # read lazily from the file, not the displayed level
    tiny_pretrain_settings(w, tmp_path / "pre", steps=2)
    w.n_tiles.setValue(0)
    w.start_btn.click()
    wait_idle(qtbot, w)
    assert training_state(tmp_path / "pre")["step"] == 2
    assert TILES_LAYER not in v.layers
