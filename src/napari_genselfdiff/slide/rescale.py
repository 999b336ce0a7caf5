"""A model run at the microns per pixel it learned on a pyramid level at another pixel size.

A slide rarely has a level at exactly the model's resolution: the bundled gland model learned
1.24 um/px and a 20x slide's levels are 0.5, 1, 2 ... um/px; the nuclei model learned 0.5 um/px
and a 40x slide with 4x downsamples has 0.25 and 1. Run on the closest level as it is, the model
sees the tissue 1.24x (glands) or 2x (nuclei) larger or smaller than it learned, and it loses a
large part of its accuracy (benchmarks/RESULTS.md, session 25: nuclei on MoNuSeg at 0.25 um/px,
AJI 0.62 -> 0.37). So the tiler resamples: each tile of the level is resampled to the model's
pixel size, predicted there, and its probabilities are resampled back onto the level's pixels,
where the store, the labels and every overlay stay.

Tiling must not change the answer, so the resampling is anchored on the whole level, not on the
tile: model pixel ``j`` lies at level coordinate ``(j + 0.5) / f - 0.5`` (``f`` model pixels per
level pixel; the convention of ``skimage.transform.resize``), every tile's model window starts
at a multiple of the model's ``multiple`` on that global grid (so the U-Net sees the same pixels
in the same phase whichever tile holds them), shrinking smooths first with a Gaussian of
``sigma = (1/f - 1) / 2`` level pixels (skimage's anti-aliasing) computed from enough margin to be
exact, and the way back samples each level pixel at its global model coordinate. Two tiles
holding a pixel therefore compute it from the same numbers, up to the model's own halo.

Tile sizes, overlaps and post-processing lengths are given in model pixels, as for an image at
the model's resolution; :class:`LevelScale` converts them to the level's pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from napari_genselfdiff.core.resolution import Rescale


@dataclass(frozen=True)
class LevelScale:
    """How a level maps to the model's grid: ``factor`` model pixels per level pixel (1.0: the
    level is at the model's resolution, within :data:`~napari_genselfdiff.core.resolution.TOLERANCE`,
    or a pixel size is unknown), ``multiple`` the model's tile multiple."""

    factor: float = 1.0
    multiple: int = 1
    shape: tuple[int, int] = (0, 0)  # the level's (height, width); 0: unknown (no end handling)

    @classmethod
    def of(cls, slide: Any, level: int, predictor: Any) -> LevelScale:
        mult = int(getattr(predictor, "tile_multiple", 1) or 1)
        shape = tuple(int(v) for v in slide.levels[level].shape[:2])
        return cls(Rescale((1, 1), slide.level_mpp(level), getattr(predictor, "mpp", None)).factor, mult, shape)

    @property
    def needed(self) -> bool:
        return self.factor != 1.0

    def level_length(self, model_px: int) -> int:
        """``model_px`` model pixels in level pixels, rounded up to the multiple (a tile size or an
        overlap given in model pixels)."""
        if not self.needed or model_px <= 0:
            return int(model_px)
        m = self.multiple
        return max(m, int(math.ceil(model_px / self.factor / m)) * m)

    def level_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Post-processing ``options`` written in model pixels, in level pixels (areas by f^2,
        lengths by f; at least 1)."""
        from napari_genselfdiff.core.eval.postprocess import scale_pixel_options

        return scale_pixel_options(options or {}, 1.0 / self.factor) if self.needed else dict(options or {})

    # ---------------------------------------------------------------------------------------
    # the model window of a level tile, one axis at a time (0: rows, 1: columns)

    @property
    def sigma(self) -> float:
        """Gaussian smoothing (level pixels) before shrinking; 0 when the model's grid is finer."""
        return max(0.0, (1.0 / self.factor - 1.0) / 2.0)

    def _model_length(self, axis: int) -> tuple[int, int]:
        """(pixels, padded to the multiple) of the level's axis on the model's grid (0, 0 unknown)."""
        n = self.shape[axis]
        if n <= 0:
            return 0, 0
        px = max(1, int(round(n * self.factor)))
        return px, -(-px // self.multiple) * self.multiple

    def window(self, t: int, axis: int = 0) -> int:
        """Length of the model window of a level tile of side ``t`` along ``axis`` (a multiple of
        the multiple; at most the level's padded length on the model's grid)."""
        m = self.multiple
        w = int(math.ceil((t * self.factor + m + 2) / m)) * m
        padded = self._model_length(axis)[1]
        return min(w, padded) if padded else w

    def start(self, origin: int, t: int, axis: int = 0) -> int:
        """First model pixel (global, a multiple of the multiple) of the window of a tile at level
        ``origin``. Never before the level's first pixel nor past its padded end, so a tile at
        an edge sees it as an untiled run does: the model's own padding at the start, the image
        reflected up to a multiple at the end (``core.inference.predict_padded_batch``)."""
        first = (origin + 0.5) * self.factor - 0.5
        j0 = max(0, int(math.floor(first / self.multiple)) * self.multiple)
        padded = self._model_length(axis)[1]
        return min(j0, max(0, padded - self.window(t, axis))) if padded else j0

    def _coords(self, origin: int, t: int, axis: int) -> np.ndarray:
        """Level coordinates of the model window's pixels (reflected at the level's end on the
        model's grid, as an untiled run pads)."""
        j = self.start(origin, t, axis) + np.arange(self.window(t, axis))
        n = self._model_length(axis)[0]
        if n > 1:
            j = np.where(j >= n, 2 * (n - 1) - j, j)
        return (j + 0.5) / self.factor - 0.5

    def reach(self, origin: int, t: int, axis: int = 0) -> tuple[int, int]:
        """Level pixels [lo, hi) a tile at ``origin`` of side ``t`` reads (its window, the
        smoothing's support and the interpolation's neighbours)."""
        c = self._coords(origin, t, axis)
        pad = int(math.ceil(4.0 * self.sigma)) + 2
        return int(math.floor(c.min())) - pad, int(math.ceil(c.max())) + pad + 1

    def to_model(self, pixels: np.ndarray, top: int, left: int, origins: Sequence[tuple[int, int]],
                 t: int) -> np.ndarray:
        """(B, Wy, Wx, 3) uint8 model windows of the level tiles at ``origins`` (side ``t``), from
        ``pixels`` holding level rows from ``top`` and columns from ``left`` (covering every
        tile's :meth:`reach` inside the level; white beyond its top and left edges, as
        ``Slide.read_region`` gives)."""
        from scipy.ndimage import gaussian_filter1d

        out = np.empty((len(origins), self.window(t, 0), self.window(t, 1), 3), np.uint8)
        for k, (oy, ox) in enumerate(origins):
            (ylo, yhi), (xlo, xhi) = self.reach(oy, t, 0), self.reach(ox, t, 1)
            region = np.ascontiguousarray(_cut(pixels, ylo - top, yhi - top, xlo - left, xhi - left))
            if int(4.0 * self.sigma + 0.5) > 0:  # scipy's radius: 0 taps nothing (sigma < 0.125)
                for axis in (0, 1):
                    region = gaussian_filter1d(region, self.sigma, axis=axis, mode="nearest", truncate=4.0,
                                               output=np.float32)
            ys, xs = self._coords(oy, t, 0) - ylo, self._coords(ox, t, 1) - xlo
            window = _lerp(_lerp(region, ys, 0), xs, 1)  # a convex mix of 0..255: rounding is all it needs
            out[k] = np.add(window, 0.5, out=window)
        return out

    def to_level(self, preds: np.ndarray, origins: Sequence[tuple[int, int]], t: int) -> np.ndarray:
        """(B, C, t, t) probabilities on the level tiles at ``origins`` from the (B, C, Wy, Wx)
        predictions of their model windows (smoothed first where the model's grid is finer)."""
        from scipy.ndimage import gaussian_filter1d

        out = np.empty(preds.shape[:2] + (t, t), np.float32)
        back = max(0.0, (self.factor - 1.0) / 2.0)
        for k, (oy, ox) in enumerate(origins):
            p = preds[k].astype(np.float32, copy=False)
            if int(4.0 * back + 0.5) > 0:
                for axis in (1, 2):
                    p = gaussian_filter1d(p, back, axis=axis, mode="nearest", truncate=4.0)
            ys = (oy + np.arange(t) + 0.5) * self.factor - 0.5 - self.start(oy, t, 0)
            xs = (ox + np.arange(t) + 0.5) * self.factor - 0.5 - self.start(ox, t, 1)
            out[k] = _lerp(_lerp(p, ys, 1), xs, 2)
        return out


def _cut(a: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``a[y0:y1, x0:x1]`` with white (255) where the box reaches outside ``a``."""
    if y0 >= 0 and x0 >= 0 and y1 <= a.shape[0] and x1 <= a.shape[1]:
        return a[y0:y1, x0:x1]
    out = np.full((y1 - y0, x1 - x0) + a.shape[2:], 255, a.dtype)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, a.shape[0]), min(x1, a.shape[1])
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = a[sy0:sy1, sx0:sx1]
    return out


def _lerp(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """``a`` sampled at fractional ``coords`` along ``axis`` (linear; clamped to its ends)."""
    n = a.shape[axis]
    c = np.clip(coords, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    wgt = (c - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = len(coords)
    wgt = wgt.reshape(shape)
    lo = np.take(a, i0, axis=axis).astype(np.float32)
    hi = np.take(a, i1, axis=axis).astype(np.float32)
    hi -= lo
    hi *= wgt
    lo += hi
    return lo
