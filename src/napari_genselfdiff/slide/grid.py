"""The tile grid and the blending of overlapping tiles (shared by :mod:`.tiler` and :mod:`.fov`).

Tiles start at multiples of the model's ``multiple`` and the last one ends where an untiled run's
padding ends; each tile's prediction is weighted by a smooth window (:class:`BlendWindows`) and
the blend divides by the summed weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_genselfdiff.core.errors import GenSelfDiffError

#: Weight of a tile's pixels within overlap / 4 of its edge (strictly positive, so the blend
#: never divides by zero).
WINDOW_EPS = 1e-6

TileId = tuple[int, int]


# --------------------------------------------------------------------------------------------
# geometry


def tile_starts(length: int, tile: int, stride: int, multiple: int = 1) -> tuple[int, ...]:
    """Start offsets of tiles of size ``tile`` covering [0, length) with step ``stride``.

    The axis is first rounded up to the model's ``multiple`` (as an untiled run pads the image,
    reflecting it, to a multiple), and the last tile ends exactly there, so its edge sees the same
    padding as an untiled run. With ``stride`` and ``tile`` multiples of ``multiple`` every start is
    one too: a U-Net that downsamples by ``multiple`` is only shift-equivariant for such shifts.
    An axis shorter than a tile gets one tile at 0 (padded with white beyond the rounded length).
    """
    padded = -(-length // multiple) * multiple
    if padded <= tile:
        return (0,)
    starts = list(range(0, padded - tile, stride))
    starts.append(padded - tile)
    return tuple(starts)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide level: tile (iy, ix) covers [ys[iy], ys[iy]+tile) x [xs[ix], ...)."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    multiple: int = 1

    @classmethod
    def make(cls, height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> TileGrid:
        if tile <= 0 or not 0 <= overlap < tile:
            raise GenSelfDiffError(f"invalid tiling: tile={tile}, overlap={overlap} "
                                   "(need tile > 0 and 0 <= overlap < tile)")
        if tile % multiple or overlap % multiple:
            raise GenSelfDiffError(f"tile {tile} and overlap {overlap} must be multiples of {multiple} for this "
                                   f"model (its U-Net halves the resolution {multiple.bit_length() - 1} times)")
        shortest = min(-(-height // multiple), -(-width // multiple)) * multiple
        if multiple > 1 and shortest < tile:
            # an image smaller than a tile: tiles of its (padded) short side, so no tile reaches
            # past the padding an untiled run sees (white beyond it would change the answer)
            tile = max(shortest, multiple)
            overlap = min(overlap, tile - multiple)
        stride = tile - overlap
        return cls(height, width, tile, overlap, tile_starts(height, tile, stride, multiple),
                   tile_starts(width, tile, stride, multiple), multiple)

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def origin(self, tid: TileId) -> tuple[int, int]:
        return self.ys[tid[0]], self.xs[tid[1]]

    def touching(self, y0: int, y1: int, x0: int, x1: int) -> list[TileId]:
        """Tiles overlapping the region [y0, y1) x [x0, x1), in raster order."""
        iys = [i for i, s in enumerate(self.ys) if s < y1 and s + self.tile > y0]
        ixs = [i for i, s in enumerate(self.xs) if s < x1 and s + self.tile > x0]
        return [(iy, ix) for iy in iys for ix in ixs]

    def cell_area(self, tid: TileId) -> int:
        """Level pixels the tile stands for in progress counts: from its origin to the next
        tile's (to the level's end for the last one), so the cells of all tiles tile the level."""
        def span(starts: tuple[int, ...], i: int, end: int) -> int:
            return max(0, (starts[i + 1] if i + 1 < len(starts) else end) - starts[i])

        return span(self.ys, tid[0], self.height) * span(self.xs, tid[1], self.width)


@dataclass
class Blocks:
    """Output blocks of ``size`` pixels (a multiple of the tile stride) over an (h, w) level: the
    units a slide prediction stores, resumes and labels by (:mod:`.tiler`, :mod:`.labeller`)."""

    h: int
    w: int
    size: int

    @property
    def ny(self) -> int:
        return -(-self.h // self.size)

    @property
    def nx(self) -> int:
        return -(-self.w // self.size)

    def region(self, b: tuple[int, int]) -> tuple[int, int, int, int]:
        y0, x0 = b[0] * self.size, b[1] * self.size
        return y0, min(y0 + self.size, self.h), x0, min(x0 + self.size, self.w)

    def of_point(self, y: int, x: int) -> tuple[int, int]:
        return y // self.size, x // self.size

    def touched(self, ty: int, tx: int, t: int) -> list[tuple[int, int]]:
        r0, c0 = self.of_point(max(ty, 0), max(tx, 0))
        r1, c1 = self.of_point(min(ty + t, self.h) - 1, min(tx + t, self.w) - 1)
        return [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def block_size_for(tile: int, overlap: int, block: int) -> int:
    """Output block size: the multiple of the tile stride closest to ``block``, at least one
    tile (so a tile touches at most two blocks per axis)."""
    stride = tile - overlap
    k = max(int(round(block / stride)), -(-tile // stride), 1)
    return k * stride


def _window_1d(tile: int, overlap: int, eps: float, open_start: bool = False, open_end: bool = False) -> np.ndarray:
    i = np.arange(tile, dtype=np.float64)
    if overlap <= 0:
        return np.ones(tile)
    lo, width = overlap / 4.0, overlap / 2.0
    d_start, d_end = i + 0.5, tile - 1 - i + 0.5
    d = np.minimum(np.where(open_start, np.inf, d_start), np.where(open_end, np.inf, d_end))
    t = np.clip((d - lo) / width, 0.0, 1.0)
    return eps + (1.0 - eps) * 0.5 * (1.0 - np.cos(np.pi * t))


def blend_window(tile: int, overlap: int, eps: float = WINDOW_EPS) -> np.ndarray:
    """Separable (tile, tile) float32 blending weight, strictly positive.

    Per axis, with d the distance of a pixel centre to the nearest tile edge: ``eps`` for
    d <= overlap/4, a raised-cosine ramp from ``eps`` to 1 for overlap/4 < d < 3*overlap/4,
    and 1 beyond. With overlap 0 it is constant 1 (tiles do not overlap).
    """
    w1 = _window_1d(tile, overlap, eps)
    return np.outer(w1, w1).astype(np.float32)


class BlendWindows:
    """The blending window of each tile of ``grid``: :func:`blend_window`, except that a side
    lying on the (padded) image border is not tapered. There the tile sees exactly the padding of
    an untiled run, so its own pixels are right; tapering them would hand the border pixels to the
    neighbouring tile, whose edge (and zero padding) can lie a few pixels inside the image."""

    def __init__(self, grid: TileGrid, eps: float = WINDOW_EPS):
        self.grid, self.eps = grid, eps
        self._cache: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}

    def __call__(self, tid: TileId) -> np.ndarray:
        g = self.grid
        key = (tid[0] == 0, tid[0] == len(g.ys) - 1, tid[1] == 0, tid[1] == len(g.xs) - 1)
        if key not in self._cache:
            wy = _window_1d(g.tile, g.overlap, self.eps, key[0], key[1])
            wx = _window_1d(g.tile, g.overlap, self.eps, key[2], key[3])
            self._cache[key] = np.outer(wy, wx).astype(np.float32)
        return self._cache[key]


def add_tile(sums: np.ndarray, wsum: np.ndarray, oy: int, ox: int,
              pred: np.ndarray, ty: int, tx: int, window: np.ndarray) -> None:
    """Add window-weighted ``pred`` (tile at (ty, tx)) into the region at (oy, ox), in place.

    The accumulators are float64 so that the sum hardly depends on the order in which tiles
    arrive: a resumed run (which adds some tiles in another order) stores the same uint8
    probabilities as an uninterrupted one.
    """
    t = window.shape[0]
    y0, y1 = max(ty, oy), min(ty + t, oy + wsum.shape[0])
    x0, x1 = max(tx, ox), min(tx + t, ox + wsum.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    w = window[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
    sums[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox] += pred[:, y0 - ty:y1 - ty, x0 - tx:x1 - tx] * w
    wsum[y0 - oy:y1 - oy, x0 - ox:x1 - ox] += w


def normalise_blend(sums: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Blended probabilities; pixels no tile covers (outside the image) become background."""
    covered = wsum > 0
    out = np.zeros_like(sums)
    np.divide(sums, wsum[None], out=out, where=covered[None])
    out[0][~covered] = 1.0
    return out


def blend_to_uint8(sums: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Blended probabilities as uint8 0..255 (p * 255, rounded), as stored in the zarr output.

    Works one class at a time in place in ``sums`` (which it consumes), so a block needs no
    full-size float temporaries; pixels no tile covers become background.
    """
    covered = wsum > 0
    scale = np.divide(255.0, wsum, out=np.zeros_like(wsum), where=covered)
    out = np.empty(sums.shape, np.uint8)
    for c, channel in enumerate(sums):
        channel *= scale
        np.rint(channel, out=channel)
        np.clip(channel, 0, 255, out=channel)
        out[c] = channel
    out[0][~covered] = 255
    return out
