"""Does a glands result look like glandular tissue? The one check the demo, ``genselfdiff predict`` and
the napari Predict widget run on the glands model's output before showing it.

A glands model learned colon glands (GlaS). On tissue without glands (the bundled skin sample) the
previous bundled model (two classes, 2026-12-01) labelled nearly all of the tissue "gland", unsure of
it: one object spanning epidermis and dermis alike. (The one after it outlined the epidermis, 33 % of
the tissue, 49 % of it at p >= 0.8; the current one, 2026-12-07, five pieces of it, 8 % of the tissue, 58 %
at p >= 0.8: epithelium, which nothing below tells from glands; benchmarks/RESULTS.md.) Glandular tissue never looks
like that: glands are separate structures with stroma
between them. :func:`check_glands` says "no glands here" when, over a field large enough to judge,

1. the glands cover at least :data:`MAX_TISSUE_COVERAGE` of the tissue (non-glass pixels), and
2. the model is unsure of them: fewer than :data:`MIN_CONFIDENT` of the gland pixels have
   p >= :data:`CONFIDENT_P` (a view zoomed in on one real gland is covered too, but confidently);

or when one "gland" holds more than :data:`MAX_UNSURE_UM2` of pixels the model is unsure of
(p < :data:`CONFIDENT_P`): more than a whole GlaS field of unsure gland in one object. That is
the skin slide ``cmu_small_region.svs`` (its epidermis one 324,000 um^2 object, 18 % confident,
with dermis around it: glands over only 60 % of the tissue, so rules 1-2 stay silent).

Where the numbers come from (the previous bundled glands model at its 1.24 um/px over the 85 GlaS
training images, ../shared/data/glas/train, each halved from 0.62 um/px; measured 2026-12-01; the two
models since over every other one of them, 2026-12-07: glands over at most 82 % of the tissue, at
least 35 % (the current one: 58 %) of their pixels at p >= 0.8, at most 68,700 um^2 unsure in one
object: inside every bound, none flagged):

* glands cover 10-83 % of the tissue (median 55 %); the skin sample: 94 %. The ground-truth masks
  give the same picture (gland objects up to 89 % of an image, never the whole tissue: stroma
  shows between glands). The bound, 90 %, keeps a margin above 83 %.
* 2-83 % of the gland pixels have p >= 0.8 (median 58 %); the skin sample: 17 %.
* the most unsure gland area in one object (its area times its fraction at p < 0.8): at most
  80,300 um^2 (train_24); the whole-slide skin ``cmu_small_region.svs``: 265,000 um^2. The bound,
  160,000 um^2, is twice the GlaS maximum and about one GlaS field.
* the largest ground-truth gland is 89,415 px = 137,000 um^2 (median 2,990 px = 4,600 um^2, 99th
  percentile 40,000 px = 62,000 um^2), but GlaS fields are only ~480 x 320 um, so big glands are cut
  by the field edge: object size alone would also refuse the skin sample's one "gland" (106,000
  um^2) only with no margin, and is not used.

Pure numpy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import GenSelfDiffWarning

#: A pixel is glass (not tissue) when its grey value is above this or its saturation below
#: ``GLASS_SATURATION``: the same thresholds as ``slide.tissue.is_background`` (core imports nothing
#: from slide), applied per pixel.
GLASS_BRIGHTNESS = 220.0
GLASS_SATURATION = 0.05
#: Glands over this fraction of the tissue leave no stroma between them: not a gland pattern. GlaS:
#: at most 83 % (model output) over its 85 training images.
MAX_TISSUE_COVERAGE = 0.90
#: ... unless the model is sure of them (a view of one gland): gland pixels with p >= CONFIDENT_P.
CONFIDENT_P = 0.8
MIN_CONFIDENT = 0.40
#: One object with more unsure gland pixels (p < CONFIDENT_P) than this, in um^2, is not a gland the
#: model knows: GlaS at most 80,300 over its 85 training images, about one GlaS field = 155,000.
MAX_UNSURE_UM2 = 160_000.0
#: The most unsure gland area in one object over the GlaS training images (train_24), in um^2.
GLAS_MOST_UNSURE_UM2 = 80_300.0
#: Less tissue than this (um^2) is too little to judge: about a third of a GlaS field (~155,000 um^2).
MIN_TISSUE_UM2 = 50_000.0


@dataclass(frozen=True)
class GlandsCheck:
    """The verdict of :func:`check_glands`. ``no_glands`` is True when the result is implausible for
    glands; ``reason`` says why in one line (or why no verdict was reached)."""

    no_glands: bool
    reason: str
    coverage: float = 0.0  # of the tissue by the glands
    confident: float = 1.0  # fraction of the gland pixels with p >= CONFIDENT_P
    tissue_um2: float = 0.0


def tissue_pixels(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-glass pixels of an RGB image (H, W, 3)."""
    rgb = np.asarray(image)[..., :3].astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (hi - lo) / np.maximum(hi, 1.0)
    return (rgb.mean(axis=-1) <= GLASS_BRIGHTNESS) & (saturation >= GLASS_SATURATION)


