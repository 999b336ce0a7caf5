"""The "Annotate and refine" dock widget in a real viewer: project create/open, editing the region
in view at full resolution, accepting it into the project, refining (and cancelling) from the
widget, region suggestions moving the camera, GeoJSON import / export.

Runs under Xvfb (pytest-xvfb) with QT_API=pyqt6; a screenshot of the docked widget goes to
``screenshots/refine_widget.png`` (git-ignored) for a person to look at.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import napari  # noqa: E402,F401  (declared: missing or broken is a failure, never a skip)
import pytestqt  # noqa: E402,F401

from napari_genselfdiff._widgets.refine import (EDIT_KEY, PROJECT_LABELS, SUGGESTION_LAYER,  # noqa: E402
                                                 RefineWidget)
from napari_genselfdiff.core.data import LabeledImage, read_image  # noqa: E402
from napari_genselfdiff.bundled import sample_image_path  # noqa: E402
from napari_genselfdiff.project import Project  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("settings_dir", "one_torch_thread")]

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "screenshots"
MANIFEST = REPO / "src" / "napari_genselfdiff" / "napari.yaml"


# ---------------------------------------------------------------------------------------------
# fixtures and helpers





@pytest.fixture
def messages(monkeypatch) -> dict[str, list[str]]:
    """What the widget told the user, by kind (error / warning / info)."""
    import importlib

    seen: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    for box in ("project_box", "annotate", "suggest", "refining", "geojson_box"):
        module = importlib.import_module(f"napari_genselfdiff._widgets.refine.{box}")
        for kind in seen:
            if hasattr(module, f"show_{kind}"):
                monkeypatch.setattr(module, f"show_{kind}", seen[kind].append)
    return seen


@pytest.fixture(scope="session")
def he_image() -> np.ndarray:
    return read_image(sample_image_path())


def discs(shape: tuple[int, int]) -> np.ndarray:
    """Two painted 'glands'."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    labels[(yy - shape[0] * 0.3) ** 2 + (xx - shape[1] * 0.3) ** 2 < (0.2 * min(shape)) ** 2] = 1
    labels[(yy - shape[0] * 0.7) ** 2 + (xx - shape[1] * 0.7) ** 2 < (0.15 * min(shape)) ** 2] = 2
    return labels


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """A tiny glands model: 2 steps of core fine-tuning (preset tiny, patch 32)."""
    import torch

    from napari_genselfdiff.core.data import TaskSpec, mask_to_target
    from napari_genselfdiff.core.progress import drain
    from napari_genselfdiff.core.train.training import FinetuneConfig, finetune

    torch.set_num_threads(1)
    image = read_image(sample_image_path())[:96, :96]
    item = LabeledImage("crop", image, mask_to_target(discs((96, 96)), TaskSpec.make("glands")))
    out = tmp_path_factory.mktemp("models") / "glands-tiny"
    cfg = FinetuneConfig(preset="tiny", steps=2, patch=32, batch=2, checkpoint_every=0, val_every=0)
    drain(finetune([item], out, cfg, device="cpu"))
    return out


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def refine_widget(viewer, tmp_path: Path, model: Path | None) -> RefineWidget:
    """A docked widget with a new glands project (tiny training settings, CPU)."""
    w = RefineWidget(viewer)
    viewer.window.add_dock_widget(w, name="Annotate and refine", area="right")
    w.project_box.folder.setText(str(tmp_path / "project"))
    w.project_box.model.setText("" if model is None else str(model))
    w.project_box.create_btn.click()
    assert w.project is not None
    w.refine_box.steps.setValue(2)
    w.refine_box.patch.setValue(32)
    w.refine_box.batch.setValue(2)
    w.refine_box.device.combo.setCurrentText("cpu")
    w.suggest.region_size.setValue(256)
    w.refine_box.repredict.setChecked(False)
    return w


def look_at(viewer, centre: tuple[float, float], zoom: float, canvas: tuple[int, int] = (400, 800)) -> None:
    """A known view: ``canvas`` (h, w) screen pixels, so the visible world extent is
    centre +- canvas / (2 * zoom)."""
    viewer.canvas.size = canvas
    camera = viewer.scene.camera
    camera.center = centre
    camera.zoom = zoom


def wait_idle(qtbot, runner, timeout: int = 90_000) -> None:
    qtbot.waitUntil(lambda: not runner.running, timeout=timeout)


def edit_suggested(qtbot, w: RefineWidget):
    """*Edit region* on a suggestion no prediction covers: it is predicted in the background
    first; the edit layer once it opened."""
    with qtbot.waitSignal(w.annotate.opened, timeout=90_000) as opened:
        assert w.annotate.edit_region() is None and w.annotate.runner.running
    wait_idle(qtbot, w.annotate.runner)
    return opened.args[0]


# ---------------------------------------------------------------------------------------------
# manifest

