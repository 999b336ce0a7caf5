"""A viewer that speaks microns, a legend, a model chooser, field-of-view results kept (issue
#15, items 9, 11, 12, 13).

* 9: a slide whose pixel size is known is in microns (layer scale = um/px, units micrometre):
  napari's scale bar says um, and every layer over it (levels, labels, probabilities, shapes,
  a prediction store) keeps aligning; resolutions are said as um/px and a magnification.
* 11: the Predict widget's legend lists class names in the layer's own colours, a colour bar
  for probabilities; objects are drawn in their class's colour, nuclei as outlines.
* 12: the model chooser (Predict and Refine alike) shows task, resolution, validation Dice and
  date, and opens the model card.
* 13: fields of view predicted one after another are gathered in one layer.

The pure parts run without a viewer; the rest under Xvfb (pytest-xvfb) with QT_API=pyqt6, with
stand-in models (no training). Screenshots of Predict and Refine docked on a 1920 x 1080 window,
stacked and tabbed, go to ``screenshots/`` (git-ignored) for a person to look at.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_genselfdiff._widgets import canvas as canvas_mod
from napari_genselfdiff._widgets.canvas import LABELS, gather
from napari_genselfdiff._widgets.geometry import Grid, covers, placement, scale_bar_of, slide_scale
from conftest import require_bundled  # noqa: E402
from napari_genselfdiff.bundled import bundled_models, sample_image_path

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "screenshots"


# ---------------------------------------------------------------------------------------------
# pure: resolution words, microns, gathering views

def test_resolutions_are_said_in_microns_per_pixel_and_magnification():
    from napari_genselfdiff._widgets.models import fmt_mpp, magnification

    assert [magnification(m) for m in (0.25, 0.5, 1.0, 2.0)] == ["~40x", "~20x", "~10x", "~5x"]
    assert fmt_mpp(0.499) == "0.50 µm/px (~20x)" and fmt_mpp(1.24) == "1.24 µm/px (~8x)"
    assert fmt_mpp(None) == "unknown resolution"


def test_a_slide_in_microns_places_its_results_in_microns():
    """slide_scale is the one rule: (mpp, mpp) in micrometres, nothing when unknown; a level-1
    result over it spans 2 * mpp microns per pixel, its centre at mpp * (2j + 0.5), in microns."""
    assert slide_scale(None) == {} and slide_scale(0) == {}
    image = Grid(**slide_scale(0.25))
    assert image.units == ("um", "um") and image.mpp == pytest.approx(0.25)
    place = placement(image, 2.0, 10, 20)
    assert place["scale"] == pytest.approx((0.5, 0.5)) and place["units"] == ("um", "um")
    assert place["translate"] == pytest.approx((0.25 * (20 + 0.5), 0.25 * (40 + 0.5)))
    assert Grid(**place).mpp == pytest.approx(0.5)
    assert Grid().mpp is None and "units" not in placement(Grid(), 2.0)  # pixels stay pixels
    assert Grid((0.5, 0.5), units=("millimeter", "millimeter")).mpp == pytest.approx(500)


def view(value: int, shape=(4, 5)) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    labels[1:3, 1:3] = value
    return labels


def test_views_are_gathered_in_one_growing_canvas_with_unique_ids():
    a = {LABELS: view(1), "p": np.full((4, 5), 0.25, np.float32)}
    canvas, outcome = gather(None, "k", (10, 20, 4, 5), a)
    assert outcome == "new" and canvas.origin == (10, 20) and canvas.shape == (4, 5) and canvas.count == 1
    b = {LABELS: view(1) * 2 + (view(1) > 0), "p": np.full((4, 5), 0.75, np.float32)}  # ids 3
    same, outcome = gather(canvas, "k", (30, 12, 4, 5), b)
    assert outcome == "grown" and same is canvas
    assert canvas.origin == (10, 12) and canvas.shape == (24, 13)  # rows 10..33, columns 12..24
    lab = canvas.arrays[LABELS]
    np.testing.assert_array_equal(lab[0:4, 8:13], view(1))  # the first view, where it was
    np.testing.assert_array_equal(lab[20:24, 0:5], view(4))  # the second, numbered after it (3 + 1)
    assert lab[5:20].max() == 0 and canvas.arrays["p"][0, 8] == 0.25 and canvas.arrays["p"][20, 0] == 0.75
    assert canvas.regions == [(10, 20, 4, 5), (30, 12, 4, 5)]
    assert canvas.regions_in_array() == [[0, 8, 4, 5], [20, 0, 4, 5]]
    # the first region again: replaced inside it (new ids), the other kept, no duplicate region
    gather(canvas, "k", (10, 20, 4, 5), {LABELS: view(1), "p": np.zeros((4, 5), np.float32)})
    lab_now = canvas.arrays[LABELS]
    assert set(np.unique(lab_now[0:4, 8:13])) == {0, 5} and set(np.unique(lab_now[20:24, 0:5])) == {0, 4}
    assert canvas.regions == [(30, 12, 4, 5), (10, 20, 4, 5)]
    # another model (key) starts again; a view too far away starts again and leaves the old alone
    fresh, outcome = gather(canvas, "other", (0, 0, 4, 5), a)
    assert outcome == "new" and fresh is not canvas and fresh.shape == (4, 5)
    far, outcome = gather(canvas, "k", (5000, 5000, 4, 5), a, max_pixels=10_000)
    assert outcome == "far" and far is not canvas and far.origin == (5000, 5000)
    assert canvas.shape == (24, 13) and len(canvas.regions) == 2


def test_covers_asks_for_a_predicted_region_in_a_gathered_layer():
    """A gathered layer spans the bounding box of its views; a box in the gap between them is
    not covered (the edit of a suggested region there is predicted first)."""
    shape = (100, 100)
    regions = [[0, 0, 30, 30], [70, 70, 30, 30]]
    assert covers(shape, Grid(), Grid(), (5, 5, 10, 10), regions)
    assert not covers(shape, Grid(), Grid(), (40, 40, 10, 10), regions)
    assert covers(shape, Grid(), Grid(), (40, 40, 10, 10))  # without regions: the array's extent


# ---------------------------------------------------------------------------------------------
# GUI

import napari  # noqa: E402,F401  (declared: missing or broken is a failure, never a skip)
import pytestqt  # noqa: E402,F401

pytestmark = [pytest.mark.usefixtures("settings_dir")]


class Dark:
    """A stand-in segmentation model: foreground where the H&E is dark. ``task`` glands,
    nuclei or multiclass (class 1 where dark, class 2 where mid-grey)."""

    num_classes, tile_multiple = 2, 1

    def __init__(self, task: str = "glands", mpp: float | None = 1.0):
        self.task, self.mpp = task, mpp
        self.class_names = {"glands": ["background", "gland"], "nuclei": ["background", "nucleus"],
                            "multiclass": ["background", "tumour", "stroma"]}[task]
        self.num_classes = len(self.class_names)
        self.calls = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        grey = np.asarray(tiles).mean(-1)
        dark = (grey < 150).astype(np.float32)
        if self.num_classes == 2:
            return np.stack([1 - dark, dark], axis=1)
        mid = ((grey >= 150) & (grey < 190)).astype(np.float32)
        return np.stack([1 - dark - mid, dark, mid], axis=1)


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    from napari_genselfdiff.core.data import read_image
    return read_image(sample_image_path())


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer(show=True)
    v.window._qt_window.resize(1280, 900)
    return v


def stand_in(monkeypatch, model: Dark) -> None:
    """The Predict widget loads ``model`` whatever folder is chosen."""
    from napari_genselfdiff._widgets import whole_slide
    from napari_genselfdiff.core.inference import PredictorCache

    monkeypatch.setattr(whole_slide, "cached_predictor",
                        lambda path, device, cache, **options: PredictorCache(("fake", path, id(model)), model))


def predict_widget(viewer, tmp_path: Path):
    from napari_genselfdiff._widgets.predict import PredictWidget

    w = PredictWidget(viewer)
    viewer.window.add_dock_widget(w, name="Predict", area="right")
    w.device.combo.setCurrentText("cpu")
    w.tile.setValue(128)
    w.overlap.setValue(16)
    w.out.setText(str(tmp_path / "pred"))
    w.probability.setChecked(True)
    return w


def look_at_pixel(viewer, image, centre: tuple[float, float], zoom_px: float, canvas=(400, 800)) -> None:
    """The camera on image pixel ``centre``, ``zoom_px`` screen pixels per image pixel."""
    viewer.canvas.size = canvas
    s, t = np.asarray(image.scale)[-2:], np.asarray(image.translate)[-2:]
    camera = viewer.scene.camera
    camera.center = tuple(t + s * np.asarray(centre, float))
    camera.zoom = zoom_px / float(s[0])


def predict_here(qtbot, w) -> None:
    w.fov_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)


def pixel_edges(layer) -> np.ndarray:
    half = np.asarray(layer.scale) / 2
    return np.stack([layer.extent.world[0] - half, layer.extent.world[1] + half])


def write_ome_tiff(path: Path, image: np.ndarray, mpp: float) -> None:
    import tifffile

    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, subifds=1, tile=(128, 128), photometric="rgb", metadata=meta)
        tif.write(np.ascontiguousarray(image[::2, ::2]), subfiletype=1, tile=(128, 128), photometric="rgb")


def scale_bar_text(viewer) -> str:
    visual = viewer.window._qt_viewer.canvas._viewer_overlay_to_visual[scale_bar_of(viewer)][0]
    return visual.node.text.text


# -- 9: microns --------------------------------------------------------------------------------

@pytest.mark.gui
def test_a_slide_opens_in_microns_and_the_scale_bar_says_so(viewer, qtbot, tmp_path, he_image, monkeypatch):
    path = tmp_path / "slide.ome.tif"
    write_ome_tiff(path, he_image[:512, :768], mpp=0.25)
    [image] = viewer.open(str(path), plugin="napari-genselfdiff")
    assert tuple(image.scale) == pytest.approx((0.25, 0.25))
    assert [str(u) for u in image.units] == ["micrometer", "micrometer"]
    stand_in(monkeypatch, model := Dark(mpp=0.5))
    w = predict_widget(viewer, tmp_path)
    assert not scale_bar_of(viewer).visible
    look_at_pixel(viewer, image, (256, 384), 2)
    predict_here(qtbot, w)
    glands, prob = viewer.layers["glands"], viewer.layers["glands probability"]
    assert model.calls > 0 and glands.metadata["genselfdiff"]["downsample"] == 2.0  # at 0.5 um/px: level 1
    for layer in (glands, prob):
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
        assert tuple(layer.scale) == pytest.approx((0.5, 0.5))  # microns per pixel of level 1
    assert str(viewer.layers.units[-1]) == "micrometer"
    # the scale bar is switched on and speaks microns (it said "100 pixel" before)
    assert scale_bar_of(viewer).visible
    qtbot.waitUntil(lambda: scale_bar_text(viewer).endswith(("µm", "mm")), timeout=3000)
    # the resolution is said as um/px and magnification, not as a level
    status = w.progress.status.text()
    assert "0.50 µm/px (~20x)" in status and "level" not in status


@pytest.mark.gui
def test_every_layer_of_a_micron_slide_aligns(viewer, qtbot, tmp_path, he_image, monkeypatch):
    """Image levels, field-of-view labels and probability, a whole-slide store opened by the
    reader, and the suggestion outline (shapes) share pixel edges in microns."""
    from napari_genselfdiff._widgets.refine import SUGGESTION_LAYER, RefineWidget

    crop = he_image[:256, :384]
    path = tmp_path / "slide.ome.tif"
    write_ome_tiff(path, crop, mpp=0.5)
    [image] = viewer.open(str(path), plugin="napari-genselfdiff")
    stand_in(monkeypatch, Dark(mpp=1.0))
    w = predict_widget(viewer, tmp_path)
    viewer.reset_view()
    predict_here(qtbot, w)  # the whole image is in view: its labels cover exactly the image
    for name in ("glands", "glands probability"):
        np.testing.assert_allclose(pixel_edges(viewer.layers[name]), pixel_edges(image), atol=1e-6)
    np.testing.assert_allclose(pixel_edges(image), [[-0.25, -0.25], [127.75, 191.75]])  # 256 x 384 px of 0.5 um
    # a whole-slide store, opened through the reader like `genselfdiff predict` output
    w.slide_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    [store] = list((tmp_path / "pred").glob("*.zarr"))
    layers = viewer.open(str(store), plugin="napari-genselfdiff")
    assert layers
    for layer in layers:
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"], layer.name
        np.testing.assert_allclose(pixel_edges(layer), pixel_edges(image), atol=1e-6)
    assert layers[0].metadata["genselfdiff"]["mpp"] == pytest.approx(0.5)  # region counts and GeoJSON in µm
    # the suggestion outline: the region's pixel edges, in microns
    refine = RefineWidget(viewer)
    viewer.window.add_dock_widget(refine, name="Annotate and refine", area="right")
    refine.project_box.folder.setText(str(tmp_path / "project"))
    refine.project_box.model.setText("")
    refine.project_box.create_btn.click()
    refine.suggest.state.image = image.name
    refine.suggest.state.show([{"bounds": [40, 60, 100, 120], "score": 0.5}])
    refine.suggest._show_suggestion()
    outline = viewer.layers[SUGGESTION_LAYER]
    assert [str(u) for u in outline.units] == ["micrometer", "micrometer"]
    corners = np.array([outline.data_to_world(c) for c in outline.data[0][[0, 2]]])
    np.testing.assert_allclose(np.sort(corners, axis=0), [[0.5 * 39.5, 0.5 * 59.5], [0.5 * 139.5, 0.5 * 179.5]])


@pytest.mark.gui
def test_the_sample_image_is_in_microns(make_napari_viewer):
    from napari_genselfdiff._sample_data import SAMPLE_NAME

    v = make_napari_viewer()
    v.open_sample("napari-genselfdiff", "he_skin")
    layer = v.layers[SAMPLE_NAME]
    assert tuple(layer.scale) == pytest.approx((layer.metadata["mpp"],) * 2) and str(layer.units[-1]) == "micrometer"


# -- 11: legend and class colours ----------------------------------------------------------------

@pytest.mark.gui
def test_the_legend_names_the_classes_in_the_layers_colours(viewer, qtbot, tmp_path, he_image, monkeypatch):
    from napari.utils.colormaps import DirectLabelColormap

    image = viewer.add_image(he_image, name="H&E", rgb=True, **slide_scale(0.5))
    stand_in(monkeypatch, Dark("glands", mpp=0.5))
    w = predict_widget(viewer, tmp_path)
    assert not w.legend.isVisible() and w.legend.entries() == []
    look_at_pixel(viewer, image, (300, 400), 2)
    predict_here(qtbot, w)
    glands = viewer.layers["glands"]
    assert glands.data.max() > 2
    green = (0.0, 200 / 255, 0.0, 1.0)
    for i in (1, 2, int(glands.data.max())):  # every object in the class colour
        np.testing.assert_allclose(glands.colormap.map(np.array([i]))[0], green)
    [(layer, text, colour), (player, ptext, pcolour)] = w.legend.entries()
    assert (layer, text) == ("glands", "gland") and colour == pytest.approx(green)
    assert player == "glands probability" and "p(gland)" in ptext and pcolour is None
    assert w.legend.isVisible()
    # a colour changed in napari's layer controls: the legend follows
    glands.colormap = DirectLabelColormap(color_dict={None: [1.0, 0.0, 0.0, 1.0], 0: [0, 0, 0, 0]})
    assert w.legend.entries()[0][2] == pytest.approx((1.0, 0.0, 0.0, 1.0))
    viewer.layers.remove("glands probability")
    assert [e[0] for e in w.legend.entries()] == ["glands"]


@pytest.mark.gui
def test_nuclei_are_outlines_and_a_class_map_gets_its_class_names(viewer, qtbot, tmp_path, he_image, monkeypatch):
    image = viewer.add_image(he_image, name="H&E", rgb=True, **slide_scale(0.5))
    stand_in(monkeypatch, Dark("nuclei", mpp=0.5))
    w = predict_widget(viewer, tmp_path)
    look_at_pixel(viewer, image, (300, 400), 2)
    predict_here(qtbot, w)
    nuclei = viewer.layers["nuclei"]
    assert nuclei.contour == 2 and nuclei.opacity == pytest.approx(0.9)  # visible at ordinary zoom
    assert w.legend.entries()[0][:2] == ("nuclei", "nucleus (outlines)")
    np.testing.assert_allclose(w.legend.entries()[0][2], (1.0, 220 / 255, 0.0, 1.0))
    from napari_genselfdiff.formats.qupath import colour_of_class
    assert colour_of_class("Nucleus") == (255, 220, 0)  # the QuPath export's colour is napari's
    # a model of several classes: a class map whose legend lists them in its colours
    stand_in(monkeypatch, Dark("multiclass", mpp=0.5))
    w.probability.setChecked(False)
    predict_here(qtbot, w)
    classes = viewer.layers["classes"]
    entries = [e for e in w.legend.entries() if e[0] == "classes"]
    assert [e[1] for e in entries] == ["tumour", "stroma"]
    for i, (_, _, colour) in enumerate(entries, start=1):
        np.testing.assert_allclose(colour, classes.colormap.map(np.array([i]))[0])
    assert entries[0][2] != entries[1][2]
    assert set(np.unique(classes.data)) <= {0, 1, 2} and (classes.data == 2).any()


# -- 12: the model chooser ----------------------------------------------------------------------

def copy_model(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


def bundled_or_skip() -> dict:
    """The bundled models by task; the test is skipped when they are not installed."""
    models = require_bundled("glands", "nuclei")
    return models


@pytest.mark.gui
def test_the_model_chooser_says_what_each_model_is_and_opens_its_card(viewer, tmp_path):
    models = bundled_or_skip()
    from napari_genselfdiff._widgets.models import fmt_mpp

    w = predict_widget(viewer, tmp_path)
    texts = [w.model.itemText(i) for i in range(w.model.count())]
    for text, name in zip(texts[:2], ("glands", "nuclei")):  # what each config.json says (retraining changes it)
        cfg = json.loads((models[name] / "config.json").read_text())
        assert text.startswith(f"{name} (bundled) — {name} · {fmt_mpp(cfg['mpp'])}")
        assert f"Dice {cfg['validation']['val_dice']:.2f}" in text and cfg["training"]["time"][:10] in text
    assert "1.24 µm/px (~8x)" in texts[0] and "0.50 µm/px (~20x)" in texts[1]
    w.model.setCurrentIndex(0)
    cfg = json.loads((models["glands"] / "config.json").read_text())
    info = w.chooser.info.text()
    unit = "crops" if cfg["validation"].get("val_crop") else "images"  # fixed crops since session 4
    assert f"validation Dice {cfg['validation']['val_dice']:.3f} ({cfg['validation']['n_val']} {unit})" in info
    assert f"test Dice {cfg['test_metrics']['dice']:.3f}" in info
    assert w.chooser.card_btn.isEnabled()
    dialog = w.chooser.show_card()
    assert dialog.isVisible() and "Default glands model" in dialog.text.toPlainText()
    # a model folder of one's own (fine-tuned elsewhere, no card)
    mine = copy_model(models["nuclei"], tmp_path / "ft", mpp=0.25, validation={"val_dice": 0.7, "n_val": 2},
                      training={"time": "2027-01-02T03:04:05+00:00"})
    w.add_model(str(mine))
    assert w.model_path() == str(mine)
    text = w.model.currentText()
    assert text.startswith("ft — nuclei") and "0.25 µm/px (~40x)" in text and "Dice 0.70" in text
    assert "2027-01-02" in text and not w.chooser.card_btn.isEnabled()
    assert w.chooser.show_card() is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    w.add_model(str(broken))
    assert "unreadable" in w.model.currentText()


@pytest.mark.gui
def test_refine_chooses_its_model_with_the_same_chooser(viewer, tmp_path):
    from napari_genselfdiff._widgets.models import ModelChooser
    from napari_genselfdiff._widgets.refine import RefineWidget

    models = bundled_or_skip()
    predict = predict_widget(viewer, tmp_path)
    refine = RefineWidget(viewer)
    viewer.window.add_dock_widget(refine, name="Annotate and refine", area="right")
    box = refine.project_box
    assert isinstance(box.model, ModelChooser) and type(box.model) is type(predict.chooser)
    listed = [box.model.combo.itemText(i) for i in range(box.model.combo.count())]
    assert listed[0] == "(no model)" and listed[1:3] == [predict.model.itemText(i) for i in range(2)]
    assert box.task.currentText() == "glands" and box.model.text() == str(models["glands"])
    box.task.setCurrentText("nuclei")  # the bundled model follows the task
    assert box.model.text() == str(models["nuclei"])
    assert box.model.card_btn.isEnabled() and "0.50 µm/px" in box.model.info.text()
    box.folder.setText(str(tmp_path / "project"))
    box.create_btn.click()
    assert refine.project.current_model == models["nuclei"] and refine.project.spec.task == "nuclei"


# -- 13: fields of view kept ---------------------------------------------------------------------

@pytest.mark.gui
def test_two_fields_of_view_leave_both_results_visible(viewer, qtbot, tmp_path, he_image, monkeypatch):
    image = viewer.add_image(he_image, name="H&E", rgb=True, **slide_scale(0.5))
    stand_in(monkeypatch, Dark(mpp=0.5))
    w = predict_widget(viewer, tmp_path)
    look_at_pixel(viewer, image, (150, 250), 2)  # rows ~50..250, columns ~50..450
    predict_here(qtbot, w)
    glands = viewer.layers["glands"]
    first, (y1, x1) = glands.data.copy(), glands.metadata["genselfdiff"]["offset"]
    first_prob = viewer.layers["glands probability"].data.copy()
    assert first.max() > 0
    look_at_pixel(viewer, image, (600, 350), 2)  # rows ~500..700, columns ~150..550: elsewhere
    predict_here(qtbot, w)
    assert viewer.layers["glands"] is glands  # the same layer, grown
    (oy, ox), (h1, w1) = glands.metadata["genselfdiff"]["offset"], first.shape
    regions = glands.metadata["genselfdiff_fov"]["regions"]
    assert len(regions) == 2 and (oy, ox) == (y1, x1)  # the first view is the top-left one
    vy, vx, vh, vw = regions[0]  # the first view itself (its result has a margin around it)
    assert vy > y1 - oy and vh < h1
    kept = glands.data[y1 - oy:y1 - oy + h1, x1 - ox:x1 - ox + w1]
    np.testing.assert_array_equal(kept[vy:vy + vh, vx:vx + vw], first[vy:vy + vh, vx:vx + vw])  # still there
    np.testing.assert_array_equal(viewer.layers["glands probability"].data[:h1, :w1], first_prob)
    ry, rx, rh, rw = regions[1]
    second = glands.data[ry:ry + rh, rx:rx + rw]
    assert second.max() > 0  # (an object reaching from one view into the other keeps one id: the canvas tests)
    assert "2 views" in w.progress.status.text()
    # placed over the image: label pixel (0, 0) is image pixel (oy, ox), in microns
    assert tuple(glands.translate) == pytest.approx((0.5 * oy, 0.5 * ox))
    assert viewer.layers["glands probability"].data.shape == glands.data.shape
    # coming back to the first view replaces it and keeps the second
    look_at_pixel(viewer, image, (150, 250), 2)
    predict_here(qtbot, w)
    assert len(glands.metadata["genselfdiff_fov"]["regions"]) == 2
    np.testing.assert_array_equal(glands.data[ry:ry + rh, rx:rx + rw], second)
    np.testing.assert_array_equal(glands.data[vy:vy + vh, vx:vx + vw] > 0, first[vy:vy + vh, vx:vx + vw] > 0)


@pytest.mark.gui
def test_a_view_far_from_the_others_keeps_them_in_their_own_layer(viewer, qtbot, tmp_path, he_image, monkeypatch):
    image = viewer.add_image(he_image, name="H&E", rgb=True, **slide_scale(0.5))
    stand_in(monkeypatch, Dark(mpp=0.5))
    monkeypatch.setattr(canvas_mod, "MAX_CANVAS_PIXELS", 200 * 420)  # one view's worth
    w = predict_widget(viewer, tmp_path)
    look_at_pixel(viewer, image, (150, 250), 2)
    predict_here(qtbot, w)
    first = viewer.layers["glands"].data.copy()
    oy, ox = viewer.layers["glands"].metadata["genselfdiff"]["offset"]
    look_at_pixel(viewer, image, (600, 350), 2)
    predict_here(qtbot, w)
    earlier = viewer.layers[f"glands @ {oy},{ox}"]
    np.testing.assert_array_equal(earlier.data, first)
    assert f"glands probability @ {oy},{ox}" in viewer.layers
    assert len(viewer.layers["glands"].metadata["genselfdiff_fov"]["regions"]) == 1
    assert f"'glands @ {oy},{ox}'" in w.progress.status.text()


# -- screenshots ---------------------------------------------------------------------------------

@pytest.mark.gui
@pytest.mark.parametrize("tabbed", [False, True], ids=["stacked", "tabbed"])
def test_screenshots_of_predict_and_refine_docked(make_napari_viewer, qtbot, tmp_path, he_image, monkeypatch,
                                                  one_torch_thread, tabbed):
    """Predict and Refine docked on a 1920 x 1080 window, after two fields of view (the bundled
    nuclei model when installed, else the stand-in; on this skin image the glands model rightly
    adds nothing)."""
    from napari_genselfdiff._widgets.refine import RefineWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1920, 1080)
    image = viewer.add_image(he_image, name="H&E skin", rgb=True, **slide_scale(0.5))
    bundled = "nuclei" in bundled_models()
    if not bundled:
        stand_in(monkeypatch, Dark("nuclei", mpp=0.5))
    w = predict_widget(viewer, tmp_path)
    w.tile.setValue(256)
    w.overlap.setValue(-1)
    texts = [w.model.itemText(i) for i in range(w.model.count())]
    w.model.setCurrentIndex(next((i for i, t in enumerate(texts) if t.startswith("nuclei")), 0) if bundled else 0)
    refine = RefineWidget(viewer)
    refine_dock = viewer.window.add_dock_widget(refine, name="Annotate and refine", area="right", tabify=tabbed)
    qtbot.wait(100)
    for centre in [(250, 250), (550, 300)]:
        look_at_pixel(viewer, image, centre, 1.5, canvas=tuple(viewer.canvas.size))
        predict_here(qtbot, w)
    assert len(viewer.layers["nuclei"].metadata["genselfdiff_fov"]["regions"]) == 2
    look_at_pixel(viewer, image, (400, 300), 1.2, canvas=tuple(viewer.canvas.size))
    SHOTS.mkdir(exist_ok=True)
    shots = {"stacked": None} if not tabbed else {"tabbed_predict": w, "tabbed_refine": refine_dock}
    for name, front in shots.items():
        if front is not None:
            (front if front is refine_dock else front.parentWidget()).raise_()
        qtbot.wait(200)
        path = SHOTS / f"predict_refine_{name}.png"
        assert viewer.window._qt_window.grab().save(str(path))
        assert path.stat().st_size > 10_000
    assert w.legend.entries()[0][:2] == ("nuclei", "nucleus (outlines)")


def test_a_labels_layer_drawn_in_microns_saves_in_slide_pixels(tmp_path):
    """Without our metadata, a layer in microns (scale 0.5 um, translate 5, 10 um) has one
    label pixel per slide pixel: label (0, 0) is slide pixel (10, 20)."""
    from napari_genselfdiff._writer import label_grid, write_geojson
    from napari_genselfdiff.formats.geojson import read_geojson

    meta = {"name": "glands", "scale": (0.5, 0.5), "translate": (5.0, 10.0), "units": ("micrometer", "micrometer")}
    assert label_grid(meta) == ((10.0, 20.0), 1.0)
    labels = np.zeros((4, 4), np.int32)
    labels[0, 0] = 1
    path = str(tmp_path / "g.geojson")
    write_geojson(path, labels, meta)
    assert read_geojson(path).features[0].geometry.bounds == (20.0, 10.0, 21.0, 11.0)
    assert label_grid({**meta, "units": ("pixel", "pixel")}) == ((10.5, 20.5), 0.5)  # pixels as before


def test_two_projects_refined_models_are_told_apart_in_the_model_list(tmp_path, qtbot):
    """Issue 35 item 10: two models both listed as 'refine-1'."""
    import shutil

    from conftest import require_bundled
    from napari_genselfdiff._widgets.models import ModelChooser

    seg_model = require_bundled("glands")["glands"]
    paths = []
    for project in ("study-A", "study-B"):
        models = tmp_path / project / "models"
        models.mkdir(parents=True)
        (tmp_path / project / "project.json").write_text("{}")
        shutil.copytree(seg_model, models / "refine-1")
        paths.append(str(models / "refine-1"))
    loose = tmp_path / "elsewhere" / "refine-1"  # a folder of that name outside any project keeps its name
    shutil.copytree(seg_model, loose)
    chooser = ModelChooser()
    qtbot.addWidget(chooser)
    chooser.fill({}, [*paths, str(loose)])
    listed = [chooser.combo.itemText(i).split(" — ")[0] for i in range(chooser.combo.count())]
    assert listed == ["study-A / refine-1", "study-B / refine-1", "refine-1"]


class Graded(Dark):
    """A stand-in whose probability falls off with brightness (0 at grey 200, 1 at grey 100): the
    threshold moves where objects end."""

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        p = np.clip((200.0 - np.asarray(tiles).mean(-1)) / 100.0, 0, 1).astype(np.float32)
        return np.stack([1 - p, p], axis=1)


@pytest.mark.gui
def test_the_live_object_controls_find_objects_again_without_the_model(viewer, qtbot, tmp_path, he_image,
                                                                       monkeypatch):
    """Issue 35 item 11: threshold and smallest-object controls re-run only the post-processing."""
    image = viewer.add_image(he_image, name="H&E", rgb=True, **slide_scale(0.5))
    stand_in(monkeypatch, model := Graded(mpp=0.5))
    w = predict_widget(viewer, tmp_path)
    assert not w.objects.box.isEnabled()  # nothing to find objects in yet
    look_at_pixel(viewer, image, (300, 400), 1)
    predict_here(qtbot, w)
    glands, calls = viewer.layers["glands"], model.calls
    first = glands.data.copy()
    assert w.objects.box.isEnabled() and w.objects.values()["threshold"] == pytest.approx(0.5)
    assert w.objects.min_size.value() == 100 and w.objects.overrides() == {}  # the glands defaults

    def after(change) -> np.ndarray:
        before = glands.data.copy()
        change()
        qtbot.waitUntil(lambda: not np.array_equal(glands.data, before), timeout=20_000)
        qtbot.waitUntil(lambda: not w.objects.runner.running, timeout=20_000)
        return glands.data.copy()

    stricter = after(lambda: w.objects.threshold.setValue(80))
    assert 0 < (stricter > 0).sum() < (first > 0).sum()
    assert "threshold 0.80" in w.progress.status.text()
    assert viewer.layers["glands"] is glands and model.calls == calls  # the network did not run again
    fewer = after(lambda: w.objects.min_size.setValue(2000))
    assert 0 < len(np.unique(fewer)) - 1 < len(np.unique(stricter)) - 1
    assert w.objects.min_size_text.text() == "≈ 500 µm²"
    assert w.objects.overrides() == {"threshold": 0.8, "min_size": 2000}
    meta = glands.metadata
    (y0, x0), (ry, rx, rh, rw) = meta["genselfdiff"]["offset"], meta["genselfdiff_fov"]["regions"][0]
    predict_here(qtbot, w)  # the view again (the dock may have moved it), with the controls' values
    (y1, x1) = glands.metadata["genselfdiff"]["offset"]
    again = glands.data[y0 + ry - y1:y0 + ry - y1 + rh, x0 + rx - x1:x0 + rx - x1 + rw]
    # the same objects, but for those the first view's border cut below the smallest size (whole now)
    differ = (again > 0) != (fewer[ry:ry + rh, rx:rx + rw] > 0)
    assert differ.mean() < 0.01 and differ[40:-40, 40:-40].mean() < 1e-3
    assert (again > 0).sum() < (first[ry:ry + rh, rx:rx + rw] > 0).sum()  # stricter than the model's values
    w.objects.threshold.setValue(50)
    w.objects.min_size.setValue(100)
    assert w.objects.overrides() == {}
    assert w.objects.overrides() == {}


@pytest.mark.gui
def test_the_object_controls_find_a_whole_slides_objects_again(viewer, qtbot, tmp_path, he_image, monkeypatch):
    """Issue 35 item 11 for a whole slide: 'Apply to whole slide' finds its objects again with the
    controls' values from the stored probabilities (the model does not run), equal to labelling the
    probabilities in one piece; the store keeps them, a cancel keeps the objects as they were."""
    from napari_genselfdiff.core.eval.postprocess import glands_from_probabilities
    from napari_genselfdiff.slide.instances import compare_partitions
    from napari_genselfdiff.slide.store import PredictionStore

    viewer.add_image(he_image, name="H&E", rgb=True, **slide_scale(0.5))
    stand_in(monkeypatch, model := Graded(mpp=0.5))
    w = predict_widget(viewer, tmp_path)
    assert not w.objects.slide_btn.isEnabled()  # no whole slide yet
    w.slide_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    glands, calls = viewer.layers["glands"], model.calls
    first = np.asarray(glands.data[0] if glands.multiscale else glands.data)
    assert w.objects.slide_btn.isEnabled() and w.objects.box.isEnabled()
    assert w.objects.values() == {"threshold": 0.5, "min_size": 100}  # what the slide's objects were found with
    # item 5 for a whole slide: its objects measured from the store (a worker), a row each, in µm
    qtbot.waitUntil(w.measure_btn.isEnabled, timeout=60_000)
    ids = np.unique(first[first > 0])
    assert list(glands.features["Object ID"]) == list(ids) and "Area µm^2" in glands.features
    assert "Hematoxylin OD mean" in glands.features  # the image's pixels at the level the model ran on
    assert f"{len(ids)} glands measured" in w.progress.status.text()
    table = w.measurements.show_table()
    assert table.model().rowCount() == len(ids)
    k = len(ids) // 2
    table.selectRow(k)  # the row's object is centred from its centroid in the table
    centre = np.argwhere(first == ids[k]).mean(axis=0)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], glands.data_to_world(centre)[-2:], atol=1e-6)
    w.objects.threshold.setValue(80)
    w.objects.min_size.setValue(2000)
    w.objects.slide_btn.click()
    assert w.cancel_btn.isEnabled() and not w.objects.slide_btn.isEnabled()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    [out] = list((tmp_path / "pred").glob("*.zarr"))
    store = PredictionStore.open(out)
    shown = viewer.layers["glands"]
    after = np.asarray(shown.data[0] if shown.multiscale else shown.data)
    fg = np.asarray(store.probabilities[1])
    assert compare_partitions(glands_from_probabilities(fg, threshold=0.8, min_size=2000), after).identical
    assert 0 < len(np.unique(after)) - 1 < len(np.unique(first)) - 1
    assert model.calls == calls  # the network did not run again
    assert store.label_options("glands")["threshold"] == pytest.approx(0.8)
    assert "done" in w.progress.status.text() and w.objects.slide_btn.isEnabled()
    qtbot.waitUntil(lambda: len(shown.features) == len(np.unique(after)) - 1, timeout=60_000)  # measured again
    assert table.model().rowCount() == len(shown.features)
    assert w.measurements.save(str(tmp_path / "slide.csv"))
    assert (tmp_path / "slide.csv").read_text(encoding="utf-8").count("\n") == len(shown.features) + 1
    viewer.window._qt_window.resize(1920, 1080)
    SHOTS.mkdir(exist_ok=True)
    viewer.screenshot(str(SHOTS / "predict_whole_slide_relabelled.png"), canvas_only=False)
    # the next time the slide is shown (its store resumed), the controls say what its objects were found with
    w.objects.threshold.setValue(50)
    w.slide_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    assert w.objects.values() == {"threshold": 0.8, "min_size": 2000} and model.calls == calls
    # cancelled, the slide keeps its objects (each block made slow, so Cancel comes before the end)
    from napari_genselfdiff.slide import relabel

    def slowly(*args, **kwargs):
        return (yield from _slow_steps(original(*args, **kwargs)))

    original = relabel.label_store
    monkeypatch.setattr(relabel, "label_store", slowly)
    w.objects.threshold.setValue(30)
    w.objects.slide_btn.click()
    w.cancel_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    assert "keeps its objects as they were" in w.progress.status.text()
    assert compare_partitions(np.asarray(store.labels("glands")), after).identical


def _slow_steps(gen):
    """``gen``'s steps, 0.2 s apart; its return value."""
    import time

    from napari_genselfdiff.core.progress import relay

    return (yield from relay(gen, lambda step: time.sleep(0.2) or step))


