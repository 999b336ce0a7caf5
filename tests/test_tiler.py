"""Tiled inference: seamless blending, tissue skipping, resumable zarr output, lazy FOV."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import torch
import zarr
from torch import nn

from napari_genselfdiff.core.errors import DataError, GenSelfDiffError
from napari_genselfdiff.core.eval.postprocess import glands_from_probabilities, nuclei_from_probabilities
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.slide import instances
from napari_genselfdiff.slide.fov import FieldOfViewPredictor
from napari_genselfdiff.slide.reader import open_slide
from napari_genselfdiff.slide.grid import WINDOW_EPS, TileGrid, blend_window, tile_starts
from napari_genselfdiff.slide.tiler import Predictor, SlideSettings, block_size_for, plan_slide, predict_block, predict_slide
from napari_genselfdiff.slide.store import PredictionStore
from napari_genselfdiff.slide.tissue import TissueMask, detect_tissue, is_background, tissue_weight

REPO = Path(__file__).resolve().parents[1]
TILE, OVERLAP, BLOCK = 128, 32, 256  # -> stride 96, output blocks of 3 * 96 = 288 pixels


def _make_test_slide():
    spec = importlib.util.spec_from_file_location("make_test_slide", REPO / "scripts" / "make_test_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_test_slide


class PixelPredictor:
    """Dark (stained) pixels are foreground, plus 10 % of the tile's mean darkness, so that
    overlapping tiles disagree and every blending or bookkeeping error shows. Counts its work."""

    num_classes = 2
    tile_multiple = 1

    def __init__(self, mpp: float | None = None) -> None:
        self.mpp = mpp
        self.calls = 0
        self.tiles = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.tiles += len(tiles)
        dark = 1.0 - tiles.astype(np.float32).mean(axis=-1) / 255.0
        fg = 0.9 * np.clip((dark - 0.3) * 4.0, 0.0, 1.0) + 0.1 * dark.mean(axis=(1, 2), keepdims=True)
        return np.stack([1.0 - fg, fg], axis=1).astype(np.float32)


class TorchPredictor:
    """A small torch CNN with fixed random weights, softmax over 2 classes."""

    num_classes = 2
    mpp = None

    def __init__(self, net: nn.Module, multiple: int) -> None:
        self.net, self.tile_multiple = net.eval(), multiple

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.net(x).softmax(dim=1).numpy()


def shallow_cnn() -> nn.Module:
    """Three 3x3 convolutions: receptive-field radius 3 pixels."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))


def deep_cnn() -> nn.Module:
    """Two poolings, convolutions at 1/4 scale, upsampling: receptive-field radius ~20 px."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=4), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 2, 3, padding=1))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.5)
    return net


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    """1024 x 1024 pyramidal test slide (synthetic tissue + white glass, lossless tiles)."""
    out = tmp_path_factory.mktemp("tiler") / "slide.tif"
    return _make_test_slide()(out, 1024, tile=256, mpp=0.5, source=None, compression="zlib")


@pytest.fixture(scope="module")
def reference_store(slide_path, tmp_path_factory) -> Path:
    """An uninterrupted run without tissue skipping (shared by several tests)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    list(predict_slide(PixelPredictor(), slide_path, out, tile=TILE, overlap=OVERLAP,
                       block=BLOCK, tissue=False))
    return out


# ------------------------------------------------------------------------------- geometry


def test_tile_starts_cover_the_axis_and_end_on_the_border():
    assert tile_starts(1000, 256, 224) == (0, 224, 448, 672, 744)
    assert tile_starts(256, 256, 224) == (0,)
    assert tile_starts(100, 256, 224) == (0,)
    assert block_size_for(128, 32, 256) == 288
    assert block_size_for(512, 64, 100) == 896  # at least one tile: ceil(512 / 448) strides