def test_manifest_contributes_the_refine_widget():
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(MANIFEST)
    widgets = {w.display_name: w.command for w in pm.contributions.widgets}
    commands = {c.id: c.python_name for c in pm.contributions.commands}
    assert commands[widgets["Annotate and refine"]] == "napari_genselfdiff._widgets.refine:RefineWidget"


# ---------------------------------------------------------------------------------------------
# project, edit, accept

def test_create_and_open_show_the_project_status(viewer, tmp_path, seg_model, messages):
    w = refine_widget(viewer, tmp_path, seg_model)
    assert "task glands" in w.project_box.status.text() and "accepted regions: 0" in w.project_box.status.text()
    assert seg_model.name in w.project_box.status.text()
    w.project_box.create_btn.click()  # the folder is a project now: a readable error, nothing changes
    assert any("already a project" in m for m in messages["error"])
    other = RefineWidget(viewer)
    other.refine_box.patch.setValue(256)  # the default (the first widget's 32 is remembered)
    other.project_box.folder.setText(str(tmp_path / "project"))
    other.project_box.open_btn.click()
    assert other.project is not None and other.project.folder == w.project.folder
    assert other.refine_box.patch.value() == 256  # a project of a segmentation model keeps the default patch
    other.project_box.folder.setText(str(tmp_path / "nothing here"))
    other.project_box.open_btn.click()
    assert any("no such project folder" in m for m in messages["error"])


def test_edit_paint_accept_stores_the_region(viewer, tmp_path, he_image, seg_model, messages):
    image = viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)  # rows 250..350, columns 300..500
    y, x, h, wd = 250, 300, 101, 201
    layer = w.annotate.edit_region()
    assert layer.name == f"edit: H_E {y},{x},{h},{wd}"
    assert layer.data.shape == (h, wd) and not layer.data.any()  # no prediction, nothing accepted yet
    assert tuple(layer.translate) == (y, x) and tuple(layer.scale) == tuple(image.scale)
    assert layer.mode == "paint" and viewer.layers.selection.active is layer

    painted = discs((h, wd))
    layer.data[:] = painted
    assert w.annotate.edit_region() is layer and (layer.data == painted).all()  # same view: the same layer, kept
    rid = w.annotate.accept_region()
    assert rid == "r00001" and any(rid in m for m in messages["info"])
    (region,) = w.project.regions()
    assert region["bounds"] == [y, x, h, wd] and region["slide"] == "H_E" and region["n_objects"] == 2
    stored_image, stored_mask = w.project.region_arrays(region)
    np.testing.assert_array_equal(stored_mask, painted)
    np.testing.assert_array_equal(stored_image, he_image[y:y + h, x:x + wd])
    store = w.project.labels_store("H_E")
    np.testing.assert_array_equal(store[y:y + h, x:x + wd], painted)
    # the in-memory image became a project slide file; the layer is kept, marked accepted
    assert (w.project.folder / "images" / "H_E.tif").is_file()
    assert layer in viewer.layers and layer.name == f"✓ r00001 H_E {y},{x},{h},{wd}"
    assert layer.metadata[EDIT_KEY]["accepted"] == "r00001"
    assert "accepted regions: 1 (1 on this image)" in w.project_box.status.text()

    # the same region again, a bit to the right: the accepted part comes back from the label store
    look_at(viewer, (300, 450), 4)
    again = w.annotate.edit_region()
    assert again is not layer and again.metadata[EDIT_KEY]["prefill"] == ["accepted"]
    np.testing.assert_array_equal(again.data[:, :wd - 50], painted[:, 50:])
    assert not again.data[:, wd - 50:].any()


def test_edit_and_accept_on_a_multiscale_image_use_full_resolution(viewer, tmp_path, he_image, seg_model):
    """On a 2-level pyramid shown at level 1, the edit layer and the stored region are still
    level-0 pixels (the view's extent is converted, not its displayed level)."""
    pyramid = [he_image, np.ascontiguousarray(he_image[::2, ::2])]
    image = viewer.add_image(pyramid, name="slide", rgb=True, multiscale=True)
    image.locked_data_level = 1
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)
    layer = w.annotate.edit_region()
    assert layer.data.shape == (101, 201) and tuple(layer.translate) == (250, 300)
    layer.data[20:60, 30:90] = 1
    assert w.annotate.accept_region() == "r00001"
    stored_image, stored_mask = w.project.region_arrays("r00001")
    np.testing.assert_array_equal(stored_image, he_image[250:351, 300:501])
    assert stored_mask.sum() == 40 * 60


