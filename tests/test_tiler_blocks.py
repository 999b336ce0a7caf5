"""``tiler.predict_block``, the pure one-block function the cluster driver runs as a task: block by
block on its own, it stores exactly what ``predict_slide`` stores (no cluster needed here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.slide.reader import open_slide
from napari_genselfdiff.slide.store import PredictionStore
from napari_genselfdiff.slide.tiler import SlideSettings, plan_slide, predict_block, predict_slide
from napari_genselfdiff.slide.tissue import detect_tissue

REPO = Path(__file__).resolve().parents[1]


def _make_test_slide():
    spec = importlib.util.spec_from_file_location("make_test_slide", REPO / "scripts" / "make_test_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_test_slide


class PixelPredictor:
    """Numpy "model" (as in test_tiler): dark pixels are foreground, plus 10 % of the tile's mean
    darkness, so that overlapping tiles disagree and any blending difference shows."""

    num_classes, tile_multiple, mpp = 2, 1, None

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        dark = 1.0 - tiles.astype(np.float32).mean(axis=-1) / 255.0
        fg = 0.9 * np.clip((dark - 0.3) * 4.0, 0.0, 1.0) + 0.1 * dark.mean(axis=(1, 2), keepdims=True)
        return np.stack([1.0 - fg, fg], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("blocks") / "slide.tif"
    return _make_test_slide()(out, 448, tile=128, mpp=0.5, source=None, compression="zlib", seed=3)


@pytest.mark.parametrize("tissue", [False, True])
def test_blocks_on_their_own_store_what_predict_slide_stores(slide_path, tmp_path, tissue):
    kw = dict(tile=96, overlap=32, block=128, tissue=tissue)
    drain(predict_slide(PixelPredictor(), slide_path, tmp_path / "ref.zarr", **kw))
    ref = np.asarray(PredictionStore.open(tmp_path / "ref.zarr").probabilities)
    with open_slide(slide_path) as slide:
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