def test_blend_window_is_positive_flat_inside_and_eps_at_edges():
    w = blend_window(128, 32)
    assert w.dtype == np.float32 and (w > 0).all()
    np.testing.assert_allclose(w, w.T)
    row = w[64]
    assert row[0] == pytest.approx(WINDOW_EPS, rel=1e-3)   # distance 0.5 <= overlap / 4
    assert row[7] == pytest.approx(WINDOW_EPS, rel=1e-3)   # distance 7.5 <= 8
    # distance 15.5: ramp position (15.5 - 8) / 16, weight 0.5 * (1 - cos(pi * 7.5 / 16)) = 0.45099
    assert row[15] == pytest.approx(0.45099, abs=1e-4)
    assert row[24] == pytest.approx(1.0)                   # distance 24.5 >= 3 * overlap / 4
    assert (np.diff(row[:64]) >= 0).all()
    assert (blend_window(64, 0) == 1).all()


# ------------------------------------------------------------------------------- seams


@pytest.fixture(scope="module")
def image_700x900(tmp_path_factory, slide_path) -> tuple[Path, np.ndarray]:
    with open_slide(slide_path) as slide:
        img = slide.read_region(0, 100, 50, 704, 896)
    path = tmp_path_factory.mktemp("img") / "crop.png"
    skimage.io.imsave(path, img, check_contrast=False)
    return path, img


def _seam_error(predictor, image_path, img, overlap: int) -> tuple[float, float]:
    untiled = predictor(img[None])[0]
    with open_slide(image_path) as slide:
        fov = FieldOfViewPredictor(predictor, slide, 0, tile=TILE, overlap=overlap, tissue=False)
        tiled = fov.predict_region(0, 0, 0, *img.shape[:2])
        assert fov.tiles_computed >= 40  # really tiled: >= 6 x 7 tiles
    diff = np.abs(tiled - untiled)
    return float(diff.max()), float(diff.mean())


def test_tiled_equals_untiled_for_receptive_field_within_overlap(image_700x900):
    path, img = image_700x900
    pred = TorchPredictor(shallow_cnn(), 1)
    err, _ = _seam_error(pred, path, img, OVERLAP)   # radius 3 <= overlap / 4 = 8
    err_no_overlap, _ = _seam_error(pred, path, img, 0)
    print(f"shallow CNN max |tiled - untiled|: overlap 32 {err:.2e}, overlap 0 {err_no_overlap:.2e}")
    assert err < 1e-5
    assert err_no_overlap > 1e-3, "without overlap the tile borders must show (test sanity)"


def test_deep_model_seams_shrink_with_overlap(image_700x900):
    path, img = image_700x900
    pred = TorchPredictor(deep_cnn(), 4)
    max0, mean0 = _seam_error(pred, path, img, 0)
    max32, mean32 = _seam_error(pred, path, img, 32)   # radius ~20 > overlap / 4: approximate
    max64, _ = _seam_error(pred, path, img, 64)        # radius < overlap / 4 = 16 + pooling slack
    print(f"deep CNN max |tiled - untiled|: overlap 0 {max0:.3f} (mean {mean0:.1e}), "
          f"32 {max32:.3f} (mean {mean32:.1e}), 64 {max64:.1e}")
    assert mean32 < mean0 / 10
    assert max64 < 1e-4


# ------------------------------------------------------------------------------- predict_slide