def edit_and_accept_a_file(viewer, tmp_path: Path, path: Path, seg_model: Path) -> tuple[RefineWidget, dict]:
    """Open ``path`` with this plugin's reader, edit and accept a region; (widget, slide record).
    The reader shows a slide of known pixel size in microns: the camera looks at pixel (300, 400),
    4 screen pixels per image pixel."""
    [image] = viewer.open(str(path), plugin="napari-genselfdiff")
    w = refine_widget(viewer, tmp_path, seg_model)
    s = float(image.scale[-1])
    look_at(viewer, (300 * s, 400 * s), 4 / s)
    layer = w.annotate.edit_region()
    layer.data[20:60, 30:90] = 1
    rid = w.annotate.accept_region()
    assert rid == "r00001"
    (slide,) = w.project.slides()
    stored_image, _ = w.project.region_arrays(rid)
    np.testing.assert_array_equal(stored_image, np.asarray(image.data[0][250:351, 300:501]))
    assert not (w.project.folder / "images").exists()  # a file-backed image is referenced, not copied
    return w, slide


def test_a_file_backed_image_becomes_a_project_slide(viewer, tmp_path, he_image, seg_model):
    import tifffile

    path = tmp_path / "case 7.tif"
    tifffile.imwrite(path, he_image, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    w, slide = edit_and_accept_a_file(viewer, tmp_path, path, seg_model)
    assert slide["id"] == "case_7" and slide["path"] == str(path) and slide["mpp"] == pytest.approx(0.5)
    assert w.project.regions()[0]["bounds"] == [250, 300, 101, 201]


def test_a_real_svs_slide_becomes_a_project_slide(viewer, tmp_path, slides_dir, seg_model):
    path = slides_dir / "cmu_small_region.svs"
    _, slide = edit_and_accept_a_file(viewer, tmp_path, path, seg_model)
    assert slide["id"] == "cmu_small_region" and slide["path"] == str(path)
    assert slide["mpp"] == pytest.approx(0.499, abs=0.01)


def test_a_different_image_under_a_saved_name_is_refused(viewer, tmp_path, he_image, seg_model, messages):
    """An in-memory image is saved into the project under its layer name; another image given
    the same name later (same size, other pixels) must not be filed under that slide."""
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)
    w.annotate.edit_region().data[10:20, 10:20] = 1
    assert w.annotate.accept_region() == "r00001"
    viewer.layers.remove("H&E")
    viewer.add_image(255 - he_image, name="H&E", rgb=True)
    assert w.annotate.edit_region() is None
    assert any("different image named 'H&E'" in m for m in messages["error"])
    viewer.layers.remove("H&E")
    viewer.add_image(he_image.copy(), name="H&E", rgb=True)  # the same pixels again: fine
    assert w.annotate.edit_region() is not None


def test_edit_is_prefilled_with_the_prediction_layer(viewer, tmp_path, he_image, seg_model):
    viewer.add_image(he_image, name="H&E", rgb=True)
    predicted = np.zeros((384, 512), np.int32)  # a level-1 prediction of the whole image
    predicted[100:200, 150:300] = 7
    viewer.add_labels(predicted, name="glands", scale=(2, 2), translate=(0.5, 0.5),
                      metadata={"genselfdiff": {"downsample": 2.0, "offset": [0, 0], "image": "H&E"}})
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)
    layer = w.annotate.edit_region()
    assert layer.metadata[EDIT_KEY]["prefill"] == ["prediction"]
    assert layer.metadata[EDIT_KEY]["model"] == str(seg_model)
    rows, cols = np.arange(250, 351) // 2, np.arange(300, 501) // 2
    np.testing.assert_array_equal(layer.data, predicted[np.ix_(rows, cols)])
    assert layer.selected_label == 8  # painting starts a new object


class DarkIsGland:
    """A stand-in segmentation model: a pixel is gland where the H&E is dark (darker than
    ``threshold`` grey). Remembers the threads it ran in."""

    task, class_names, num_classes, tile_multiple, mpp = "glands", ["background", "gland"], 2, 1, None

    def __init__(self, threshold: float = 150):
        self.threshold, self.threads = threshold, set()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        import threading

        self.threads.add(threading.get_ident())
        fg = (np.asarray(tiles).mean(-1) < self.threshold).astype(np.float32)
        return np.stack([1 - fg, fg], axis=1)


def show_suggestion(w: RefineWidget, image: str, bounds: list[int]) -> None:
    """Put one suggestion on screen (the camera flies to it) without scoring the image."""
    w.suggest.state.image = image
    w.suggest.state.show([{"bounds": bounds, "score": 0.9}])
    w.suggest._show_suggestion()


