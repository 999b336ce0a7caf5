"""A slide level at another um/px than the model's is resampled to the model's grid and back
(slide/rescale.py): tiling still cannot change the answer, the result is the image path's
(resample the whole image, predict, resample back), and sizes given in model pixels (tiles,
overlaps, post-processing areas and lengths) become level pixels."""
import numpy as np
import pytest

from napari_genselfdiff.bundled import resolve_model
from napari_genselfdiff.core.data import read_image
from napari_genselfdiff.core.eval.postprocess import postprocess
from napari_genselfdiff.core.inference import TorchPredictor, predict_image
from napari_genselfdiff.core.resolution import resize_image, resize_probabilities
from napari_genselfdiff.slide.consistency import image_slide
from napari_genselfdiff.slide.fov import FieldOfViewPredictor
from napari_genselfdiff.slide.rescale import LevelScale
from napari_genselfdiff.slide.tiler import predict_slide
from napari_genselfdiff.slide.store import PredictionStore


class _Local:
    """A predictor whose output at a pixel depends on that pixel alone (its red value), with a
    pixel size and a tile multiple: the resampling's geometry is all a difference can come from."""

    num_classes = 2
    tile_multiple = 8

    def __init__(self, mpp: float) -> None:
        self.mpp = mpp
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls.append(tiles.shape)
        p = tiles[..., 0].astype(np.float32) / 255.0
        return np.stack([1.0 - p, p], axis=1)


def test_level_scale_converts_model_pixels_to_level_pixels():
    s = LevelScale(0.5, 8)
    assert s.needed and s.level_length(256) == 512 and s.level_length(176) == 352 and s.level_length(0) == 0
    assert LevelScale(1.0 / 1.24, 8).level_length(768) == 960  # 768 / 0.806 = 952.3, up to a multiple of 8
    opts = s.level_options({"min_size": 400, "grow": 3, "min_distance": 4, "threshold": 0.6, "fill_holes": True})
    assert opts == {"min_size": 1600, "grow": 6, "min_distance": 8, "threshold": 0.6, "fill_holes": True}
    assert LevelScale(2.0, 8).level_options({"min_size": 2})["min_size"] == 1  # never below 1
    assert not LevelScale().needed and LevelScale().level_options({"min_size": 5}) == {"min_size": 5}


def test_level_scale_of_a_slide_level():
    img = np.zeros((100, 120, 3), np.uint8)
    assert LevelScale.of(image_slide(img, mpp=0.25), 0, _Local(0.5)).factor == 0.5
    assert LevelScale.of(image_slide(img, mpp=0.51), 0, _Local(0.5)).factor == 1.0  # within 5 %: as it is
    assert LevelScale.of(image_slide(img, mpp=None), 0, _Local(0.5)).factor == 1.0  # unknown: the model's own
    assert LevelScale.of(image_slide(img, mpp=0.25), 0, _Local(0.5)).shape == (100, 120)


@pytest.mark.parametrize("level_mpp", [0.25, 0.4, 0.62, 0.8])
def test_resampled_tiles_give_the_same_answer_whatever_the_tiling(level_mpp):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    noise = gaussian_filter(rng.normal(size=(301, 437, 3)), (6, 6, 0))  # tissue-like: smooth at the pixel scale
    img = np.clip(128 + noise / noise.std() * 50, 0, 255).astype(np.uint8)  # odd sizes: both ends of both axes
    pred = _Local(0.5)
    slide = image_slide(img, mpp=level_mpp)
    f = level_mpp / 0.5
    outs = []
    for tile in (64, 96, 256):
        fov = FieldOfViewPredictor(pred, slide, 0, tile=tile, overlap=32, tissue=False)
        pred.calls.clear()
        outs.append(fov.predict_region(0, 0, 0, *img.shape[:2]))
        # the model saw windows on its own grid: about f x the level's tile, a multiple of 8
        scale, g = fov.scale(0), fov.grid(0)
        want = (scale.window(g.tile, 0), scale.window(g.tile, 1))
        assert pred.calls and all(c[1:3] == want for c in pred.calls)
        assert want[0] % 8 == 0 and abs(want[0] - min(g.tile * f, 301 * f)) <= 3 * 8
    for o in outs[1:]:
        assert np.abs(o - outs[0]).max() < 1e-4
    # and the way back lands on the image: a pointwise model gives the (smoothed) image itself
    expect = resize_probabilities(pred(resize_image(img, (round(301 * f), round(437 * f)))[None])[0], (301, 437))
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert np.abs(outs[0][inner] - expect[inner]).mean() < 0.01


