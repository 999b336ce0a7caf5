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


def _interp_matrix(start: int, n: int, f: float, size: int) -> np.ndarray:
    """(n, size) bilinear interpolation weights: output pixel i (level pixel ``start + i``, centre
    at (start + i + 0.5) * f in mask pixels) from the ``size`` mask pixels along one axis."""
    pos = np.clip((start + np.arange(n) + 0.5) * f - 0.5, 0, size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    t = (pos - lo).astype(np.float32)
    m = np.zeros((n, size), np.float32)
    m[np.arange(n), lo] += 1 - t
    m[np.arange(n), hi] += t
    return m


def tissue_weight(mask: TissueMask, level_downsample: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The coarse tissue mask bilinearly interpolated to the (h, w) region at (y0, x0) of a level:
    1 inside tissue, 0 on glass, a smooth ramp between (no square steps of the coarse cells)."""
    f = level_downsample / mask.downsample
    ry = _interp_matrix(y0, h, f, mask.mask.shape[0])
    rx = _interp_matrix(x0, w, f, mask.mask.shape[1])
    # only the mask rows/columns the region touches
    rows, cols = np.flatnonzero(ry.any(0)), np.flatnonzero(rx.any(0))
    sub = mask.mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    return ry[:, rows[0]:rows[-1] + 1] @ sub @ rx[:, cols[0]:cols[-1] + 1].T


def clear_background(block_probs: np.ndarray, mask: TissueMask, level_downsample: float, y0: int, x0: int,
                     certain: float = 255) -> None:
    """Pixels outside the (dilated) tissue mask become certain background (probability
    ``certain``: 255 in uint8 stores, 1.0 for floats), in place: a model trained on tissue has no
    business calling empty glass a gland. The border follows the bilinearly interpolated mask
    (:func:`tissue_weight` < 0.5), so labels end on a smooth curve, not on the coarse cells' steps."""
    h, w = block_probs.shape[1:]
    outside = tissue_weight(mask, level_downsample, y0, x0, h, w) < 0.5
    if outside.any():
        block_probs[:, outside] = 0
        block_probs[0, outside] = certain