def test_an_object_cut_by_a_new_view_keeps_its_id_across_the_border():
    """Issue 35 item 6: a zoomed re-predict inside an earlier view cuts an earlier gland at the new
    view's border; the part inside takes the earlier id (not a second one), while a new object
    that only touches the border beside an unrelated earlier object stays its own."""
    first = np.zeros((20, 30), np.int32)
    first[5:15, 2:20] = 1  # a gland crossing column 10, where the next view starts
    first[2:4, 25:28] = 2  # another, outside the next view
    canvas, _ = gather(None, "k", (0, 0, 20, 30), {LABELS: first})
    zoom = np.zeros((20, 10), np.int32)  # the view columns 10..19: the same gland's right part...
    zoom[5:15, 0:10] = 1
    zoom[17:20, 0:3] = 2  # ...and a new object at the border where the earlier view had nothing
    gather(canvas, "k", (0, 10, 20, 10), {LABELS: zoom})
    lab = canvas.arrays[LABELS]
    assert set(np.unique(lab[5:15, 2:20])) == {1}  # one gland, one id, on both sides of the border
    assert lab[18, 11] not in (0, 1, 2) and lab[3, 26] == 2
    assert canvas.count == 4  # ids stay unique: the next paste is numbered after 4
    # a new object lying mostly on background (under half on the cut gland) is not joined to it
    other = np.zeros((20, 10), np.int32)
    other[12:20, 0:4] = 1  # 32 px, 12 of them (rows 12..14) on the gland
    gather(canvas, "k", (0, 10, 20, 10), {LABELS: other})
    lab = canvas.arrays[LABELS]
    assert lab[16, 11] == 5 and lab[5, 5] == 1


