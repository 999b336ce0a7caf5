"""Lazy field-of-view prediction for a viewer: only the tiles a requested region needs.

Same grid, window and blending as :func:`~napari_genselfdiff.slide.tiler.predict_slide`, so a
region predicted here equals the same region of a whole-slide run.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Generator

import dask.array as da
import numpy as np

from napari_genselfdiff.core.progress import Progress, run_to_end
from napari_genselfdiff.slide.reader import Slide
from napari_genselfdiff.slide.rescale import LevelScale
from napari_genselfdiff.slide.grid import BlendWindows, TileGrid, TileId, add_tile, normalise_blend
from napari_genselfdiff.slide.batching import BatchSizer
from napari_genselfdiff.slide.tiler import (Predictor, channels_of, check_tile, iter_tile_predictions,
                                           resolve_level, split_by_tissue)
from napari_genselfdiff.slide.tissue import TissueMask, clear_background, detect_tissue


class FieldOfViewPredictor:
    """On-demand prediction for a viewer: computes only the tiles a requested region needs.

    Tiles are computed on the pixels of the requested pyramid level with the same grid,
    window and blending as :func:`predict_slide`, and kept in an LRU cache keyed by
    (level, tile row, tile column) holding ``cache_tiles`` tiles (each C x tile x tile
    float32), so panning back costs nothing. ``level`` is the default for
    :meth:`as_lazy_dask` (an int or 'auto'). Thread-safe: :meth:`predict_region` calls are
    serialised; :meth:`iter_region` (the cancellable job form) takes the lock per model call.
    """

    def __init__(self, predictor: Predictor, slide: Slide, level: int | str = 0,
                 tile: int = 512, overlap: int = 64, cache_tiles: int = 256, *,
                 batch: int = 4, tissue: bool = True) -> None:
        check_tile(predictor, tile)
        self.predictor, self.slide = predictor, slide
        self.level = resolve_level(slide, level, predictor)
        self.tile, self.overlap, self.batch = tile, overlap, batch
        self.cache_tiles = cache_tiles
        self.use_tissue = tissue
        self.tiles_computed = 0
        self.cache_hits = 0
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._grids: dict[int, TileGrid] = {}
        self._windows: dict[int, BlendWindows] = {}
        self._mask: TissueMask | None = None
        self._sizer = BatchSizer(batch)  # tiles per model call: at most ``batch`` (see BatchSizer)
        self._lock = threading.RLock()

    def grid(self, level: int) -> TileGrid:
        """The tile grid of ``level``."""
        if level not in self._grids:
            h, w = self.slide.levels[level].shape[:2]
            scale = self.scale(level)  # tile and overlap are in model pixels
            self._grids[level] = TileGrid.make(int(h), int(w), scale.level_length(self.tile),
                                               scale.level_length(self.overlap), scale.multiple)
            self._windows[level] = BlendWindows(self._grids[level])
        return self._grids[level]

    def scale(self, level: int) -> LevelScale:
        """How ``level`` maps to the model's pixels (resampled where its um/px differ, :mod:`.rescale`)."""
        return LevelScale.of(self.slide, level, self.predictor)

    def _tissue(self) -> TissueMask | None:
        if self.use_tissue and self._mask is None:
            self._mask = detect_tissue(self.slide)
        return self._mask

    def uncached(self, level: int, y: int, x: int, h: int, w: int) -> int:
        """How many tiles of the region at ``level`` are not in the cache (the work it would take)."""
        level = resolve_level(self.slide, level, self.predictor)
        with self._lock:
            return sum((level,) + t not in self._cache for t in self.grid(level).touching(y, y + h, x, x + w))

    def predict_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Blended class probabilities (C, h, w) float32 of the region at ``level``; pixels
        outside the image are background. Calls are serialised (the lazy dask overlay computes
        chunks from several threads)."""
        with self._lock:
            return run_to_end(self.iter_region(level, y, x, h, w))

    def iter_region(self, level: int, y: int, x: int, h: int, w: int) -> Generator[Progress, None, np.ndarray]:
        """:meth:`predict_region` as a job: yields a 'predict' :class:`Progress` after every
        predictor call (``step`` of ``total`` = tiles of the region ready, with the ETA) and
        returns the probabilities (``probs = yield from fov.iter_region(...)``). Closing it stops
        before the next call; the tiles computed so far stay in the cache. The lock is taken per
        call, never held across a yield."""
        level = resolve_level(self.slide, level, self.predictor)
        with self._lock:
            grid = self.grid(level)
            tids = grid.touching(y, y + h, x, x + w)
            have = {t: self._cache[(level,) + t] for t in tids if (level,) + t in self._cache}
            for t in have:
                self._cache.move_to_end((level,) + t)
            missing = [t for t in tids if t not in have]
            self.cache_hits += len(have)
            mask = self._tissue()
        todo = len(split_by_tissue(grid, missing, mask, self.slide.downsamples[level])[0])
        fresh: dict[TileId, np.ndarray] = {}
        computed = area = 0
        start = time.perf_counter()
        tiles = iter_tile_predictions(self.predictor, self.slide, level, grid, missing, tissue=mask,
                                      sizer=self._sizer)
        while True:
            with self._lock:
                results = next(tiles, None)
            if results is None:
                break
            for tid, pred, was_computed in results:
                fresh[tid] = pred
                computed += was_computed
                area += grid.cell_area(tid)
            with self._lock:
                self.tiles_computed += sum(r[2] for r in results)
                for tid, pred, _ in results:
                    self._cache[(level,) + tid] = pred
                while len(self._cache) > self.cache_tiles:
                    self._cache.popitem(last=False)
            elapsed = max(time.perf_counter() - start, 1e-9)
            eta = elapsed / computed * (todo - computed) if computed else (0.0 if todo == 0 else None)
            yield Progress("predict", len(tids) - len(missing) + len(fresh), len(tids), eta_s=eta,
                           tiles_computed=computed, tiles_skipped=len(fresh) - computed,
                           megapixels_per_s=area / elapsed / 1e6)
        sums = np.zeros((channels_of(self.predictor), h, w), np.float64)
        wsum = np.zeros((h, w), np.float64)
        for tid in tids:
            ty, tx = grid.origin(tid)
            add_tile(sums, wsum, y, x, fresh[tid] if tid in fresh else have[tid], ty, tx, self._windows[level](tid))
        out = normalise_blend(sums, wsum).astype(np.float32)
        if mask is not None:
            clear_background(out, mask, self.slide.downsamples[level], y, x, certain=1.0)
        return out

    def as_lazy_dask(self, level: int | None = None, chunk: int = 1024) -> da.Array:
        """Probabilities of ``level`` as a lazy (C, H, W) float32 dask array.

        Each chunk calls :meth:`predict_region` when computed, so nothing runs until asked:
        napari computes only the chunks in view (of the level it displays), which makes this
        a lazy overlay. For a multiscale overlay pass ``[fov.as_lazy_dask(k) for k in ...]``.
        """
        level = self.level if level is None else level
        h, w = (int(s) for s in self.slide.levels[level].shape[:2])
        nc = channels_of(self.predictor)

        def chunks_of(n: int) -> tuple[int, ...]:
            return tuple(min(chunk, n - s) for s in range(0, n, chunk))

        def compute(block_info: dict[Any, Any] | None = None) -> np.ndarray:
            (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
            return self.predict_region(level, y0, x0, y1 - y0, x1 - x0)

        return da.map_blocks(compute, chunks=((nc,), chunks_of(h), chunks_of(w)),
                             dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
                             name=f"genselfdiff-fov-{id(self)}-{level}")


#: How far past a field of view's border its objects are looked for (microns, per task): an
#: object the view's border cuts is found whole when it reaches no further than this beyond it
#: (a nucleus is 5-15 µm across; most glands reach less than 100 µm past any line through them).
VIEW_MARGIN_UM = {"nuclei": 16.0, "glands": 100.0}
#: The margin in pixels of the model's level where the model's resolution is unknown.
VIEW_MARGIN_PX = 32


def view_margin(task: str, mpp: float | None) -> int:
    """Pixels (at the model's resolution ``mpp``) predicted around a field of view so the objects
    its border cuts are found whole (:data:`VIEW_MARGIN_UM`)."""
    um = VIEW_MARGIN_UM.get(task, VIEW_MARGIN_UM["nuclei"])
    return int(np.ceil(um / mpp)) if mpp else VIEW_MARGIN_PX


def with_margin(box: tuple[int, int, int, int], margin: int,
                shape: tuple[int, int]) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The region ``box`` (y, x, h, w) grown by ``margin`` pixels on every side, inside an image of
    ``shape``; returns (grown box, the original box in pixels of the grown one)."""
    y, x, h, w = (int(v) for v in box)
    rows, cols = (int(v) for v in shape[:2])
    y0, x0 = max(0, y - margin), max(0, x - margin)
    y1, x1 = min(rows, y + h + margin), min(cols, x + w + margin)
    return (y0, x0, y1 - y0, x1 - x0), (y - y0, x - x0, h, w)


def objects_in_view(labels: np.ndarray, view: tuple[int, int, int, int]) -> np.ndarray:
    """``labels`` (instances of a grown region, :func:`with_margin`) keeping only the objects
    with a pixel in ``view`` (y, x, h, w in its pixels), whole, numbered 1..n in their order;
    the objects lying wholly in the margin are removed (a later view finds them)."""
    y, x, h, w = view
    inside = np.unique(labels[y:y + h, x:x + w])
    inside = inside[inside > 0].astype(np.int64)
    ids = np.zeros(int(labels.max(initial=0)) + 1, labels.dtype)
    ids[inside] = np.arange(1, inside.size + 1, dtype=np.int64).astype(labels.dtype)
    return ids[labels]