def test_a_suggested_region_no_prediction_covers_is_predicted_to_prefill_it(viewer, qtbot, tmp_path, he_image,
                                                                          seg_model, monkeypatch):
    """The only prediction layer is the last field of view, elsewhere: Edit region on the
    suggestion predicts that region with the project's model, in a worker thread."""
    import threading

    from napari_genselfdiff._widgets import whole_slide as predict_widget
    from napari_genselfdiff.core.eval.postprocess import postprocess
    from napari_genselfdiff.core.inference import PredictorCache

    fake = DarkIsGland()
    asked = []

    def fake_cache(model, device, cache, **options):
        asked.append(model)
        return PredictorCache(("fake", model, device), fake)

    monkeypatch.setattr(predict_widget, "cached_predictor", fake_cache)
    viewer.add_image(he_image, name="H&E", rgb=True)
    viewer.add_labels(np.full((100, 100), 5, np.int32), name="glands",  # the last field of view: rows/cols 0..99
                      metadata={"genselfdiff": {"downsample": 1.0, "offset": [0, 0], "image": "H&E"}})
    w = refine_widget(viewer, tmp_path, seg_model)
    y, x, h, wd = bounds = [550, 100, 160, 192]
    show_suggestion(w, "H&E", bounds)
    layer = edit_suggested(qtbot, w)
    assert asked == [str(seg_model)] and fake.threads and threading.get_ident() not in fake.threads
    info = layer.metadata[EDIT_KEY]
    assert info["bounds"] == bounds and info["prefill"] == ["prediction"] and info["model"] == str(seg_model)
    # the region and a margin: the objects its border cuts are whole (those in the margin only are not)
    from napari_genselfdiff.slide.fov import objects_in_view, view_margin, with_margin

    (gy, gx, gh, gw), view = with_margin(bounds, view_margin("glands", fake.mpp), he_image.shape[:2])
    _, grown = postprocess(fake(he_image[gy:gy + gh, gx:gx + gw][None])[0], "glands")
    expected = objects_in_view(grown, view)[view[0]:view[0] + h, view[1]:view[1] + wd]
    assert expected.max() >= 3  # the region is full of dark objects
    np.testing.assert_array_equal(layer.data > 0, expected > 0)
    assert len(np.unique(layer.data)) == len(np.unique(expected))
    assert not (layer.data == 5).all()  # not the stale field of view
    assert w.annotate.edit_btn.isEnabled() and layer.mode == "paint"


def test_accepting_an_empty_region_over_tissue_asks_first(viewer, tmp_path, he_image, seg_model, messages):
    picture = he_image.copy()
    picture[:200, :300] = 242  # a patch of glass
    viewer.add_image(picture, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)  # tissue
    layer = w.annotate.edit_region()
    assert not layer.data.any()
    assert w.annotate.accept_region() is None and w.project.regions() == []
    assert any("no objects" in m and "tissue" in m for m in messages["warning"])
    assert w.annotate.accept_region() == "r00001"  # pressed again: stored, as a region with none
    assert w.project.regions()[0]["n_objects"] == 0
    look_at(viewer, (100, 150), 4)  # glass: an empty region is stored without asking
    n_warnings = len(messages["warning"])
    w.annotate.edit_region()
    assert w.annotate.accept_region() == "r00002" and len(messages["warning"]) == n_warnings


def test_clear_region_empties_a_wrong_prefill_and_accepts_it_without_asking(viewer, qtbot, tmp_path, he_image,
                                                                            seg_model, messages):
    viewer.add_image(he_image, name="H&E", rgb=True)
    predicted = np.zeros((768, 1024), np.int32)
    predicted[250:300, 300:400], predicted[320:340, 420:480] = 5, 9  # objects where there are none
    viewer.add_labels(predicted, name="glands", metadata={"genselfdiff": {"downsample": 1.0, "offset": [0, 0],
                                                                          "image": "H&E"}})
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)  # tissue
    layer = w.annotate.edit_region()
    assert layer.data.any() and layer.metadata[EDIT_KEY]["prefill"] == ["prediction"]
    w.annotate.clear_btn.click()
    assert not layer.data.any() and any("cleared 2 object" in m for m in messages["info"])
    n_warnings = len(messages["warning"])
    assert w.annotate.accept_region() == "r00001" and len(messages["warning"]) == n_warnings  # no second press
    assert w.project.regions()[0]["n_objects"] == 0
    SHOTS.mkdir(exist_ok=True)
    viewer.screenshot(str(SHOTS / "refine_clear_region.png"), canvas_only=False)


def test_accepting_the_same_layer_twice_replaces_the_region(viewer, tmp_path, he_image, seg_model, messages):
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)
    layer = w.annotate.edit_region()
    layer.data[:] = discs(layer.data.shape)
    assert w.annotate.accept_region() == "r00001"
    layer.data[:5, :5] = 3  # one more touch, and Accept again
    assert w.annotate.accept_region() == "r00002"
    (region,) = w.project.regions()
    assert region["id"] == "r00002" and region["replaces"] == ["r00001"] and region["n_objects"] == 3
    assert any("replaces r00001" in m for m in messages["info"])
    assert layer.name.startswith("✓ r00002 ")


def test_a_failed_accept_keeps_the_layer_and_what_was_painted(viewer, tmp_path, he_image, seg_model, messages,
                                                              monkeypatch):
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (300, 400), 4)
    layer = w.annotate.edit_region()
    layer.data[10:30, 10:30] = 3
    name = layer.name

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Project, "accept_region", disk_full)
    assert w.annotate.accept_region() is None
    assert any("No space left" in m and "nothing was lost" in m for m in messages["error"])
    assert layer in viewer.layers and layer.name == name and (layer.data[10:30, 10:30] == 3).all()
    monkeypatch.undo()
    assert w.annotate.accept_region() == "r00001"  # the same layer, accepted once the problem is gone