@pytest.mark.gui
def test_a_zoomed_re_predict_keeps_a_cut_object_one_object(viewer, qtbot, tmp_path, he_image, monkeypatch):
    """Issue 35 item 6, tried as reported: predict the whole image, zoom in so that the view's
    border runs through an object, predict again: the object keeps one id (it became ids 2 and 8)."""
    from napari_genselfdiff._widgets.fov_job import region_on_screen

    image = viewer.add_image(he_image, name="H&E", rgb=True)
    stand_in(monkeypatch, Dark(mpp=None))
    w = predict_widget(viewer, tmp_path)
    viewer.reset_view()
    predict_here(qtbot, w)
    before = np.array(viewer.layers["glands"].data)
    sizes = np.bincount(before.ravel())
    sizes[0] = 0
    big = int(sizes.argmax())
    rows, cols = np.nonzero(before == big)
    mid_row, mid_col = int(np.median(rows)), int(np.median(cols))
    camera = viewer.camera
    camera.zoom = camera.zoom * 3
    _, _, _, h, wd = region_on_screen(viewer, image)
    camera.center = (mid_row, mid_col + wd / 2)  # the view's left border through the object's middle
    _, y, x, h, wd = region_on_screen(viewer, image)
    inside = np.zeros(before.shape, bool)
    inside[y:y + h, x:x + wd] = True
    obj = before == big
    assert (obj & inside).sum() > 100 and (obj & ~inside).sum() > 100  # the view cuts it
    predict_here(qtbot, w)
    after = viewer.layers["glands"].data
    assert after.shape == before.shape  # the same canvas, the zoomed view pasted into it
    ids = np.unique(after[obj & (after > 0)])
    assert len(ids) == 1 and ids[0] == big, ids


