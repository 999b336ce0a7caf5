"""Models run at their own microns per pixel; results come back on the input's grid."""
import numpy as np
import pytest

from napari_genselfdiff.core import resolution as R


class _ScaleProbe:
    """A 'model' whose foreground is a bright pixel's 3x3 neighbourhood *in model pixels*: run at the
    wrong resolution, it finds objects of the wrong size."""

    num_classes = 2
    tile_multiple = 1

    def __init__(self, mpp):
        self.mpp = mpp
        self.seen = []

    def __call__(self, tiles):
        from scipy import ndimage as ndi
        self.seen.append(tiles.shape[1:3])
        fg = np.stack([ndi.maximum_filter(t[..., 0] > 128, size=3) for t in tiles]).astype(np.float32)
        return np.stack([1 - fg, fg], axis=1)


def test_rescale_factor_and_tolerance():
    assert R.Rescale((100, 100), 0.25, 0.5).factor == 0.5
    assert R.Rescale((100, 100), 0.25, 0.5).model_shape == (50, 50)
    assert R.Rescale((100, 100), 0.51, 0.5).factor == 1.0  # within 5 %: not resampled
    assert R.Rescale((100, 100), None, 0.5).factor == 1.0
    assert not R.Rescale((100, 100), 0.62, None).needed


def test_notes_say_what_is_assumed():
    assert "assuming the model's own 0.5 um/px" in R.resolution_note(None, 0.5, "a.png")
    assert "resampled x0.5" in R.resolution_note(0.25, 0.5, "a.png")
    assert R.resolution_note(0.5, 0.5) is None and R.resolution_note(None, None) is None


def test_prediction_runs_at_the_model_resolution_and_returns_the_input_grid():
    img = np.zeros((64, 96, 3), np.uint8)
    img[30:34, 40:44] = 255  # a 4x4 spot at 0.25 um/px = 2x2 at the model's 0.5
    probe = _ScaleProbe(0.5)
    probs, _, _, r = R.segment_at_mpp(probe, img, 0.25, lambda p: (p.argmax(0), p.argmax(0)))
    assert probe.seen == [(32, 48)] and r.factor == 0.5
    assert probs.shape == (2, 64, 96)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    fg = probs[1] > 0.5
    # 2x2 spot dilated by 3x3 in model pixels = 4x4 model px = 8x8 input px (not 6x6 as at native size)
    assert 7 * 7 <= fg.sum() <= 9 * 9


def test_segment_at_mpp_postprocesses_in_model_pixels():
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:14, 10:14] = 255
    img[40:44, 40:44] = 255
    seen = {}

    def post(probs):
        from scipy import ndimage as ndi
        seen["shape"] = probs.shape
        sem = probs.argmax(0)
        return sem, ndi.label(sem)[0]

    probs, sem, inst, r = R.segment_at_mpp(_ScaleProbe(0.5), img, 0.25, post)
    assert seen["shape"] == (2, 32, 32)
    assert probs.shape == (2, 64, 64) and sem.shape == inst.shape == (64, 64)
    assert set(np.unique(inst)) == {0, 1, 2}


@pytest.mark.parametrize("shape,target", [((50, 70), (100, 140)), ((101, 33), (50, 17))])
def test_label_resize_is_nearest_and_keeps_ids(shape, target):
    lab = np.random.default_rng(0).integers(0, 5, shape).astype(np.uint16)
    out = R.resize_labels(lab, target)
    assert out.shape == target and out.dtype == lab.dtype
    assert set(np.unique(out)) <= set(np.unique(lab))


def test_evaluate_with_mpp_equals_rescaling_by_hand(one_torch_thread, glas_dir, tmp_path):
    """`evaluate --mpp 0.62` on GlaS tiles = the Dice of the same tiles rescaled by hand to the gland
    model's 1.24 um/px (within 0.01), and not what running them at their stored scale gives."""
    import shutil

    from napari_genselfdiff.bundled import resolve_model
    from napari_genselfdiff.core.data import TaskSpec, downscale_item, load_labeled_folder
    from napari_genselfdiff.core.eval.evaluation import evaluate_folder, evaluate_items
    from napari_genselfdiff.core.inference import TorchPredictor

    names = sorted(p.name for p in (glas_dir / "images").iterdir())[:4]
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for n in names:
            shutil.copy(glas_dir / sub / n, tmp_path / sub / n)
    predictor = TorchPredictor.from_checkpoint(resolve_model("glands"), device="cpu")
    assert predictor.mpp == pytest.approx(1.24)
    ours = evaluate_folder("glands", tmp_path / "images", tmp_path / "masks", predictor=predictor, mpp=0.62)
    assert any("resampled x0.5" in n for n in ours["resolution"])
    items = [downscale_item(it, 2.0) for it in load_labeled_folder(tmp_path / "images", tmp_path / "masks",
                                                                   TaskSpec.make("glands"))]
    by_hand = evaluate_items(predictor, items, mpp=1.24)
    assert abs(ours["mean"]["dice"] - by_hand["mean"]["dice"]) <= 0.01
    unknown = evaluate_folder("glands", tmp_path / "images", tmp_path / "masks", predictor=predictor)
    assert any("pixel size unknown" in n for n in unknown["resolution"])


def test_cli_predict_says_what_resolution_it_runs_at(one_torch_thread, tmp_path, capsys):
    """A PNG has no pixel size: without --mpp one line says the model's own is assumed; with
    --mpp 0.25 the nuclei model (0.5 um/px) runs on the 2x coarser level and says nothing."""
    from PIL import Image

    from napari_genselfdiff.cli import main
    from napari_genselfdiff.slide.store import PredictionStore

    rng = np.random.default_rng(0)
    img = np.full((512, 512, 3), 230, np.uint8)
    for y, x in rng.integers(20, 492, size=(60, 2)):
        img[y - 6:y + 6, x - 6:x + 6] = (90, 40, 140)  # hematoxylin-ish blobs
    Image.fromarray(img).save(tmp_path / "tile.png")
    assert main(["predict", "--model", "nuclei", "--input", str(tmp_path / "tile.png"), "--out",
                 str(tmp_path / "a.zarr"), "--tile", "128", "--no-tissue", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pixel size unknown" in out and "assuming the model's own 0.5 um/px" in out
    assert PredictionStore.open(tmp_path / "a.zarr").level == 0
    assert main(["predict", "--model", "nuclei", "--input", str(tmp_path / "tile.png"), "--out",
                 str(tmp_path / "b.zarr"), "--tile", "128", "--no-tissue", "--device", "cpu", "--mpp", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "pixel size unknown" not in out
    store = PredictionStore.open(tmp_path / "b.zarr")
    assert store.level == 1 and store.downsample == 2.0


def test_widget_pixel_size_applies_only_when_the_layer_has_none():
    from napari.layers import Image

    from napari_genselfdiff._widgets.slide_layer import layer_slide

    plain = Image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="tile")
    assert layer_slide(plain).mpp is None
    assert layer_slide(plain, 0.25).mpp == 0.25
    read = Image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="svs", metadata={"mpp": 0.499})
    assert layer_slide(read, 0.25).mpp == 0.499  # the file's own pixel size wins