def test_accept_without_an_edit_is_a_readable_error(viewer, tmp_path, seg_model, messages):
    w = refine_widget(viewer, tmp_path, seg_model)
    assert w.annotate.accept_region() is None
    assert any("Edit region" in m for m in messages["error"])


# ---------------------------------------------------------------------------------------------
# refine, cancel, suggest

def accept_two_regions(viewer, w: RefineWidget) -> None:
    for centre in ((200, 250), (500, 700)):
        look_at(viewer, centre, 4)
        layer = w.annotate.edit_region()
        layer.data[:] = discs(layer.data.shape)
        assert w.annotate.accept_region() is not None


def test_refine_from_the_widget_shows_dice_and_hands_the_model_to_predict(viewer, qtbot, tmp_path, he_image,
                                                                          seg_model, settings_dir):
    from napari_genselfdiff._widgets.predict import PredictWidget

    viewer.add_image(he_image, name="H&E", rgb=True)
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict", area="right")
    predict.device.combo.setCurrentText("cpu")
    predict.tile.setValue(256)
    w = refine_widget(viewer, tmp_path, seg_model)
    w.refine_box.repredict.setChecked(True)
    accept_two_regions(viewer, w)
    w.refine_box.refine_btn.click()
    assert not w.refine_box.refine_btn.isEnabled() and w.refine_box.cancel_btn.isEnabled()
    wait_idle(qtbot, w.refine_box.runner)
    (record,) = w.project.history()
    assert record["status"] == "finished" and record["steps"] == 2
    new_model = w.project.folder / "models" / "refine-1"
    assert w.project.current_model == new_model
    text = w.refine_box.dice.text()
    assert "→" in text and f"{record['after']:.3f}" in text
    assert "last refine (finished)" in w.project_box.status.text() and "refine-1" in w.project_box.status.text()
    assert w.refine_box.refine_btn.isEnabled() and not w.refine_box.cancel_btn.isEnabled()
    # the Predict widget: the new model is selected and remembered, and the view re-predicted
    assert predict.model_path() == str(new_model)
    saved = json.loads((settings_dir / "widgets.json").read_text())
    assert saved["predict"]["model"] == str(new_model)
    assert saved["models"]["recent_models"][0] == str(new_model)
    wait_idle(qtbot, predict.runner)
    assert "glands" in viewer.layers


def test_cancelling_a_refine_keeps_the_current_model(viewer, qtbot, tmp_path, he_image, seg_model):
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    accept_two_regions(viewer, w)
    w.refine_box.steps.setValue(5000)
    w.refine_box.refine_btn.click()
    qtbot.waitUntil(lambda: w.refine_box.progress.bar.value() >= 1, timeout=60_000)
    w.refine_box.cancel_btn.click()
    wait_idle(qtbot, w.refine_box.runner)
    (record,) = w.project.history()
    assert record["status"] == "cancelled" and 1 <= record["steps"] < 5000
    assert w.project.current_model == seg_model
    assert "cancelled" in w.refine_box.progress.status.text()
    assert w.refine_box.dice.text() == "Dice before → after: –"
    assert w.refine_box.refine_btn.isEnabled() and not w.refine_box.cancel_btn.isEnabled()


def test_refine_without_regions_is_a_readable_error(viewer, tmp_path, seg_model, messages):
    w = refine_widget(viewer, tmp_path, seg_model)
    w.refine_box.refine_btn.click()
    assert not w.refine_box.runner.running
    assert any("no accepted regions" in m for m in messages["error"])


def test_suggestions_move_the_camera_and_are_reviewed_when_skipped(viewer, qtbot, tmp_path, he_image, seg_model):
    image = viewer.add_image(he_image, name="H&E", rgb=True, scale=(0.5, 0.5), translate=(10, 20))
    w = refine_widget(viewer, tmp_path, seg_model)
    look_at(viewer, (0, 0), 1)
    w.suggest.suggest_btn.click()
    wait_idle(qtbot, w.suggest.runner)
    assert w.suggest.state.regions and w.suggest.skip_btn.isEnabled()
    first = w.suggest.state.regions[0]
    y, x, h, wd = first["bounds"]
    assert h == wd == 256
    cy, cx = image.world_to_data(viewer.scene.camera.center[-2:])
    assert y <= cy < y + h and x <= cx < x + wd
    assert SUGGESTION_LAYER in viewer.layers
    assert "suggestion 1/" in w.suggest.info.text()
    layer = edit_suggested(qtbot, w)  # the camera centre is in the suggestion: exactly its bounds
    assert layer.metadata[EDIT_KEY]["bounds"] == [y, x, h, wd]
    w.suggest.skip_btn.click()
    assert w.project.reviewed("H_E") == [[y, x, h, wd]]
    second = w.suggest.state.regions[1]["bounds"]
    cy, cx = image.world_to_data(viewer.scene.camera.center[-2:])
    assert second[0] <= cy < second[0] + second[2] and second[1] <= cx < second[1] + second[3]
    # accepting the region on screen reviews it too; Skip then moves on without marking it again
    layer = edit_suggested(qtbot, w)
    assert w.annotate.accept_region(empty_ok=True) is not None
    assert w.project.reviewed("H_E") == [[y, x, h, wd], list(second)]
    w.suggest.skip_btn.click()
    assert len(w.project.reviewed("H_E")) == 2 and "suggestion 3/" in w.suggest.info.text()