def on_grid(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``arr`` (H, W, ...) resampled to ``shape`` by nearest pixel (pure indexing)."""
    arr = np.asarray(arr)
    if tuple(arr.shape[:2]) == tuple(shape):
        return arr
    rows = np.minimum((np.arange(shape[0]) + 0.5) * arr.shape[0] / shape[0], arr.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * arr.shape[1] / shape[1], arr.shape[1] - 1).astype(int)
    return arr[rows[:, None], cols[None, :]]


def check_glands(labels: np.ndarray, prob_fg: np.ndarray, image: np.ndarray, mpp: float | None) -> GlandsCheck:
    """Whether a glands result (instance ``labels``, the model's gland probability ``prob_fg``: floats
    in [0, 1] or uint8 as stored) looks like glandular tissue, judged with the ``image`` under it.
    All three cover the same field (the probabilities and the image are resampled to the labels'
    grid when their shapes differ); ``mpp`` is the labels' microns per pixel (None: unknown, taken
    as the model's 1.24, the GlaS resolution halved)."""
    labels = np.asarray(labels)
    shape = labels.shape[:2]
    prob = np.asarray(on_grid(prob_fg, shape))
    prob = prob.astype(np.float32) / 255.0 if prob.dtype == np.uint8 else prob.astype(np.float32)
    tissue = tissue_pixels(on_grid(image, shape))
    area = float(mpp or 1.24) ** 2
    tissue_um2 = float(tissue.sum()) * area
    if tissue_um2 < MIN_TISSUE_UM2:
        return GlandsCheck(False, f"too little tissue to judge ({tissue_um2:,.0f} um^2)", tissue_um2=tissue_um2)
    glands = labels > 0
    if not glands.any():
        return GlandsCheck(False, "no glands found", tissue_um2=tissue_um2)
    coverage = float((glands & tissue).sum()) / float(tissue.sum())
    confident = float((prob[glands] >= CONFIDENT_P).mean())
    unsure = np.bincount(labels[glands & (prob < CONFIDENT_P)].ravel().astype(np.int64))
    unsure_um2 = float(unsure.max(initial=0)) * area
    no = coverage >= MAX_TISSUE_COVERAGE and confident < MIN_CONFIDENT
    if no:
        reason = (f"the glands model labelled {100 * coverage:.0f}% of the tissue as gland, unsure of it "
                  f"({100 * confident:.0f}% at p >= {CONFIDENT_P}): glandular tissue shows stroma between its "
                  f"glands (at most 83% of the tissue in the GlaS training images), so this tissue has no glands "
                  "the model knows (it learned colon glands, GlaS)")
    elif unsure_um2 > MAX_UNSURE_UM2:
        no = True
        reason = (f"one 'gland' holds {unsure_um2 / 1e6:.2f} mm^2 the glands model is unsure of (p < {CONFIDENT_P}), "
                  f"more than a whole GlaS field (at most {GLAS_MOST_UNSURE_UM2 / 1e6:.2f} mm^2 in one gland of the "
                  "GlaS training images): this looks like tissue with no glands the model knows (it learned colon glands, GlaS)")
    else:
        reason = f"glands over {100 * coverage:.0f}% of the tissue, {100 * confident:.0f}% confident"
    return GlandsCheck(no, reason, coverage, confident, tissue_um2)


def warn_no_glands(check: GlandsCheck | None) -> str | None:
    """For the widgets: a :class:`~..errors.GenSelfDiffWarning` (shown as a notification) when a
    glands result does not look like glands, and the reason; None when it does."""
    if check is None or not check.no_glands:
        return None
    warnings.warn(GenSelfDiffWarning(f"no glands here: {check.reason}; no glands layer added"))
    return check.reason