def test_store_layout_attributes_and_agreement_with_field_of_view(slide_path, reference_store):
    group = zarr.open_group(reference_store, mode="r")
    probs = group["probabilities"]
    assert probs.shape == (2, 1024, 1024) and probs.dtype == np.uint8
    assert probs.chunks == (1, 288, 288)
    assert np.asarray(group["done"][...]).all()
    meta = dict(group.attrs)["genselfdiff"]
    assert meta["status"] == "complete"
    assert meta["settings"]["tile"] == TILE and meta["settings"]["block"] == 288
    assert meta["class_names"] == ["background", "class_1"]
    assert meta["mpp"] == pytest.approx(0.5) and meta["downsample"] == 1.0
    stored = np.asarray(probs[...]).astype(np.int16)
    assert np.abs(stored.sum(axis=0) - 255).max() <= 1
    with open_slide(slide_path) as slide:
        fov = FieldOfViewPredictor(PixelPredictor(), slide, 0, tile=TILE, overlap=OVERLAP, tissue=False)
        region = fov.predict_region(0, 0, 0, 1024, 1024)
    # same tiles, windows and blend; the FOV result is float32, the store rounds float64
    diff = np.abs(stored - np.rint(region * 255).astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


def test_tissue_skipping_computes_fewer_tiles_and_keeps_tissue_tiles(slide_path, reference_store, tmp_path):
    counting = PixelPredictor()
    events = list(predict_slide(counting, slide_path, tmp_path / "t.zarr", tile=TILE, overlap=OVERLAP,
                                block=BLOCK, tissue=True, batch=4))
    grid = TileGrid.make(1024, 1024, TILE, OVERLAP)
    assert events[-1].phase == "done"
    assert counting.tiles == events[-1].tiles_computed
    assert events[-1].tiles_computed + events[-1].tiles_skipped == grid.count
    assert counting.tiles < 0.8 * grid.count, "the white glass must be skipped"
    with open_slide(slide_path) as slide:
        mask = detect_tissue(slide)
        img = slide.levels[0].compute()
    skipped_cover = np.zeros((1024, 1024), bool)
    n_skipped = 0
    for tid in grid.touching(0, 1024, 0, 1024):
        ty, tx = grid.origin(tid)
        if not mask.any_in(ty, tx, TILE, TILE):
            skipped_cover[ty:ty + TILE, tx:tx + TILE] = True
            n_skipped += 1
    assert n_skipped == grid.count - counting.tiles
    assert img[skipped_cover].min() == 255, "only glass may lie under skipped tiles"
    with_skip = np.asarray(zarr.open_group(tmp_path / "t.zarr", mode="r")["probabilities"][...])
    without = np.asarray(zarr.open_group(reference_store, mode="r")["probabilities"][...])
    # pixels inside the (dilated) tissue mask keep the model's answer; glass outside it is background
    tissue_px = tissue_weight(mask, 1.0, 0, 0, 1024, 1024) >= 0.5
    keep = ~skipped_cover & tissue_px
    assert keep.any() and (~tissue_px).any()
    np.testing.assert_array_equal(with_skip[:, keep], without[:, keep])
    assert (with_skip[0][~tissue_px] == 255).all() and (with_skip[1:][:, ~tissue_px] == 0).all()
    only_skipped = skipped_cover.copy()
    for tid in grid.touching(0, 1024, 0, 1024):
        ty, tx = grid.origin(tid)
        if mask.any_in(ty, tx, TILE, TILE):
            only_skipped[ty:ty + TILE, tx:tx + TILE] = False
    assert only_skipped.any() and (with_skip[0][only_skipped] == 255).all()


def test_interrupted_run_resumes_without_recomputing_finished_blocks(slide_path, reference_store, tmp_path):
    out = tmp_path / "r.zarr"
    gen = predict_slide(PixelPredictor(), slide_path, out, tile=TILE, overlap=OVERLAP, block=BLOCK,
                        tissue=False)
    for event in gen:
        if event.blocks_done == 5:
            break
    gen.close()
    group = zarr.open_group(out, mode="r")
    done = np.asarray(group["done"][...]).astype(bool)
    assert done.sum() == 5 and dict(group.attrs)["genselfdiff"]["status"] == "predicting"
    # expected work of the second run: every tile touching an unfinished block, once
    grid, b = TileGrid.make(1024, 1024, TILE, OVERLAP), 288
    todo = {t for r, c in zip(*np.nonzero(~done))
            for t in grid.touching(r * b, min(r * b + b, 1024), c * b, min(c * b + b, 1024))}
    counting = PixelPredictor()
    events = list(predict_slide(counting, slide_path, out, tile=TILE, overlap=OVERLAP, block=BLOCK,
                                tissue=False))
    assert counting.tiles == len(todo) < grid.count
    assert events[0].step > 0 and events[-1].step == events[-1].total == grid.count
    resumed = np.asarray(zarr.open_group(out, mode="r")["probabilities"][...])
    reference = np.asarray(zarr.open_group(reference_store, mode="r")["probabilities"][...])
    np.testing.assert_array_equal(resumed, reference)
    # a finished store resumes to nothing
    again = PixelPredictor()
    list(predict_slide(again, slide_path, out, tile=TILE, overlap=OVERLAP, block=BLOCK, tissue=False))
    assert again.tiles == 0


def test_reads_stay_within_one_block_and_halo(slide_path, tmp_path):
    with open_slide(slide_path) as slide:
        areas = []
        original = slide.read_region

        def spy(level, y, x, h, w):
            areas.append(h * w)
            return original(level, y, x, h, w)

        slide.read_region = spy
        list(predict_slide(PixelPredictor(), slide, tmp_path / "m.zarr", tile=TILE, overlap=OVERLAP,
                           block=BLOCK, tissue=False))
    assert max(areas) <= (288 + TILE) ** 2
    assert sum(areas) <= 1.5 * 1024 * 1024


def test_auto_level_from_model_mpp_and_metadata(slide_path, tmp_path):
    (tmp_path / "a.zarr").mkdir()  # an existing empty folder is fine
    list(predict_slide(PixelPredictor(mpp=1.0), slide_path, tmp_path / "a.zarr", level="auto",
                       tile=TILE, overlap=OVERLAP, block=BLOCK, class_names=["bg", "tissue"],
                       metadata={"model": "pixel"}))
    group = zarr.open_group(tmp_path / "a.zarr", mode="r")
    meta = dict(group.attrs)["genselfdiff"]
    assert meta["settings"]["level"] == 1 and meta["downsample"] == 2.0
    assert meta["mpp"] == pytest.approx(1.0) and meta["slide_mpp"] == pytest.approx(0.5)
    assert meta["class_names"] == ["bg", "tissue"] and meta["metadata"] == {"model": "pixel"}
    assert group["probabilities"].shape == (2, 512, 512)
    assert "tissue" in group


def test_prediction_store_reads_what_predict_slide_wrote(slide_path, tmp_path):
    out = tmp_path / "p.zarr"
    list(predict_slide(PixelPredictor(mpp=1.0), slide_path, out, level="auto", tile=TILE, overlap=OVERLAP,
                       block=BLOCK, postprocess="glands", min_size=30))
    store = PredictionStore.open(out)
    assert store.status == "complete" and store.level == 1 and store.downsample == 2.0
    assert store.mpp == pytest.approx(1.0) and store.class_names == ["background", "class_1"]
    assert store.label_names() == ["glands"] and store.labels_complete("glands")
    levels = store.label_levels("glands")
    assert levels[0].shape == (512, 512) and [lv.shape for lv in levels[1:]] == [(256, 256)]
    fg = store.foreground()
    np.testing.assert_allclose(fg[10:20, 30:40], 1 - np.asarray(store.probabilities[0, 10:20, 30:40]) / 255.0)
    assert store.foreground_dask().shape == (512, 512)
    full = store.labels_at_level0("glands", (1024, 1024))
    np.testing.assert_array_equal(full[::2, ::2], np.asarray(store.labels("glands")))
    with pytest.raises(DataError, match="no such prediction store"):
        PredictionStore.open(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(DataError, match="not a genselfdiff prediction store"):
        PredictionStore.open(tmp_path / "plain.zarr")


def test_is_background_is_glass_by_brightness_or_saturation():
    assert is_background(np.full((8, 8, 3), 240, np.uint8))  # bright
    assert is_background(np.full((8, 8, 3), 100, np.uint8))  # grey: no saturation
    assert is_background(np.zeros((0, 0, 3), np.uint8))
    pink = np.zeros((8, 8, 3), np.uint8) + np.array([200, 120, 170], np.uint8)
    assert not is_background(pink)


def test_other_settings_on_existing_store_are_refused_unless_overwrite(slide_path, tmp_path):
    out = tmp_path / "s.zarr"
    list(predict_slide(PixelPredictor(), slide_path, out, tile=TILE, overlap=OVERLAP, block=BLOCK))
    with pytest.raises(DataError, match="other settings"):
        list(predict_slide(PixelPredictor(), slide_path, out, tile=TILE, overlap=16, block=BLOCK))
    counting = PixelPredictor()
    list(predict_slide(counting, slide_path, out, tile=TILE, overlap=16, block=BLOCK, overwrite=True,
                       tissue=False))
    assert counting.tiles > 0
    assert dict(zarr.open_group(out, mode="r").attrs)["genselfdiff"]["settings"]["overlap"] == 16
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a zarr store"):
        list(predict_slide(PixelPredictor(), slide_path, precious, tile=TILE, overwrite=True))
    assert (precious / "notes.txt").read_text() == "keep me"


def test_bad_predictor_output_and_tile_size_are_reported(slide_path, tmp_path):
    class Wrong(PixelPredictor):
        def __call__(self, tiles):
            return super().__call__(tiles)[:, :, :-1]

    with pytest.raises(GenSelfDiffError, match="predictor returned shape"):
        list(predict_slide(Wrong(), slide_path, tmp_path / "w.zarr", tile=TILE, overlap=OVERLAP))
    eight = PixelPredictor()
    eight.tile_multiple = 8
    with pytest.raises(GenSelfDiffError, match="multiple of 8"):
        list(predict_slide(eight, slide_path, tmp_path / "w2.zarr", tile=100, overlap=OVERLAP))
    assert isinstance(PixelPredictor(), Predictor)


def test_glands_postprocess_matches_one_piece_labelling(slide_path, tmp_path):
    out = tmp_path / "g.zarr"
    list(predict_slide(PixelPredictor(), slide_path, out, tile=TILE, overlap=OVERLAP, block=BLOCK,
                       postprocess="glands", min_size=30))
    group = zarr.open_group(out, mode="r")
    labels = np.asarray(group["labels/glands/0"][...])
    reference = glands_from_probabilities(np.asarray(group["probabilities"][1]), min_size=30)
    report = instances.compare_partitions(reference, labels)
    assert report.identical and report.n_labels == reference.max() > 20
    np.testing.assert_array_equal(group["labels/glands/1"][...], labels[::2, ::2])
    attrs = dict(group["labels/glands"].attrs)
    assert attrs["complete"] and attrs["count"] == reference.max()
    assert [d["path"] for d in attrs["multiscales"][0]["datasets"]] == ["0", "1", "2"]


def test_nuclei_postprocess_matches_one_piece_labelling(slide_path, tmp_path):
    out = tmp_path / "n.zarr"
    list(predict_slide(PixelPredictor(), slide_path, out, tile=TILE, overlap=OVERLAP, block=BLOCK,
                       postprocess="nuclei", min_size=4, postprocess_options={"halo": 48}))
    group = zarr.open_group(out, mode="r")
    labels = np.asarray(group["labels/nuclei/0"][...])
    reference = nuclei_from_probabilities(np.asarray(group["probabilities"][1]), min_size=4)
    report = instances.compare_partitions(reference, labels)
    assert report.identical and report.n_reference > 100
    assert dict(group["labels/nuclei"].attrs)["truncated"] == 0


class DistancePredictor(PixelPredictor):
    """Three nuclei classes (background, nucleus, boundary) and a distance map after them."""

    num_classes, channels = 3, 4
    channel_names = ["background", "nucleus", "boundary", "distance"]

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        two = super().__call__(tiles)
        fg = two[:, 1]
        edge = 0.3 * fg * (1 - fg) * 4
        dist = np.clip(fg - 0.2, 0, 1) ** 2
        return np.stack([two[:, 0], fg - edge, edge, dist], axis=1).astype(np.float32)


def test_a_distance_map_travels_through_the_store_to_the_nuclei_markers(slide_path, tmp_path):
    out = tmp_path / "d.zarr"
    list(predict_slide(DistancePredictor(), slide_path, out, tile=TILE, overlap=OVERLAP, block=BLOCK,
                       class_names=("background", "nucleus", "boundary"), postprocess="nuclei", min_size=4,
                       postprocess_options={"halo": 48, "distance_h": 0.05}))
    store = PredictionStore.open(out)
    probs = np.asarray(store.probabilities[...])
    assert probs.shape[0] == 4 and store.class_names == ["background", "nucleus", "boundary"]
    assert store.meta["settings"]["maps"] == ["distance"]
    labels = np.asarray(zarr.open_group(out, mode="r")["labels/nuclei/0"][...])
    reference = nuclei_from_probabilities(probs[1], probs[2], min_size=4, distance=probs[3], distance_h=0.05)
    report = instances.compare_partitions(reference, labels)
    assert report.identical and report.n_reference > 50
    # the map decided the markers: without it the same classes give other objects
    without = nuclei_from_probabilities(probs[1], probs[2], min_size=4)
    assert not instances.compare_partitions(without, labels).identical


# ------------------------------------------------------------------------------- lazy FOV


def test_field_of_view_cache_and_lazy_dask(slide_path):
    counting = PixelPredictor()
    with open_slide(slide_path) as slide:
        fov = FieldOfViewPredictor(counting, slide, 0, tile=TILE, overlap=OVERLAP, cache_tiles=64,
                                   tissue=False)
        first = fov.predict_region(0, 200, 300, 250, 250)
        n = counting.tiles
        assert n == len(fov.grid(0).touching(200, 450, 300, 550))
        np.testing.assert_array_equal(fov.predict_region(0, 200, 300, 250, 250), first)
        assert counting.tiles == n, "a repeated request must come from the cache"
        fov.predict_region(0, 200, 350, 250, 250)  # pan right by 50 px: only the new column
        assert 0 < counting.tiles - n < n
        # lazy dask at level 1: building it computes nothing; a slice computes its chunks only
        lazy = fov.as_lazy_dask(1, chunk=128)
        before = counting.tiles
        assert lazy.shape == (2, 512, 512) and counting.tiles == before
        part = lazy[:, :100, :100].compute()
        assert counting.tiles - before == len(fov.grid(1).touching(0, 128, 0, 128))
        np.testing.assert_allclose(part, fov.predict_region(1, 0, 0, 100, 100), atol=1e-6)
        # a tiny cache evicts: going back recomputes
        small = FieldOfViewPredictor(counting, slide, 0, tile=TILE, overlap=OVERLAP, cache_tiles=2,
                                     tissue=False)
        small.predict_region(0, 0, 0, 300, 300)
        before = counting.tiles
        small.predict_region(0, 0, 0, 300, 300)
        assert counting.tiles > before


def test_tissue_border_follows_a_smooth_curve_not_the_coarse_cells():
    """A diagonal tissue edge in a coarse (1/32) mask: the cleared border moves about one pixel per
    column, instead of jumping 32 pixels every 32 columns (the square steps seen in napari)."""
    from napari_genselfdiff.slide.tissue import clear_background

    coarse = np.tril(np.ones((16, 16), bool))  # tissue below the diagonal
    mask = TissueMask(coarse, 32.0)
    probs = np.zeros((2, 512, 512), np.float32)
    probs[1] = 1.0  # the model says foreground everywhere
    clear_background(probs, mask, 1.0, 0, 0, certain=1.0)
    fg = probs[1] > 0.5
    first_fg_row = np.argmax(fg, axis=0)[32:480]  # top of the tissue in each column
    jumps = np.abs(np.diff(first_fg_row))
    assert jumps.max() <= 2, jumps.max()
    assert first_fg_row[-1] - first_fg_row[0] > 400  # the edge is still the diagonal
    np.testing.assert_allclose(tissue_weight(mask, 1.0, 0, 0, 512, 512)[400, 100], 1.0)


def test_tile_starts_are_aligned_to_the_model_multiple():
    """A U-Net that halves the resolution 3 times is only shift-equivariant for shifts by 8: every
    tile starts at a multiple of 8 and the last ends where an untiled run's padding ends."""
    assert tile_starts(522, 256, 192, 8) == (0, 192, 272)  # 522 -> 528 = 272 + 256
    assert all(s % 8 == 0 for s in tile_starts(1001, 256, 128, 8))
    assert tile_starts(1000, 256, 224) == (0, 224, 448, 672, 744)  # multiple 1: as before
    with pytest.raises(GenSelfDiffError, match="multiples of 8"):
        TileGrid.make(500, 500, 256, 60, 8)


def test_border_tiles_are_not_tapered_on_the_image_border():
    """The last tile ends on the (padded) image border: its weight there is 1, so the previous
    tile's edge a few pixels inside the image cannot take over the border pixels."""
    from napari_genselfdiff.slide.grid import BlendWindows

    grid = TileGrid.make(522, 774, 256, 128, 8)
    win = BlendWindows(grid)
    last = (len(grid.ys) - 1, len(grid.xs) - 1)
    assert win(last)[-1, -1] == pytest.approx(1.0)
    assert win((0, 0))[0, 0] == pytest.approx(1.0)
    inner = win((1, 1))
    assert inner[0, 128] == pytest.approx(WINDOW_EPS, rel=1e-3) and inner[128, 128] == pytest.approx(1.0)


def test_an_image_smaller_than_a_tile_gets_tiles_of_its_short_side():
    """A GlaS tile at the gland model's resolution is ~215 px high: 256-px tiles would reach past
    the padding an untiled run sees; the grid uses tiles of the padded short side instead."""
    grid = TileGrid.make(215, 388, 256, 152, 8)
    assert grid.tile == 216 and grid.overlap == 152 and grid.ys == (0,)
    assert grid.xs[-1] + grid.tile == 392 and all(x % 8 == 0 for x in grid.xs)
    assert TileGrid.make(100, 100, 256, 64, 1).tile == 256  # models without a multiple: as before


# ``tiler.predict_block``, the pure one-block function the cluster driver runs as a task: block by
# block on its own, it stores exactly what ``predict_slide`` stores (no cluster needed here).

@pytest.fixture(scope="module")
def block_slide_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("blocks") / "slide.tif"
    return _make_test_slide()(out, 448, tile=128, mpp=0.5, source=None, compression="zlib", seed=3)


@pytest.mark.parametrize("tissue", [False, True])
def test_blocks_on_their_own_store_what_predict_slide_stores(block_slide_path, tmp_path, tissue):
    kw = dict(tile=96, overlap=32, block=128, tissue=tissue)
    drain(predict_slide(PixelPredictor(), block_slide_path, tmp_path / "ref.zarr", **kw))
    ref = np.asarray(PredictionStore.open(tmp_path / "ref.zarr").probabilities)
    with open_slide(block_slide_path) as slide:
        plan = plan_slide(PixelPredictor(), slide, tmp_path / "blocks.zarr", SlideSettings(**kw))
        mask = detect_tissue(slide) if tissue else None
        assert (plan.blocks.ny, plan.blocks.nx) == (4, 4)  # 448 px in 128-px blocks: the last one short
        got = np.zeros_like(ref)
        for b in [(r, c) for r in range(plan.blocks.ny) for c in range(plan.blocks.nx)][::-1]:  # any order
            y0, y1, x0, x1 = plan.blocks.region(b)
            got[:, y0:y1, x0:x1] = predict_block(PixelPredictor(), slide, plan.level, plan.grid, plan.blocks, b,
                                                 tissue=mask, batch=3)
    np.testing.assert_array_equal(got, ref)
    assert plan.store.settings == PredictionStore.open(tmp_path / "ref.zarr").settings  # either resumes the other


def test_one_block_of_accumulators_at_a_time(slide_path, tmp_path, monkeypatch):
    """When a block's float64 accumulators are allocated the previous block's are already freed
    (on the 16k slide they are 83 MB a block; two at once were the prediction's traced peak)."""
    import weakref

    from napari_genselfdiff.slide import tiler

    alive: list[weakref.ref] = []
    overlaps = []

    class Numpy:  # numpy, with zeros watched
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def zeros(shape, dtype=float, **kw):
            arr = np.zeros(shape, dtype, **kw)
            if np.dtype(dtype) == np.float64 and len(shape) == 3:  # a block's class sums
                overlaps.append(sum(r() is not None for r in alive))
                alive.append(weakref.ref(arr))
            return arr

    monkeypatch.setattr(tiler, "np", Numpy())
    list(predict_slide(PixelPredictor(), slide_path, tmp_path / "one.zarr", tile=TILE, overlap=OVERLAP,
                       block=BLOCK, tissue=False))
    assert len(overlaps) >= 9  # a 1024-px slide in 288-px blocks
    assert max(overlaps) == 0, overlaps