def test_stopping_a_suggestion_leaves_nothing_half_done(viewer, qtbot, tmp_path, he_image, seg_model, monkeypatch):
    """Scoring runs batch by batch; Stop ends it between batches, with no suggestion and the buttons reset."""
    import time

    import napari_genselfdiff.project.suggest as suggest_module

    calls = []
    real = suggest_module.predict_padded_batch

    def slow(predictor, tiles):
        calls.append(len(tiles))
        time.sleep(0.5)  # a big model on a slow machine
        return real(predictor, tiles)

    monkeypatch.setattr(suggest_module, "predict_padded_batch", slow)
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    w.suggest.region_size.setValue(64)
    w.suggest.suggest_btn.click()
    assert not w.suggest.suggest_btn.isEnabled() and w.suggest.stop_btn.isEnabled()
    qtbot.waitUntil(lambda: "scored 8 of" in w.suggest.info.text(), timeout=60_000)
    w.suggest.stop_btn.click()
    wait_idle(qtbot, w.suggest.runner)
    assert w.suggest.info.text() == "stopped: no region suggested"
    assert len(calls) < 64 // 8  # it stopped before scoring every candidate
    assert w.suggest.state.regions == [] and SUGGESTION_LAYER not in viewer.layers
    assert w.suggest.suggest_btn.isEnabled() and not w.suggest.stop_btn.isEnabled()
    assert not w.suggest.skip_btn.isEnabled()


# ---------------------------------------------------------------------------------------------
# GeoJSON