def test_a_view_margin_finds_the_objects_its_border_cuts_whole_and_keeps_earlier_ones():
    """Issue 35 item 6: the objects a view's border cuts come whole from its margin; objects lying
    wholly in the margin are left out (a later view finds them) and never erase what an earlier view
    found there; the view, not the margin, is the region recorded."""
    from napari_genselfdiff.slide.fov import objects_in_view, view_margin, with_margin

    assert with_margin((10, 5, 20, 30), 8, (100, 40)) == ((2, 0, 36, 40), (8, 5, 20, 30))  # clipped at the image
    assert view_margin("nuclei", 0.5) == 32 and view_margin("glands", 1.24) == 81
    grown = np.zeros((36, 40), np.int32)
    grown[10:20, 0:9] = 3  # crosses the view's left border (column 5 of the grown box)
    grown[0:4, 0:4] = 7  # wholly in the margin
    grown[20:25, 20:25] = 9  # inside the view
    kept = objects_in_view(grown, (8, 5, 20, 30))
    assert set(np.unique(kept)) == {0, 1, 2}
    assert (kept[10:20, 0:9] == 1).all() and (kept[20:25, 20:25] == 2).all() and not kept[0:4, 0:4].any()

    first = np.zeros((20, 24), np.int32)  # view A: columns 0..23
    first[8:12, 16:24] = 1  # a gland A's border (column 24) cuts: it goes on to column 27
    first[2:6, 0:4] = 2  # another, far from the next view
    first[15:19, 12:16] = 3  # one crossing B's border that B (at another threshold, say) does not find
    canvas, _ = gather(None, "k", (0, 0, 20, 24), {LABELS: first})
    nxt = np.zeros((20, 36), np.int32)  # view B, columns 14..39, with its margin: columns 4..39
    nxt[8:12, 12:24] = 1  # the cut gland, whole (columns 16..27)
    nxt[3:7, 30:34] = 2  # a new one inside B
    gather(canvas, "k", (0, 4, 20, 36), {LABELS: nxt}, view=(0, 14, 20, 26))
    lab = canvas.arrays[LABELS]
    assert (lab[8:12, 16:28] == 1).all()  # one gland, whole, with its earlier id
    assert (lab[2:6, 0:4] == 2).all()  # untouched
    assert (lab[15:19, 12:14] == 3).all()  # in B's margin what A found is kept: the margin erases nothing
    assert (lab[15:19, 14:16] == 0).all()  # in B's view B's result holds: nothing
    assert len(set(np.unique(lab[3:7, 34:38]))) == 1 and lab[4, 35] > 3
    assert canvas.regions == [(0, 0, 20, 24), (0, 14, 20, 26)]


