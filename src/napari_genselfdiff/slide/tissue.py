"""Where the tissue is: a low-resolution tissue mask of a slide, and the one region test.

:func:`detect_tissue` thresholds a slide thumbnail (Otsu on saturation, see
:func:`tissue_from_rgb`); the tiler skips tiles without tissue and clears the glass around it
(:func:`clear_background`). :func:`is_background` is the test for one small RGB region (a
candidate region, a thumbnail window) when no mask is at hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.slide.reader import Slide

#: Regions whose mean grey value is above this, or whose mean saturation is below
#: ``BACKGROUND_SATURATION``, are glass, not tissue.
BACKGROUND_BRIGHTNESS = 220.0
BACKGROUND_SATURATION = 0.05


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask; mask pixel (i, j) covers level-0 pixels
    [i*downsample, (i+1)*downsample) x [j*downsample, (j+1)*downsample)."""

    mask: np.ndarray
    downsample: float

    def any_in(self, y: int, x: int, h: int, w: int, level_downsample: float = 1.0) -> bool:
        """True when the region (in pixels of a level with ``level_downsample``) has tissue."""
        f = level_downsample / self.downsample
        i0, i1 = max(int(math.floor(y * f)), 0), int(math.ceil((y + h) * f))
        j0, j1 = max(int(math.floor(x * f)), 0), int(math.ceil((x + w) * f))
        return bool(self.mask[i0:i1, j0:j1].any())

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def is_background(rgb: np.ndarray) -> bool:
    """True when an RGB region (any shape ending in 3 channels, 0..255) is glass: its mean grey
    value is above ``BACKGROUND_BRIGHTNESS`` or its mean saturation below
    ``BACKGROUND_SATURATION``. An empty region is background."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.size == 0:
        return True
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (hi - lo) / np.maximum(hi, 1.0)
    return bool(rgb.mean() > BACKGROUND_BRIGHTNESS or saturation.mean() < BACKGROUND_SATURATION)


def tissue_from_rgb(rgb: np.ndarray, *, min_saturation: float = 0.05,
                    max_saturation: float = 0.15, margin: int = 2) -> np.ndarray:
    """Tissue mask of a low-resolution RGB image (H, W, 3) uint8.

    Otsu's threshold on HSV saturation, clipped to [min_saturation, max_saturation] so that an
    all-white image finds nothing and an all-tissue image is not split in two; then opening to
    drop specks, hole filling (white gland lumens are inside tissue) and a dilation by
    ``margin`` pixels so tissue borders are never skipped.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    if sat.size == 0:
        return np.zeros(sat.shape, bool)
    thr = float(threshold_otsu(sat)) if np.ptp(sat) > 1e-3 else max_saturation
    thr = min(max(thr, min_saturation), max_saturation)
    mask = sat > thr
    mask = ndi.binary_opening(mask, structure=np.ones((2, 2), bool))
    mask = ndi.binary_fill_holes(mask)
    if margin > 0:
        mask = ndi.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=margin)
    return mask


def detect_tissue(slide: Slide, *, target_downsample: float = 32.0) -> TissueMask:
    """Tissue mask of ``slide`` at about ``target_downsample`` x level 0.

    Reads the coarsest pyramid level not coarser than the target and averages it down further
    with dask where needed, so even a slide without pyramid is only streamed, never held whole.
    """
    ok = [i for i, d in enumerate(slide.downsamples) if d <= target_downsample] or [0]
    level = max(ok, key=lambda i: slide.downsamples[i])
    arr = slide.levels[level]
    factor = max(int(round(target_downsample / slide.downsamples[level])), 1)
    factor = min(factor, max(min(arr.shape[0], arr.shape[1]), 1))
    if factor > 1:
        arr = da.coarsen(np.mean, arr.astype(np.float32), {0: factor, 1: factor}, trim_excess=True)
    try:
        small = np.asarray(arr.compute())
    except Exception as exc:
        raise DataError(f"{slide.path.name}: cannot read level {level} for tissue detection "
                        f"({type(exc).__name__}: {exc})") from exc
    return TissueMask(tissue_from_rgb(small), slide.downsamples[level] * factor)


def clear_background(block_probs: np.ndarray, mask: TissueMask, level_downsample: float, y0: int, x0: int,
                     certain: float = 255) -> None:
    """Pixels outside the (dilated) tissue mask become certain background (probability
    ``certain``: 255 in uint8 stores, 1.0 for floats), in place: a model trained on tissue has no
    business calling empty glass a gland."""
    h, w = block_probs.shape[1:]
    f = level_downsample / mask.downsample
    rows = np.minimum(((y0 + np.arange(h)) * f).astype(np.int64), mask.mask.shape[0] - 1)
    cols = np.minimum(((x0 + np.arange(w)) * f).astype(np.int64), mask.mask.shape[1] - 1)
    outside = ~mask.mask[rows[:, None], cols[None, :]]
    if outside.any():
        block_probs[:, outside] = 0
        block_probs[0, outside] = certain