def square(x0: float, y0: float, side: float) -> list:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def qupath_file(path: Path) -> Path:
    """Three polygons (one with a 4 x 4 hole) in full-resolution pixels, plus a line QuPath can
    write but that has no area (skipped with a warning)."""
    polygon = {"type": "Polygon", "coordinates": [square(100, 50, 20), square(108, 58, 4)]}
    features = [
        {"type": "Feature", "id": "a", "geometry": polygon,
         "properties": {"objectType": "annotation", "classification": {"name": "Gland"}}},
        {"type": "Feature", "id": "b", "geometry": {"type": "Polygon", "coordinates": [square(130, 60, 10)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Gland"}}},
        {"type": "Feature", "id": "c", "geometry": {"type": "Polygon", "coordinates": [square(105, 80, 6)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Gland"}}},
        {"type": "Feature", "id": "d", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]},
         "properties": {}},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def import_and_wait(qtbot, w: RefineWidget, path: Path):
    """Start a GeoJSON import (a background job) and return the layer it added."""
    assert w.geojson.import_geojson(str(path))
    wait_idle(qtbot, w.geojson.runner)
    return w.geojson.last_imported


def test_geojson_import_as_labels_and_export_round_trip(viewer, qtbot, tmp_path, he_image, seg_model, messages):
    from napari_genselfdiff.formats.geojson import read_geojson

    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    layer = import_and_wait(qtbot, w, qupath_file(tmp_path / "qupath.geojson"))
    # bounding box of the objects: x 100..140, y 50..86
    assert layer.name == "qupath" and layer.data.shape == (36, 40) and tuple(layer.translate) == (50, 100)
    ids, counts = np.unique(layer.data, return_counts=True)
    assert ids.tolist() == [0, 1, 2, 3]
    assert counts[1:].tolist() == [20 * 20 - 4 * 4, 10 * 10, 6 * 6]
    assert any("LineString" in m for m in messages["warning"])
    # an import small enough is acceptable into the project as an imported correction
    assert w.annotate.accept_region(layer) == "r00001"
    assert w.project.regions()[0]["source"] == "import" and w.project.regions()[0]["bounds"] == [50, 100, 36, 40]

    out = tmp_path / "out.geojson"
    w.geojson.export_source.setCurrentText("✓ r00001 H_E 50,100,36,40")
    w.geojson.object_type.setCurrentText("detection")
    assert w.geojson.export_geojson(str(out)) == 3
    back = read_geojson(out)
    assert sorted(f.geometry.area for f in back.features) == [36, 100, 384]
    assert {f.object_type for f in back.features} == {"detection"}
    assert sorted(f.geometry.bounds for f in back.features)[0] == (100, 50, 120, 70)

    w.geojson.export_source.setCurrentText(PROJECT_LABELS)  # the label store of the image, same objects
    w.geojson.object_type.setCurrentText("annotation")
    assert w.geojson.export_geojson(str(tmp_path / "store.geojson")) == 3
    store = read_geojson(tmp_path / "store.geojson")
    assert sorted(f.geometry.area for f in store.features) == [36, 100, 384]
    assert {f.class_name for f in store.features} == {"Gland"}


def test_geojson_import_as_shapes(viewer, qtbot, tmp_path, he_image, seg_model):
    image = viewer.add_image(he_image, name="H&E", rgb=True, scale=(0.5, 0.5))
    w = refine_widget(viewer, tmp_path, seg_model)
    w.geojson.import_as.setCurrentText("Shapes")
    layer = import_and_wait(qtbot, w, qupath_file(tmp_path / "qupath.geojson"))
    assert layer.nshapes == 3 and list(layer.features["class_name"]) == ["Gland"] * 3
    # corner (x 130, y 60) of square b is the top-left edge of pixel (60, 130): world 0.5 * (59.5, 129.5)
    corner = layer.data_to_world(layer.data[1].min(axis=0))
    np.testing.assert_allclose(corner, image.data_to_world((59.5, 129.5)))


def test_geojson_import_runs_off_the_gui_thread_with_progress(viewer, qtbot, tmp_path, he_image, seg_model,
                                                             monkeypatch):
    """Reading and drawing run in a worker thread (a 50 000-object file takes seconds): the GUI
    thread only adds the layer, progress events reach the panel, and the result arrives."""
    import threading

    import napari_genselfdiff.formats.geojson as gj

    threads, events = [], []
    real_read, real_draw = gj.iter_read_geojson, gj.iter_features_to_labels

    def read(*args, **kwargs):
        threads.append(threading.current_thread())
        return (yield from real_read(*args, every=1, **kwargs))

    def draw(*args, **kwargs):
        threads.append(threading.current_thread())
        return (yield from real_draw(*args, every=1, **kwargs))

    monkeypatch.setattr(gj, "iter_read_geojson", read)
    monkeypatch.setattr(gj, "iter_features_to_labels", draw)
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    w.geojson.runner.event.connect(events.append)
    assert w.geojson.import_geojson(str(qupath_file(tmp_path / "qupath.geojson")))
    assert "qupath" not in viewer.layers  # not drawn in the GUI thread: it arrives later
    assert not w.geojson.import_btn.isEnabled() and w.geojson.cancel_btn.isEnabled()
    with qtbot.waitSignal(w.geojson.imported, timeout=60_000) as arrived:
        pass
    assert arrived.args[0] is viewer.layers["qupath"] and int(viewer.layers["qupath"].data.max()) == 3
    assert len(threads) == 2 and all(t is not threading.main_thread() for t in threads)
    assert {e.stage for e in events} == {"read", "rasterise"} and any(e.step == 4 for e in events)
    wait_idle(qtbot, w.geojson.runner)
    assert w.geojson.import_btn.isEnabled() and "imported 3 object(s)" in w.geojson.progress.status.text()


def test_a_failed_geojson_import_says_why_and_adds_nothing(viewer, qtbot, tmp_path, he_image, seg_model):
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    deep = tmp_path / "deep.geojson"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    failures = []
    w.geojson.runner.failed.connect(failures.append)
    assert w.geojson.import_geojson(str(deep))
    wait_idle(qtbot, w.geojson.runner)
    assert len(failures) == 1 and "nested" in str(failures[0]) and "deep.geojson" in str(failures[0])
    assert [layer.name for layer in viewer.layers] == ["H&E"] and w.geojson.last_imported is None
    assert w.geojson.import_btn.isEnabled() and "failed" in w.geojson.progress.status.text()


def test_project_labels_cannot_be_exported_before_anything_is_accepted(viewer, tmp_path, he_image, seg_model,
                                                                       messages):
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    assert w.geojson.export_source.currentText() == PROJECT_LABELS
    assert w.geojson.export_geojson(str(tmp_path / "x.geojson")) is None
    assert any("no corrected labels" in m for m in messages["error"])


# ---------------------------------------------------------------------------------------------
# screenshot

def test_screenshot_of_the_docked_widget(make_napari_viewer, qtbot, tmp_path, he_image, seg_model):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    viewer.add_image(he_image, name="H&E skin", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    viewer.reset_view()
    w.suggest.suggest_btn.click()
    wait_idle(qtbot, w.suggest.runner)
    layer = edit_suggested(qtbot, w)
    layer.data[:] = discs(layer.data.shape)
    layer.refresh()
    assert w.annotate.accept_region() == "r00001"
    w.refine_box.steps.setValue(3)
    w.refine_box.refine_btn.click()
    wait_idle(qtbot, w.refine_box.runner)
    assert "→" in w.refine_box.dice.text() and len(w.project.history()) == 1
    qtbot.wait(200)
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / "refine_widget.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.stat().st_size > 10_000


def test_a_refine_that_scores_lower_is_kept_aside_and_adopt_and_roll_back_are_one_click(
        make_napari_viewer, qtbot, tmp_path, he_image, seg_model, monkeypatch):
    from napari_genselfdiff.project import refine as R

    scores = iter([0.9, 0.5])  # base, then the refined model: lower
    monkeypatch.setattr(R, "score", lambda model, items, device: next(scores))
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1920, 1080)
    viewer.add_image(he_image, name="H&E", rgb=True)
    w = refine_widget(viewer, tmp_path, seg_model)
    accept_two_regions(viewer, w)
    box = w.refine_box
    assert not box.adopt_btn.isEnabled()
    box.refine_btn.click()
    wait_idle(qtbot, box.runner)
    new = w.project.folder / "models" / "refine-1"
    assert w.project.current_model == seg_model.absolute()  # kept aside: unchanged
    assert "kept aside" in box.dice.text() and box.adopt_btn.isEnabled()
    assert "kept aside" in w.project_box.status.text()
    qtbot.wait(200)
    SHOTS.mkdir(exist_ok=True)
    viewer.screenshot(str(SHOTS / "refine_kept_aside.png"), canvas_only=False)
    box.adopt_btn.click()
    assert w.project.current_model == new and not box.adopt_btn.isEnabled()
    assert "refine-1" in w.project_box.status.text()
    box.rollback_btn.click()
    assert w.project.current_model == seg_model.absolute()
    assert [h["status"] for h in w.project.history()] == ["finished", "adopted", "rolled back"]


def test_a_suggestion_run_that_finds_nothing_says_so(viewer, tmp_path, seg_model):
    """Issue 35 (7): after the whole image was accepted, the box says nothing is left, never a blank line."""
    w = refine_widget(viewer, tmp_path, seg_model)
    box = w.suggest
    assert box.info.text() == ""  # before any run: nothing to say yet
    box.state.image = "H&E"
    box._on_suggested((None, []))
    assert box.info.text() == "no unreviewed tissue region left to suggest"
    assert not box.skip_btn.isEnabled()


def test_a_project_starts_from_the_pretrained_backbone_and_learns_from_labelled_regions(viewer, qtbot, tmp_path,
                                                                                         he_image, messages):
    """Issue 33 item 5, the few-label loop: a project started from the pretrained backbone (for tissue
    the bundled models do not know) has nothing to prefill; regions labelled by hand are accepted and
    Refine trains the backbone on them into the project's first segmentation model, adopted."""
    from napari_genselfdiff.bundled import bundled_backbone
    from napari_genselfdiff.core.checkpoint import load_config

    backbone = bundled_backbone()
    assert backbone is not None, "resources/models/pretrained is part of the package"
    viewer.add_image(he_image, name="H&E", rgb=True)
    chooser = RefineWidget(viewer).project_box.model
    listed = [chooser.combo.itemText(i) for i in range(chooser.combo.count())]
    assert any(t.startswith("pretrained backbone (bundled)") and "Refine learns it" in t for t in listed), listed
    chooser.setText(str(backbone))
    assert "<b>pretrained backbone</b>" in chooser.info.text() and "no segmentation yet" in chooser.info.text()
    fresh = RefineWidget(viewer)  # started from the backbone, a default patch becomes 128 px (4x quicker steps)
    viewer.window.add_dock_widget(fresh, name="first", area="right")
    fresh.refine_box.patch.setValue(256)
    fresh.project_box.folder.setText(str(tmp_path / "first"))
    fresh.project_box.model.setText(str(backbone))
    fresh.project_box.create_btn.click()
    assert fresh.refine_box.patch.value() == 128 and "Patch 128 px" in fresh.refine_box.progress.status.text()
    w = refine_widget(viewer, tmp_path, backbone)
    assert w.project.current_model == backbone
    look_at(viewer, (200, 250), 4)
    layer = w.annotate.edit_region()
    assert layer is not None and not np.asarray(layer.data).any()  # a backbone segments nothing: no prefill
    assert any("paint every gland in this region" in m for m in messages["info"]), messages
    accept_two_regions(viewer, w)
    w.refine_box.refine_btn.click()
    wait_idle(qtbot, w.refine_box.runner)
    (record,) = w.project.history()
    assert record["status"] == "finished" and record["before"] is None and record["after"] is not None
    first = w.project.folder / "models" / "refine-1"
    assert w.project.current_model == first  # adopted: the backbone could not be scored, so nothing was worse
    config = load_config(first)
    assert config["kind"] == "segmentation" and config["task"]["task"] == "glands"
    assert config["model"]["norm"] == load_config(backbone)["model"]["norm"]  # the backbone's own network
    assert "n/a →" in w.refine_box.dice.text()