@pytest.mark.gui
def test_the_first_view_finds_the_objects_its_border_cuts_whole(viewer, qtbot, tmp_path, he_image, monkeypatch):
    """Issue 35 item 6: the first prediction of a zoomed view whose border runs through an object
    shows the whole object (it stopped at the border), with the same pixels as the whole image's."""
    from napari_genselfdiff._widgets.fov_job import region_on_screen
    from napari_genselfdiff.slide.fov import VIEW_MARGIN_PX

    image = viewer.add_image(he_image, name="H&E", rgb=True)
    stand_in(monkeypatch, Dark(mpp=None))
    w = predict_widget(viewer, tmp_path)
    viewer.reset_view()
    predict_here(qtbot, w)
    whole = np.array(viewer.layers["glands"].data)
    from scipy import ndimage

    # the largest object narrower than the margin, so a border through its middle leaves it whole
    boxes = ndimage.find_objects(whole)
    sizes = np.bincount(whole.ravel())
    fits = [i + 1 for i, b in enumerate(boxes) if b is not None and 16 < b[1].stop - b[1].start < VIEW_MARGIN_PX
            and b[1].start > VIEW_MARGIN_PX]
    big = max(fits, key=lambda i: sizes[i])
    obj = whole == big
    rows, cols = np.nonzero(obj)
    for name in ["glands", "glands probability"]:  # kept aside: the next view starts a new canvas
        viewer.layers[name].name = f"{name} (whole image)"
    camera = viewer.camera
    camera.zoom = camera.zoom * 3
    _, _, _, h, wd = region_on_screen(viewer, image)
    border = (int(cols.min()) + int(cols.max())) // 2  # the view's left border through the object's middle
    camera.center = (int(np.median(rows)), border + wd / 2)
    _, y, x, h, wd = region_on_screen(viewer, image)
    inside = np.zeros(obj.shape, bool)
    inside[y:y + h, x:x + wd] = True
    assert (obj & ~inside).sum() > 20 and (obj & inside).sum() > 20  # the view's border cuts it
    predict_here(qtbot, w)
    canvas = w.views.current("glands")
    oy, ox = canvas.origin
    ch, cw = canvas.shape
    assert ox < x  # the labels reach past the view's border
    got = np.zeros(obj.shape, np.int64)
    got[oy:oy + ch, ox:ox + cw] = canvas.arrays[LABELS]
    ids = np.unique(got[obj])
    assert len(ids) == 1 and ids[0] > 0, ids  # the whole object, one id (0 outside the view before)
    assert ((got == ids[0]) == obj).mean() > 0.999
    assert canvas.regions == [(y, x, h, wd)]