@pytest.mark.parametrize("model,folder,mpp", [("glands", "glas/train/images", 0.62),
                                              ("glands", "glas/train/images", 1.5),
                                              ("nuclei", "monuseg/train/images", 0.25)])
def test_a_bundled_model_on_a_level_at_another_resolution(one_torch_thread, shared_data, model, folder, mpp):
    """Real tissue: tiling changes no probability by more than 0.02, and the result is the image
    path's (the whole image resampled, predicted and resampled back) up to the edges."""
    predictor = TorchPredictor.from_checkpoint(resolve_model(model), device="cpu")
    img = read_image(sorted((shared_data / folder).iterdir())[0])[:520, :520]
    slide = image_slide(img, mpp=mpp)
    assert LevelScale.of(slide, 0, predictor).needed
    h, w = img.shape[:2]
    a, b = (FieldOfViewPredictor(predictor, slide, 0, tile=t, overlap=predictor.overlap, tissue=False)
            .predict_region(0, 0, 0, h, w) for t in (256, 512))
    assert np.abs(a - b).max() <= 0.02
    f = mpp / predictor.mpp
    whole = resize_probabilities(predict_image(predictor, resize_image(img, (round(h * f), round(w * f)))), (h, w))
    inner = (slice(None), slice(32, -32), slice(32, -32))
    assert np.abs(b[inner] - whole[inner]).mean() < 0.01
    fa, fb = b[1] > 0.5, whole[1] > 0.5
    assert fa.sum() > 0.02 * fa.size and 2 * (fa & fb).sum() / (fa.sum() + fb.sum()) > 0.97


def test_a_resampled_slide_labels_objects_at_the_models_sizes(one_torch_thread, tmp_path, glas_dir):
    """The whole-slide path on a level at half the model's pixel size: the store records the
    factor, the labels use the model's options in level pixels (recorded as the model's), and its
    objects are the image path's."""
    predictor = TorchPredictor.from_checkpoint(resolve_model("glands"), device="cpu")
    img = read_image(sorted(glas_dir.glob("images/*"))[0])
    slide = image_slide(img, mpp=0.62)
    out = tmp_path / "p.zarr"
    opts = dict(predictor.postprocess_options)
    for _ in predict_slide(predictor, slide, out, tile=256, overlap=predictor.overlap, tissue=False,
                           postprocess="glands", postprocess_options=opts, label_alongside=False):
        pass
    store = PredictionStore.open(out)
    assert store.settings["resample"] == pytest.approx(0.5)
    assert store.settings["tile"] == 256  # as asked, in model pixels
    labels = np.asarray(store.labels("glands")[...])
    assert store.label_options("glands")["min_size"] == opts["min_size"]  # recorded in the model's pixels
    h, w = img.shape[:2]
    small = resize_image(img, (round(h * 0.5), round(w * 0.5)))
    _, ref = postprocess(predict_image(predictor, small), "glands", opts)
    n_slide, n_ref = len(np.unique(labels)) - 1, int(ref.max())
    assert n_ref >= 3 and abs(n_slide - n_ref) <= max(1, 0.15 * n_ref), (n_slide, n_ref)
    # min_size in level pixels is 4x the model's: no object smaller than that survived
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes[sizes > 0].min() >= 4 * opts["min_size"]


def test_predict_says_the_level_is_resampled():
    from napari_genselfdiff.cli.predict import _resolution

    img = np.zeros((64, 64, 3), np.uint8)
    note = _resolution(image_slide(img, mpp=1.0, name="s.tif"), None, _Local(1.24), "auto")
    assert note == "s.tif: the model learned 1.24 um/px; level 0 (1 um/px) is resampled x0.806 to it"
    assert _resolution(image_slide(img, mpp=1.22, name="s.tif"), None, _Local(1.24), "auto") is None  # within 5 %