@pytest.mark.gui
def test_the_pixel_size_question_offers_the_magnifications_a_pathologist_knows(viewer, qtbot):
    from napari_genselfdiff._widgets.pixelsize import PixelSizeDialog

    d = PixelSizeDialog(None, "tile.png")
    qtbot.addWidget(d)
    assert d.value() == 0.5  # 20x, the commonest scan, is the default answer
    texts = [b.text() for b, _ in d.buttons]
    assert texts[:3] == ["40x  (0.25 µm/px)", "20x  (0.5 µm/px)", "10x  (1 µm/px)"] and "don't know" in texts[-1]
    d.buttons[0][0].setChecked(True)
    assert d.value() == 0.25
    d.value_spin.setValue(0.3)  # typing a value picks "another pixel size"
    assert d.other.isChecked() and d.value() == pytest.approx(0.3)
    d.buttons[-1][0].setChecked(True)
    assert d.value() is None
    d.buttons[1][0].setChecked(True)
    d.show()
    qtbot.waitExposed(d)
    shots = Path(__file__).resolve().parents[1] / "screenshots"
    shots.mkdir(exist_ok=True)
    assert d.grab().save(str(shots / "pixel_size_question.png"))


@pytest.mark.gui
def test_a_pixel_size_the_file_lacks_is_asked_once_and_used_everywhere(viewer, qtbot, tmp_path, he_image, monkeypatch):
    """Issue 35 item 4: an image without a pixel size: Predict asks once (40x), runs the 1 µm/px
    model on a coarser level, keeps the answer on the layer; a second prediction does not ask again,
    and Fine-tune and the Refine project read the same value. 'I don't know' is remembered too;
    a dialog closed without an answer is asked again."""
    from napari_genselfdiff._widgets import pixelsize
    from napari_genselfdiff._widgets.finetune import FinetuneWidget
    from napari_genselfdiff._widgets.geometry import known_mpp

    asked: list[str] = []
    answer = [(True, 0.25)]

    def ask(parent, layer):
        asked.append(layer.name)
        return answer[0]

    monkeypatch.setattr(pixelsize, "ask", ask)
    image = viewer.add_image(he_image[:512, :512], name="tile", rgb=True)
    stand_in(monkeypatch, Dark(mpp=1.0))
    w = predict_widget(viewer, tmp_path)
    viewer.reset_view()
    predict_here(qtbot, w)
    assert asked == ["tile"] and known_mpp(image) == 0.25
    glands = viewer.layers["glands"]
    # the level closest to the model's 1 µm/px that this 512-px image has: 0.5 µm/px (unknown: level 0)
    assert glands.data.shape == (256, 256) and glands.metadata["genselfdiff"]["downsample"] == 2.0
    assert "0.50 µm/px" in w.progress.status.text()
    predict_here(qtbot, w)
    assert asked == ["tile"]  # once per image
    ft = FinetuneWidget(viewer)
    qtbot.addWidget(ft)
    ft.image_layer.setCurrentText("tile")
    assert ft.pixel_size() == 0.25 and asked == ["tile"]
    # another image: closed unanswered -> asked again; "I don't know" -> remembered, not asked again
    other = viewer.add_image(he_image[:256, :256], name="other", rgb=True)
    answer[0] = (False, None)
    assert pixelsize.pixel_size_of(w, other) is None and pixelsize.pixel_size_of(w, other) is None
    assert asked == ["tile", "other", "other"]
    answer[0] = (True, None)
    assert pixelsize.pixel_size_of(w, other) is None and pixelsize.pixel_size_of(w, other) is None
    assert asked == ["tile", "other", "other", "other"]
    # the Pixel size row replaces what was asked; the file's own value is never replaced
    assert pixelsize.pixel_size_of(w, other, 0.5) == 0.5 and known_mpp(other) == 0.5
    other.metadata["mpp"] = 0.23
    assert pixelsize.pixel_size_of(w, other, 0.5) == 0.23


@pytest.mark.gui
def test_a_store_opened_again_looks_like_the_live_result(viewer, qtbot, tmp_path, he_image, monkeypatch):
    """Issue 35 item 10: a whole-slide store opened through File > Open is drawn as the live result
    was (nuclei outlined in the nucleus colour, not filled random colours; the same probability
    layer), with the same legend entry."""
    viewer.add_image(he_image[:256, :256], name="H&E", rgb=True)
    stand_in(monkeypatch, Dark("nuclei", mpp=None))
    w = predict_widget(viewer, tmp_path)
    w.slide_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    live, live_prob = viewer.layers["nuclei"], viewer.layers["nuclei probability"]
    [store] = list((tmp_path / "pred").glob("*.zarr"))
    opened = {layer.name: layer for layer in viewer.open(str(store), plugin="napari-genselfdiff")}
    labels = next(v for k, v in opened.items() if k.startswith("nuclei") and "probability" not in k)
    prob = next(v for k, v in opened.items() if "probability" in k)
    qtbot.waitUntil(lambda: labels.contour == live.contour == 2, timeout=3000)  # outlined once added
    assert labels.opacity == pytest.approx(live.opacity)
    for i in (1, 7, 123):
        np.testing.assert_allclose(labels.colormap.map(i), live.colormap.map(i))
    assert labels.metadata["genselfdiff_legend"] == live.metadata["genselfdiff_legend"]
    assert prob.colormap.name == live_prob.colormap.name and prob.blending == live_prob.blending
